"""The rotate stage: Hadamard construction, rotated models compute the same logits, refusals."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import family_config

from slimkit.errors import ModelError, RecipeError
from slimkit.methods.rotate import Rotate
from slimkit.models import layout_for
from slimkit.models.layout import ResidentBlocks
from slimkit.ops.rotate import hadamard, hadamard_exists, random_hadamard, random_orthogonal, rotation
from slimkit.recipe import Recipe


@pytest.mark.parametrize("n", [1, 2, 12, 20, 28, 36, 44, 64, 80, 96, 576, 896, 960, 1152, 1536])
def test_hadamard_orders(n):
    H = hadamard(n)
    assert set(H.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))


def test_sizes_of_common_models_are_covered():
    for n in (2048, 3072, 3584, 4096, 5120, 8192, 64, 128, 256):
        assert hadamard_exists(n), n
    assert not hadamard_exists(668)  # no construction here (668 = 4 * 167, 167 = 3 mod 4 gives 168)
    with pytest.raises(RecipeError, match="orthogonal"):
        hadamard(668)


@pytest.mark.parametrize("fn", [random_hadamard, random_orthogonal])
def test_random_rotations_are_orthogonal_and_seeded(fn):
    Q = fn(96, 3)
    assert torch.allclose(Q @ Q.T, torch.eye(96, dtype=torch.float64), atol=1e-12)
    assert torch.equal(Q, fn(96, 3))
    assert not torch.equal(Q, fn(96, 4))


def _model(model_type: str, tied: bool, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    extra = {"attention_bias": True} if model_type == "llama" else {}
    m = AutoModelForCausalLM.from_config(family_config(model_type, tie_word_embeddings=tied, **extra))
    gemma = model_type.startswith("gemma")
    with torch.no_grad():  # norms with a real scale (random models start at the identity), so folding matters
        for name, mod in m.named_modules():
            if "norm" in type(mod).__name__.lower() and getattr(mod, "weight", None) is not None:
                w = torch.randn_like(mod.weight) * 0.3
                mod.weight.copy_(w if gemma else 1 + w)
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return m.eval()


def _logits(m, ids):
    with torch.no_grad():
        return m(ids).logits.to(torch.float64)


def _close(a, b, rel=1e-4):
    return ((a - b).abs().max() / b.abs().max()).item() < rel


CASES = [(t, tied) for t in ("llama", "mistral", "qwen2", "qwen3", "gemma") for tied in (False, True)]


@pytest.mark.parametrize("model_type,tied", CASES)
@pytest.mark.parametrize("kind", ["hadamard", "orthogonal"])
def test_rotated_model_computes_the_same_logits(model_type, tied, kind):
    m = _model(model_type, tied)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    before = _logits(m, ids)
    layout = layout_for(m)
    blocks = layout.blocks(m)
    q0 = blocks[0].self_attn.q_proj.weight.clone()
    done = Rotate(kind=kind, seed=5).transform(m, ResidentBlocks(m, layout), layout.model_type).info
    assert not torch.allclose(blocks[0].self_attn.q_proj.weight, q0)  # the weights did change
    assert _close(_logits(m, ids), before)
    # a tied head with a non-constant final norm cannot stay tied: it is untied, and says so
    assert done["untied_head"] == tied
    assert (m.get_output_embeddings().weight is m.get_input_embeddings().weight) is False


def test_tied_head_stays_tied_when_the_final_norm_is_constant():
    m = _model("llama", tied=True)
    with torch.no_grad():
        m.model.norm.weight.fill_(1.7)
    ids = torch.randint(0, 300, (1, 16))
    before = _logits(m, ids)
    layout = layout_for(m)
    done = Rotate().transform(m, ResidentBlocks(m, layout), "llama").info
    assert not done["untied_head"]
    assert m.get_output_embeddings().weight is m.get_input_embeddings().weight
    assert _close(_logits(m, ids), before)


def test_rotated_model_saves_as_an_ordinary_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    m = _model("qwen2", tied=True)
    ids = torch.randint(0, 300, (1, 16))
    before = _logits(m, ids)
    layout = layout_for(m)
    Rotate().transform(m, ResidentBlocks(m, layout), "qwen2")
    m.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert _close(_logits(again, ids), before)


@pytest.mark.parametrize("model_type,why", [("gemma2", "sandwich"), ("phi3", "q_proj"), ("opt", "nn.Embedding|"
                                                                                               "q_proj|norm"),
                                            ("mixtral", "gate_proj"), ("olmo2", "input_layernorm")])
def test_unsupported_blocks_are_refused_by_name(model_type, why):
    m = _model(model_type, tied=False)
    layout = layout_for(m)
    w = {n: p.clone() for n, p in m.state_dict().items()}
    with pytest.raises(ModelError, match=why) as e:
        Rotate().transform(m, ResidentBlocks(m, layout), layout.model_type)
    assert "\n" not in str(e.value)
    assert all(torch.equal(p, w[n]) for n, p in m.state_dict().items())  # refused before any change


def test_recipe_rules_for_a_model_level_stage():
    from slimkit.methods import build_stage

    rot, rtn = build_stage({"method": "rotate"}), build_stage({"method": "rtn", "bits": 4, "group_size": 16})
    r = Recipe("r", [rot, rtn])
    assert r.layer_stages == [rtn] and r.model_stages == [rot]
    with pytest.raises(RecipeError, match="before every"):
        Recipe("r", [rtn, rot])
    with pytest.raises(RecipeError, match="no stage that compresses"):
        Recipe("r", [rot])
    with pytest.raises(RecipeError, match="more than one"):
        Recipe("r", [rot, build_stage({"method": "rotate", "seed": 1}), rtn])
    Recipe("r", [rot, build_stage({"method": "gptq_gguf", "ftype": "Q4_0"})])  # a lone GGUF stage after a rotation
    with pytest.raises(RecipeError, match="kind"):
        build_stage({"method": "rotate", "kind": "givens"})
    assert Recipe.from_dict(r.to_dict()).to_dict() == r.to_dict()


def test_compress_with_rotation_end_to_end(tiny_llama, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    from slimkit.api import compress
    from slimkit.methods import build_stage

    src = tmp_path / "dense"  # tied head, norms with real scales: the head is untied, the reference follows it
    _model("llama", tied=True).save_pretrained(src)
    for f in tiny_llama.glob("tokenizer*"):
        shutil.copy(f, src / f.name)
    rec = Recipe("rot-rtn8", [build_stage({"method": "rotate"}),
                              build_stage({"method": "rtn", "bits": 8, "group_size": 16})])
    out = tmp_path / "out"
    report = compress(str(src), rec, out, calib=str(text_file), nsamples=4, seqlen=32, eval_data=str(text_file),
                      eval_tokens=256, progress=False)
    assert report["transforms"]["rotate"]["kind"] == "hadamard" and report["transforms"]["rotate"]["untied_head"]
    assert report["eval"]["kl_method"].startswith("head moment")
    dense = AutoModelForCausalLM.from_pretrained(src).eval()
    comp = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 300, (1, 32))
    assert not torch.allclose(comp.model.layers[0].mlp.up_proj.weight, dense.model.layers[0].mlp.up_proj.weight, atol=1e-3)
    assert _close(_logits(comp, ids), _logits(dense, ids), rel=2e-2)  # 8 bits on rotated weights: the same model
    assert report["eval"]["kl"] < 1e-3


@pytest.fixture(scope="module")
def tied_normed(tmp_path_factory):
    """A 3-block llama with tied embeddings and non-constant norm scales (so the rotation unties the head)."""
    from helpers import make_tokenizer, tiny_config
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    cfg.num_hidden_layers, cfg.tie_word_embeddings = 3, True
    torch.manual_seed(1)
    m = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, mod in m.named_modules():
            if "norm" in type(mod).__name__.lower():
                mod.weight.copy_(1 + 0.3 * torch.randn_like(mod.weight))
    path = tmp_path_factory.mktemp("tiednorm") / "llama3"
    m.save_pretrained(path)
    make_tokenizer(path)
    return path


def test_low_memory_rotation_writes_the_same_model(tied_normed, text_file, tmp_path):
    """--low-memory rotates each block as it is read from disk (the shell at the start): the same
    weights, head and report as the in-memory run, and the untied head is written with its config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from slimkit.api import compress
    from slimkit.methods import build_stage

    rec = Recipe("r", [build_stage({"method": "rotate"}),
                       build_stage({"method": "gptq", "bits": 4, "group_size": 16, "actorder": True,
                                    "weighted_search": True})])
    kw = dict(calib=str(text_file), nsamples=4, seqlen=32, eval_data=str(text_file), eval_tokens=256, progress=False)
    eager = compress(str(tied_normed), rec, tmp_path / "eager", **kw)
    low = compress(str(tied_normed), rec, tmp_path / "low", low_memory=True, **kw)
    assert low["transforms"]["rotate"]["untied_head"] and eager["transforms"]["rotate"]["untied_head"]
    assert AutoConfig.from_pretrained(tmp_path / "low").tie_word_embeddings is False
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "eager").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "low").state_dict()
    assert a.keys() == b.keys() and "lm_head.weight" in b
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    assert not torch.equal(b["lm_head.weight"], b["model.embed_tokens.weight"])
    assert low["eval"]["ppl"] == pytest.approx(eager["eval"]["ppl"], rel=1e-5)
    assert low["eval"]["kl"] == pytest.approx(eager["eval"]["kl"], rel=1e-4) and 0 < low["eval"]["kl"] < 0.5


@pytest.mark.parametrize("model_type", ["llama", "gemma"])
def test_bf16_model_rotates_with_norm_scales_read_exactly(model_type):
    from slimkit.methods.rotate import norm_scale

    m = _model(model_type, tied=False).to(torch.bfloat16)
    norm = m.model.layers[0].input_layernorm
    g, ident = norm_scale(norm, "n")
    expect = norm.weight.double() + (1.0 if model_type == "gemma" else 0.0)
    assert torch.equal(g, expect) and ident == (0.0 if model_type == "gemma" else 1.0)
    ids = torch.randint(0, 300, (1, 16))
    before = _logits(m, ids)
    layout = layout_for(m)
    Rotate().transform(m, ResidentBlocks(m, layout), model_type)
    assert m.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert _close(_logits(m, ids), before, rel=5e-2)  # bf16 storage rounds the rotated weights


@pytest.fixture(scope="module")
def rotated_rtn(tiny_llama, text_file, tmp_path_factory):
    """A tied tiny llama with real norm scales, rotated (its head untied) and RTN W4 g32."""
    from slimkit.api import compress
    from slimkit.methods import build_stage

    root = tmp_path_factory.mktemp("rot-export")
    _model("llama", tied=True).save_pretrained(root / "dense")
    for f in tiny_llama.glob("tokenizer*"):
        shutil.copy(f, root / "dense" / f.name)
    rec = Recipe("rot-rtn4", [build_stage({"method": "rotate"}),
                              build_stage({"method": "rtn", "bits": 4, "group_size": 32})])
    compress(str(root / "dense"), rec, root / "c", calib=str(text_file), nsamples=4, seqlen=32, eval_data=None,
             progress=False)
    return root / "c"


@pytest.mark.parametrize("fmt", ["native", "compressed-tensors"])
def test_a_rotated_model_exports_like_any_other(rotated_rtn, tmp_path, fmt):
    from transformers import AutoModelForCausalLM

    from slimkit.export import export
    from slimkit.pack import load

    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    want = _logits(AutoModelForCausalLM.from_pretrained(rotated_rtn, dtype=torch.float32).eval(), ids)
    out = export(rotated_rtn, fmt, tmp_path / "x")
    if fmt == "native":
        got = load(out, mode="dequant")
    else:
        pytest.importorskip("compressed_tensors")
        from transformers import CompressedTensorsConfig
        got = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32,
                                                   quantization_config=CompressedTensorsConfig(dequantize=True))
    assert (_logits(got, ids) - want).abs().max() < 1e-4 * want.abs().max()


def test_builtin_rotate_gptq_recipe_runs(tiny_llama, text_file, tmp_path):
    from slimkit.api import compress

    report = compress(str(tiny_llama), "rotate-gptq-w4-g64", tmp_path / "o", calib=str(text_file), nsamples=4,
                      seqlen=32, eval_data=str(text_file), eval_tokens=256, progress=False)
    assert report["transforms"]["rotate"]["heads"] and report["recipe"]["stages"][1]["weighted_search"]
    assert 0 < report["eval"]["kl"] < 0.5


@pytest.mark.parametrize("name", ["rotate-slim-plus", "rotate-slim-llm-2bit-g64", "rotate-reallm-3bit"])
def test_rotated_builtins_equal_their_method_on_a_rotated_model(name, tiny_llama, text_file, tmp_path):
    """A built-in 'rotate-X' recipe gives the weights X gives on the model rotated beforehand and saved:
    the later stages see the rotated weights and statistics, and nothing else changes."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from slimkit.api import compress
    from slimkit.recipe import load_recipe

    pre = tmp_path / "pre"
    shutil.copytree(tiny_llama, pre)
    m = AutoModelForCausalLM.from_pretrained(str(pre), dtype=torch.float32)
    rec = load_recipe(name).to_dict()
    Rotate(**{k: v for k, v in rec["stages"][0].items() if k != "method"}).transform(
        m, ResidentBlocks(m, layout_for(m)), m.config.model_type)
    m.save_pretrained(pre)
    rest = tmp_path / "rest.yaml"
    rest.write_text(Recipe.from_dict(rec | {"name": "rest", "stages": rec["stages"][1:]}).to_yaml())
    kw = dict(calib=str(text_file), nsamples=4, seqlen=32, eval_data=None, progress=False)
    report = compress(str(tiny_llama), name, tmp_path / "a", **kw)
    compress(str(pre), str(rest), tmp_path / "b", **kw)
    assert report["transforms"]["rotate"]["kind"] == "hadamard"
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
    orig = load_file(tiny_llama / "model.safetensors")
    q = next(k for k in a if k.endswith("layers.0.self_attn.q_proj.weight"))
    assert not torch.allclose(a[q], orig[q], atol=1e-2)  # the rotation changed what was compressed
