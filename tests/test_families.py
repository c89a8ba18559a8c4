"""Any Hugging Face causal LM: tiny random models of many families (built from transformers'
config classes) compress end to end, reload with transformers, and export; every block runs
with its own arguments (sliding-window layers with their own mask); mixture-of-experts blocks
are compressed expert by expert."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import FAMILIES, MOE_FAMILIES, family_config, make_tokenizer
from slimkit.api import compress
from slimkit.calib import compress_model
from slimkit.calib.hooks import capture_inputs, run_block
from slimkit.data import calibration_ids, evaluation_ids
from slimkit.errors import ModelError
from slimkit.eval.perplexity import evaluate
from slimkit.export import export
from slimkit.models import layout_for, load_model
from slimkit.models.layout import find_blocks_path
from slimkit.models.streaming import StreamedModel
from slimkit.pack.source import PackError
from slimkit.recipe import Recipe, load_recipe


def build(model_type, path, layers=2, **extra):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(model_type, layers, **extra))
    model.save_pretrained(path)
    make_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {t: build(t, root / t) for t in FAMILIES}


@pytest.mark.parametrize("recipe", ["gptq-w4-g64", "sparsegpt-2of4-gptq-w4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_compresses_reloads_and_exports(family_models, text_file, tmp_path, family, recipe):
    src = family_models[family]
    out = tmp_path / "out"
    r = compress(str(src), recipe, out, calib=str(text_file), nsamples=8, seqlen=32, eval_data=str(text_file),
                 eval_tokens=256, progress=False, batch_size=4)
    layers = r["compression"]["layers"]
    assert layers and all(0 <= l["rel_error"] < 1 for l in layers)
    if family in MOE_FAMILIES:
        assert any(".experts." in l["name"] for l in layers)  # every expert is compressed
    # transformers reloads the written model and computes what slimkit measured on its own
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    windows = evaluation_ids(str(text_file), load_model(str(out))[1], 32, 256)
    res = evaluate(reloaded, windows, progress=False)
    assert abs(res.ppl / r["eval"]["ppl"] - 1) < 1e-5, (res.ppl, r["eval"]["ppl"])
    if recipe != "gptq-w4-g64":
        return
    # compressed-tensors: one symmetric group scheme on every Linear (this transformers +
    # compressed-tensors pair cannot reload asymmetric checkpoints that mix group and channel schemes)
    ct_src, ct = tmp_path / "sym", tmp_path / "ct"
    sym = Recipe.from_dict({"name": "w4-g32-sym", "stages": [{"method": "gptq", "bits": 4, "group_size": 32,
                                                              "symmetric": True}]})
    compress(str(src), sym, ct_src, calib=str(text_file), nsamples=8, seqlen=32, eval_data=None, progress=False,
             batch_size=4)
    if family in MOE_FAMILIES:  # fused expert tensors are not Linears compressed-tensors can target
        with pytest.raises(PackError, match="experts"):
            export(ct_src, "compressed-tensors", ct)
        assert not ct.exists()
        return
    export(ct_src, "compressed-tensors", ct)
    qcfg = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert "lm_head" in qcfg["ignore"]
    packed = AutoModelForCausalLM.from_pretrained(ct)
    fake = AutoModelForCausalLM.from_pretrained(ct_src)
    with torch.no_grad():
        a = fake(input_ids=windows[:2]).logits
        b = packed(input_ids=windows[:2]).logits
    assert ((a - b).norm() / a.norm()).item() < 1e-4


def test_blocks_found_without_a_table():
    """Discovery needs no per-family table, and a model without decoder blocks is refused
    naming what was looked for."""
    for family in FAMILIES:
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(family_config(family))
        assert find_blocks_path(m) in ("model.layers", "model.decoder.layers")
    with pytest.raises(ModelError, match="_no_split_modules"):
        find_blocks_path(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.fixture(scope="module")
def sliding(tmp_path_factory):
    """gemma2 with a 16-token window (sliding, full) and calibration windows of 48 tokens."""
    return build("gemma2", tmp_path_factory.mktemp("sliding") / "gemma2", layers=4)


def _reference_blocks(model, ids):
    """Each block's inputs and outputs in the model's own forward."""
    blocks = layout_for(model).blocks(model)
    ins, outs = {}, {}
    def pre(i):
        def hook(m, a, kw):
            ins[i] = (a[0] if a else kw["hidden_states"]).clone()
        return hook

    def post(i):
        def hook(m, a, o):
            outs[i] = (o[0] if isinstance(o, tuple) else o).clone()
        return hook

    hs = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(blocks)]
    hs += [b.register_forward_hook(post(i)) for i, b in enumerate(blocks)]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hs:
        h.remove()
    return ins, outs


@pytest.mark.parametrize("low_memory", [False, True])
def test_every_block_gets_its_own_mask(sliding, low_memory):
    """Block i, run by the engine's machinery with the arguments captured for it, computes what
    the model's own forward computes (1e-5), past the sliding window, in memory and streamed."""
    model, tok, _ = load_model(str(sliding))
    ids = torch.randint(2, 320, (2, 48), generator=torch.Generator().manual_seed(0))
    ref_in, ref_out = _reference_blocks(model, ids)
    if low_memory:
        source = StreamedModel(str(sliding), with_tokenizer=False)
        shell, blocks = source.model, [source.peek(i) for i in range(len(source))]
        get = source.get
    else:
        shell, blocks = model, list(layout_for(model).blocks(model))
        get = blocks.__getitem__
    inputs, kwargs = capture_inputs(shell, blocks, ids, 2)
    assert torch.equal(inputs, ref_in[0])
    for i in range(len(blocks)):
        out = run_block(get(i), ref_in[i], kwargs[i], 2)
        err = ((out - ref_out[i]).norm() / ref_out[i].norm()).item()
        assert err < 1e-5, (i, err)


def test_moe_expert_without_tokens_is_compressed_data_free(tmp_path, text_file):
    """An expert the router never picks: the run completes, that expert gets RTN on the recipe's
    grid, and its report entry says why."""
    path = build("qwen2_moe", tmp_path / "moe")
    model, tok, _ = load_model(str(path))
    layout = layout_for(model)

    def never_three(mod, args, out):  # route expert 3's picks to expert 0
        logits, scores, idx = out
        return logits, scores, torch.where(idx == 3, torch.zeros_like(idx), idx)

    for b in layout.blocks(model):
        b.mlp.gate.register_forward_hook(never_three)
    ids = calibration_ids(str(text_file), tok, 8, 32, seed=0)
    res = compress_model(model, layout, load_recipe("gptq-w4-g64"), ids, batch_size=4, progress=False)
    starved = {l.name: l for l in res.layers if "data_free" in l.notes}
    assert starved and all(".experts.3." in n for n in starved)
    assert {n.rpartition(".")[2] for n in starved} == {"gate_proj", "up_proj", "down_proj"}
    assert "0 calibration tokens" in next(iter(starved.values())).notes["data_free"]
    assert all(l.grid == "W4 g64 asym" for l in starved.values())
    from slimkit.eval.report import markdown
    report = {"model": "moe", "recipe": {"name": "gptq-w4-g64", "description": ""}, "calibration": {
        "source": "t", "seed": 0}, "compressed_params": 0, "peak_rss_compress_mb": 0.0, "compression": res.to_dict()}
    md = markdown(report)
    assert "Experts compressed without calibration data" in md and all(f"| {n} |" in md for n in starved)
    # the fused tensors hold the compressed experts: the model still runs
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids[:1]).logits).all()


def test_low_memory_builds_each_block_from_its_own_layer_type(tmp_path, text_file):
    """A model whose blocks differ in structure (block 0 a dense MLP, block 1 mixture-of-experts):
    --low-memory builds every block from its own config entry, not as a copy of block 0, and
    writes what the in-memory run writes."""
    from safetensors.torch import load_file

    from safetensors.torch import save_file

    path = build("qwen2_moe", tmp_path / "mixed", mlp_only_layers=[0])
    # --low-memory reads tensors under the model's own names: store the experts fused, as the
    # model holds them (transformers loads either layout; save_pretrained writes per-expert keys)
    model = AutoModelForCausalLM.from_pretrained(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    kw = dict(calib=str(text_file), nsamples=8, seqlen=32, eval_data=None, progress=False, batch_size=4)
    compress(str(path), "gptq-w4-g64", tmp_path / "mem", **kw)
    compress(str(path), "gptq-w4-g64", tmp_path / "low", low_memory=True, **kw)
    a = load_file(str(tmp_path / "mem" / "slimkit_state.safetensors"))
    b = {}
    for f in sorted((tmp_path / "low").glob("slimkit_state-*.safetensors")):
        b |= load_file(str(f))
    assert sorted(a) == sorted(b) and any(".experts." in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_moe_across_workers_is_refused_before_the_work(tmp_path, text_file, monkeypatch):
    """Experts' statistics cannot be all-reduced yet: several workers are refused up front, with
    the model untouched."""
    from slimkit import dist
    from slimkit.errors import SlimkitError

    path = build("mixtral", tmp_path / "moe")
    model, tok, _ = load_model(str(path))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(dist, "active", lambda: True)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    ids = calibration_ids(str(text_file), tok, 8, 32, seed=0)
    with pytest.raises(SlimkitError, match="mixture-of-experts"):
        compress_model(model, layout_for(model), load_recipe("gptq-w4-g64"), ids, batch_size=4, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
