"""KL to the dense model at bounded memory (eval.perplexity's head moment): equal to the full-vocabulary
sum, perplexity unchanged, the dense model never beside the compressed one, a versioned cache that is
refused when truncated or foreign before any work starts."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from helpers import VOCAB, family_config, tiny_config

from slimkit.errors import SlimkitError
from slimkit.eval.perplexity import (HEAD_MOMENT, PAIRED, ReferenceCache, dense_reference, evaluate,
                                     linear_head, reference_summary)


def _pair(cfg, *, bias: bool = False, noise: float = 0.3, seed: int = 0):
    """A dense model and a perturbed copy (decoder blocks only, the head untouched: what compression does)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    dense = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # random init predicts nearly uniformly: sharpen it so that KL is well away from 0
        dense.get_output_embeddings().weight.mul_(10.0)
    if bias:  # a head with a bias (p . b term)
        old = dense.get_output_embeddings()
        head = nn.Linear(old.in_features, old.out_features, bias=True)
        head.weight.data.copy_(old.weight.data)
        head.bias.data.normal_(0, 0.5)
        dense.set_output_embeddings(head)
        dense.config.tie_word_embeddings = False
    model = AutoModelForCausalLM.from_config(cfg).eval()
    if bias:
        model.set_output_embeddings(nn.Linear(head.in_features, head.out_features, bias=True))
    model.load_state_dict(dense.state_dict())
    if cfg.tie_word_embeddings and not bias:
        model.tie_weights()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".layers." in n and p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * noise * p.abs().mean())
    return dense, model


def _windows(n=3, s=48, seed=0):
    return torch.randint(0, VOCAB, (n, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type,tied,bias,own_head", [
    ("llama", False, False, False), ("llama", True, False, False), ("qwen2", False, False, False),
    ("gemma", True, False, False), ("llama", False, True, False),
    ("llama", False, False, True), ("llama", False, True, True)])
def test_head_moment_equals_full_vocabulary_kl(model_type, tied, bias, own_head):
    """Centred form (the model keeps the dense head, as compression does) and general form (the
    model has a head of its own, as `slimkit eval --reference` may meet)."""
    dense, model = _pair(family_config(model_type, tie_word_embeddings=tied), bias=bias)
    if own_head:
        with torch.no_grad():
            model.lm_head.weight.mul_(1.1)
            if bias:
                model.lm_head.bias.add_(0.3)
    w = _windows()
    exact = evaluate(model, w, dense, progress=False)
    head = linear_head(model)
    assert head is not None
    ref = dense_reference(dense, w, head, progress=False)
    assert ref.form == ("general" if own_head else "centred")
    fast = evaluate(model, w, ref, progress=False)
    assert exact.kl_method == PAIRED and fast.kl_method == HEAD_MOMENT
    assert exact.kl > 1e-3  # a real difference to measure
    assert abs(fast.kl - exact.kl) <= 1e-4 * exact.kl, (fast.kl, exact.kl)
    assert abs(fast.ppl - exact.ppl) <= 1e-6 * exact.ppl
    assert abs(fast.ref_ppl - exact.ref_ppl) <= 1e-6 * exact.ref_ppl
    # the summary holds hidden-size numbers per token, not the vocabulary
    assert tuple(ref.moment.shape) == (w.shape[0] * (w.shape[1] - 1), model.config.hidden_size)
    assert ref.moment.dtype == (torch.float64 if own_head else torch.float32)


def test_head_moment_bf16_storage_on_cpu_placement():
    from slimkit.calib.device import Placement

    dense, model = _pair(tiny_config("llama"))
    dense, model = dense.to(torch.bfloat16), model.to(torch.bfloat16)
    w = _windows()
    p = Placement.make("cpu", torch.bfloat16)
    exact = evaluate(model, w, dense, progress=False, placement=p)
    head = linear_head(model, p)
    ref = dense_reference(dense, w, head, progress=False, placement=p)
    fast = evaluate(model, w, ref, progress=False, placement=p)
    assert abs(fast.kl - exact.kl) <= 1e-4 * exact.kl and abs(fast.ppl - exact.ppl) <= 1e-6 * exact.ppl
    assert model.lm_head.weight.dtype == torch.bfloat16  # stored form restored


def test_softcapped_logits_are_not_a_linear_head():
    dense, model = _pair(family_config("gemma2", final_logit_softcapping=5.0))
    assert linear_head(model) is None
    dense, model = _pair(family_config("gemma2", final_logit_softcapping=None))
    assert linear_head(model) is not None


def test_summary_for_another_head_is_refused():
    dense, model = _pair(tiny_config("llama"))
    w = _windows()
    ref = dense_reference(dense, w, linear_head(dense), progress=False)
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0
    with pytest.raises(SlimkitError, match="another output head"):
        evaluate(model, w, ref, progress=False)


def test_different_vocabulary_is_one_line():
    from transformers import AutoModelForCausalLM

    dense, model = _pair(tiny_config("llama"))
    other = AutoModelForCausalLM.from_config(family_config("llama", vocab_size=VOCAB + 8)).eval()
    w = _windows()
    with pytest.raises(SlimkitError, match="same vocabulary"):
        dense_reference(other, w, linear_head(model), progress=False)
    with pytest.raises(SlimkitError, match="same vocabulary"):
        evaluate(model, w, other, progress=False)


def test_cache_written_once_then_read_and_checked(tmp_path):
    dense, model = _pair(tiny_config("llama"))
    w = _windows()
    head = linear_head(model)
    cache = ReferenceCache(tmp_path / "c", "key-a")
    calls = []

    def loader():
        calls.append(1)
        return dense

    a = reference_summary(loader, w, head, cache=cache, progress=False)
    b = reference_summary(loader, w, head, cache=cache, progress=False)
    assert calls == [1] and cache.ready()
    assert torch.equal(a.moment, b.moment) and torch.equal(a.const, b.const) and b.form == a.form == "centred"
    assert evaluate(model, w, a, progress=False).kl == evaluate(model, w, b, progress=False).kl
    size = cache.path.stat().st_size
    assert size < 2 * a.nbytes()
    # foreign: the same file under another key
    other = ReferenceCache(tmp_path / "c", "key-b")
    os.link(cache.path, other.path)
    with pytest.raises(SlimkitError, match="other windows"):
        reference_summary(loader, w, head, cache=other, progress=False)
    # other windows of the same key: other token count
    with pytest.raises(SlimkitError, match="expected"):
        reference_summary(loader, _windows(n=2), head, cache=cache, progress=False)
    # truncated
    with open(cache.path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(SlimkitError, match="unreadable"):
        reference_summary(loader, w, head, cache=cache, progress=False)
    # a file where the folder should be
    (tmp_path / "f").write_text("x")
    with pytest.raises(SlimkitError, match="is a file"):
        reference_summary(loader, w, head, cache=ReferenceCache(tmp_path / "f", "k"), progress=False)
    assert calls == [1]


@pytest.fixture(scope="module")
def sharp_llama(tmp_path_factory):
    """The tiny llama with a head 10x larger: random weights predict nearly uniformly (KL ~1e-4, at
    the level of fp32 rounding), a sharper head gives distributions that compression visibly moves."""
    from transformers import AutoModelForCausalLM

    from helpers import make_model
    path = make_model("llama", tmp_path_factory.mktemp("sharp") / "llama")
    m = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        m.lm_head.weight.mul_(10.0)
    m.save_pretrained(path)
    return path


def test_compress_never_loads_the_dense_model_again(sharp_llama, text_file, monkeypatch, tmp_path):
    """The dense summary is made from the resident model before compression: the only model load of
    a run is the one that is compressed; the report states the method and its bound."""
    import slimkit.api as api

    loads = []
    real = api.load_model
    monkeypatch.setattr(api, "load_model", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    r = api.compress(str(sharp_llama), "rtn-w2-g64", tmp_path / "o", calib=str(text_file), nsamples=4, seqlen=32,
                     eval_data=str(text_file), eval_tokens=128, progress=False)
    assert loads == [str(sharp_llama)]
    ev = r["eval"]
    assert ev["kl_method"] == HEAD_MOMENT and "rounding" in ev["kl_error_bound"] and ev["kl"] > 0
    md = (tmp_path / "o" / "report.md").read_text()
    assert "KL method" in md and "KL error bound" in md
    # ... and equals the full-vocabulary KL of the written model against the input model
    from transformers import AutoModelForCausalLM

    from slimkit.data import evaluation_ids
    from slimkit.models.loading import load_tokenizer
    w = evaluation_ids(str(text_file), load_tokenizer(str(sharp_llama)), 32, 128)
    exact = evaluate(AutoModelForCausalLM.from_pretrained(tmp_path / "o").eval(), w,
                     AutoModelForCausalLM.from_pretrained(sharp_llama).eval(), progress=False)
    assert abs(exact.kl - ev["kl"]) <= 1e-4 * exact.kl and abs(exact.ppl - ev["ppl"]) <= 1e-6 * exact.ppl


def test_softcapped_family_falls_back_to_paired(tmp_path, text_file):
    from transformers import AutoModelForCausalLM

    from helpers import make_tokenizer
    from slimkit.api import compress

    path = tmp_path / "g2"
    AutoModelForCausalLM.from_config(family_config("gemma2", final_logit_softcapping=5.0)).save_pretrained(path)
    make_tokenizer(path)
    r = compress(str(path), "rtn-w4-g64", tmp_path / "o", calib=str(text_file), nsamples=4, seqlen=32,
                 eval_data=str(text_file), eval_tokens=64, progress=False, reference_cache=str(tmp_path / "c"))
    assert r["eval"]["kl_method"] == PAIRED and r["eval"]["kl"] >= 0
    assert not (tmp_path / "c").exists()  # nothing cached for a paired evaluation


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "slimkit", *args], capture_output=True, text=True)


def test_bad_cache_refused_before_work(tiny_llama, text_file, tmp_path):
    """A truncated or foreign cache, or a file given as the cache folder: one line, exit 2, before the
    first block (no partial folder, nothing at --out), the cache left as it was."""
    base = ["compress", str(tiny_llama), "--recipe", "rtn-w4-g64", "--calib", str(text_file), "--nsamples", "4",
            "--seqlen", "32", "--eval", str(text_file), "--eval-tokens", "128", "-q"]
    cache = tmp_path / "cache"
    ok = _cli(*base, "--out", str(tmp_path / "a"), "--reference-cache", str(cache))
    assert ok.returncode == 0, ok.stderr
    (f,) = cache.glob("*.safetensors")
    kl = json.loads((tmp_path / "a" / "report.json").read_text())["eval"]["kl"]
    again = _cli(*base, "--out", str(tmp_path / "b"), "--reference-cache", str(cache))
    assert again.returncode == 0 and json.loads((tmp_path / "b" / "report.json").read_text())["eval"]["kl"] == kl
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    notfolder = tmp_path / "file"
    notfolder.write_text("x")
    for cache_arg, what in ((cache, "unreadable"), (notfolder, "is a file")):
        before = sorted(p.name for p in tmp_path.iterdir())
        r = _cli(*base, "--out", str(tmp_path / "c"), "--reference-cache", str(cache_arg))
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and what in lines[0] and "Traceback" not in r.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # no out, no partial folder
    assert f.read_bytes() == data[: len(data) - 100]


@pytest.mark.slow
def test_default_model_head_moment_equals_full_kl(tmp_path):
    """On the real default model (49,152-token vocabulary): the run's KL equals the full-vocabulary KL
    of its output against the input, perplexity unchanged."""
    from slimkit.api import compress
    from slimkit.data import evaluation_ids
    from slimkit.models import load_model

    r = compress("default", "rtn-w4-g64", tmp_path / "o", calib="shakespeare", nsamples=4, seqlen=128,
                 eval_data="shakespeare:eval", eval_tokens=2048, progress=False)
    ev = r["eval"]
    assert ev["kl_method"] == HEAD_MOMENT
    dense, tok, _ = load_model("default")
    w = evaluation_ids("shakespeare:eval", tok, 128, 2048)
    out = load_model(str(tmp_path / "o"), with_tokenizer=False)[0]
    exact = evaluate(out, w, dense, progress=False)
    assert abs(exact.kl - ev["kl"]) <= 1e-4 * exact.kl, (exact.kl, ev["kl"])
    # perplexity: the head-moment path sums logsumexp in fp64, the paired one takes fp32 log_softmax
    # over 49,152 logits; they differ by ~1e-5 relative
    assert abs(exact.ppl - ev["ppl"]) <= 2e-5 * exact.ppl and abs(exact.ref_ppl - ev["ref_ppl"]) <= 2e-5 * exact.ref_ppl


def test_narrow_logits_use_the_exact_fp32_head():
    """A model computing in bf16 (as on CUDA) rounds its logits; the head-moment KL then uses the fp32
    logits of the head's input, and equals the full-vocabulary KL of those logits."""
    import torch.nn.functional as F

    dense, model = _pair(tiny_config("llama"))
    dense, model = dense.to(torch.bfloat16), model.to(torch.bfloat16)
    w = _windows(n=2, s=24)
    ref = dense_reference(dense, w, linear_head(model), progress=False)
    fast = evaluate(model, w, ref, progress=False)

    def logp32(m):
        seen = {}
        h = m.get_output_embeddings().register_forward_hook(lambda mod, a, o: seen.setdefault("h", a[0]))
        with torch.no_grad():
            m(input_ids=w, use_cache=False)
        h.remove()
        head = m.get_output_embeddings()
        return F.log_softmax(F.linear(seen["h"][:, :-1].float(), head.weight.float()), -1)
    p, q = logp32(dense), logp32(model)
    exact = (p.exp() * (p - q)).sum(-1).mean().item()
    assert exact > 1e-3 and abs(fast.kl - exact) <= 1e-4 * exact, (fast.kl, exact)
