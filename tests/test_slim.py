"""SLiM: SLiM-Quant's clip search, saliency-weighted low-rank adapters, quantized adapters, fine-tuning."""
import json

import pytest
import torch

from helpers import correlated_inputs
from slimkit.errors import RecipeError
from slimkit.methods import LinearState, LinearStats, build_stage
from slimkit.ops.lowrank import absmax_quantize, resolve_rank, saliency_diag, weighted_lowrank
from slimkit.ops.slim_quant import expected_error, histogram, search_alpha
from slimkit.recipe import Recipe, load_recipe


@pytest.mark.parametrize("dist", ["normal", "laplace", "student"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_slim_quant_alpha_minimises_objective(dist, bits):
    g = torch.Generator().manual_seed(bits)
    n = 40_000
    if dist == "normal":
        W = torch.randn(n, generator=g)
    elif dist == "laplace":
        W = torch.distributions.Laplace(0, 1).sample((n,))
    else:
        W = torch.distributions.StudentT(3).sample((n,))
    W = W.reshape(200, 200)
    alpha = search_alpha(W, bits)
    centres, pdf, width = histogram(W)
    brute = expected_error(centres, centres, pdf, width, bits)  # every bin centre
    chosen = expected_error(torch.tensor([alpha], dtype=torch.float64), centres, pdf, width, bits)
    assert chosen.item() <= brute.min().item() * (1 + 1e-9) + 1e-15
    assert 0 < alpha < W.abs().max()


def test_weighted_svd_is_the_weighted_optimum():
    g = torch.Generator().manual_seed(0)
    E = torch.randn(40, 60, generator=g)
    d = torch.exp(torch.randn(60, generator=g))
    r = 7
    L, R = weighted_lowrank(E, d, r)
    assert L.shape == (60, r) and R.shape == (r, 40)
    err = ((E - (L @ R).T) * d).norm()
    S = torch.linalg.svdvals((E * d).double())
    assert torch.isclose(err.double(), S[r:].square().sum().sqrt(), rtol=1e-4)  # Eckart-Young bound attained
    Ln, Rn = weighted_lowrank(E, None, r)  # the unweighted SVD is worse in the weighted norm
    assert ((E - (Ln @ Rn).T) * d).norm() > err * 1.01
    for _ in range(5):  # and small perturbations of the optimum only make it worse
        Lp = L + 0.01 * torch.randn(L.shape, generator=g)
        assert ((E - (Lp @ R).T) * d).norm() >= err


def setup_layer(seed=0, out=64, k=128):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, k, generator=g)
    X = correlated_inputs(2048, k, seed)
    st = LinearStats(k, want_hessian=False)
    st.add(X)
    st.finalize()
    return W, X, st


def run(stages, W, st):
    s = LinearState.from_weight("layer", W)
    for cfg in stages:
        s = build_stage(cfg).run(s, st)
    return s


def out_err(W, Wh, X):
    return ((X @ (W - Wh).T).norm() / (X @ W.T).norm()).item()


BASE = [{"method": "slim_quant", "bits": 3}, {"method": "wanda", "sparsity": "2:4"}]


def test_full_rank_adapters_reproduce_W():
    W, X, st = setup_layer()
    s = run(BASE + [{"method": "slim_lora", "rank": 1.0, "adapter_bits": None, "pad_to": None,
                     "refit": False}], W, st)
    assert s.rank == 64
    assert torch.allclose(s.effective_weight(), W, atol=1e-4)


def test_quantized_adapters_stay_on_their_grid():
    W, X, st = setup_layer()
    s = run(BASE + [{"method": "slim_lora", "rank": 16, "adapter_bits": 4, "adapter_group": 32,
                     "pad_to": None}], W, st)
    for M in (s.L, s.R):
        rows, cols = M.shape
        _, scale = absmax_quantize(M, 4, 32)
        for gi in range(scale.shape[0]):
            blk = M[gi * 32:(gi + 1) * 32] / scale[gi][None, :]
            assert torch.allclose(blk, blk.round(), atol=1e-4) and blk.abs().max() <= 7 + 1e-4
    # the AbsMax quantizer is idempotent: the adapters already are grid points
    assert torch.allclose(absmax_quantize(s.L, 4, 32)[0], s.L, atol=1e-6)


def test_saliency_beats_naive_and_adapters_help():
    W, X, st = setup_layer(1)
    none = run(BASE, W, st)
    naive = run(BASE + [{"method": "slim_lora", "rank": 16, "saliency": "none", "adapter_bits": None,
                         "pad_to": None}], W, st)
    slim = run(BASE + [{"method": "slim_lora", "rank": 16, "adapter_bits": None, "pad_to": None}], W, st)
    e0, en, es = (out_err(W, s.effective_weight(), X) for s in (none, naive, slim))
    assert es < en < e0, (e0, en, es)


def test_refit_keeps_mask_and_grid():
    W, X, st = setup_layer(2)
    b = run(BASE + [{"method": "slim_lora", "rank": 16, "adapter_bits": None, "pad_to": None}], W, st)
    assert torch.all(b.weight[~b.mask] == 0)  # the re-fit keeps the mask
    q = b.weight / b.scale  # and puts the base back on a (fresh) per-tensor grid
    assert torch.allclose(q, q.round(), atol=1e-4)
    a = run(BASE + [{"method": "slim_lora", "rank": 16, "adapter_bits": None, "pad_to": None, "refit": False}], W, st)
    assert not torch.equal(a.weight, b.weight) and torch.equal(a.L, b.L)


def hessian_layer(seed=0, out=64, k=128):
    W, X, _ = setup_layer(seed, out, k)
    st = LinearStats(k, want_hessian=True)
    st.add(X)
    st.finalize()
    return W, X, st


SGPT = {"method": "sparsegpt", "sparsity": "2:4", "bits": 3, "group_size": 32, "symmetric": True}
LORA = {"method": "slim_lora", "rank": 8, "saliency": "hessian", "adapter_bits": 4, "adapter_group": 32, "pad_to": None}


def on_grid(s):
    """Every kept weight is a grid point of its group, every pruned one is 0, groups of 4 hold 2."""
    q = s.weight.reshape(s.weight.shape[0], -1, 32) / s.scale[:, :, None]
    assert torch.allclose(q, q.round(), atol=1e-4) and q.abs().max() <= 4 + 1e-4
    assert torch.all(s.weight[~s.mask] == 0)
    assert torch.all(s.mask.reshape(s.mask.shape[0], -1, 4).sum(-1) == 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alternating_fits_lower_the_output_error(seed):
    W, X, st = hessian_layer(seed)
    errs = {}
    for key, extra in {"once": {}, "2 rounds": {"iterations": 2}, "4 rounds": {"iterations": 4},
                       "reselected": {"iterations": 4, "reselect_mask": True}}.items():
        s = run([SGPT, LORA | extra], W, st)
        on_grid(s)
        errs[key] = out_err(W, s.effective_weight(), X)
        if key == "once":
            first_mask = s.mask
    # round k+1 starts where round k ended and the best round is kept: never worse with more rounds
    assert errs["4 rounds"] <= errs["2 rounds"] * (1 + 1e-5) <= errs["once"] * (1 + 1e-5) ** 2, errs
    assert errs["4 rounds"] < 0.97 * errs["once"], errs
    assert errs["reselected"] <= errs["once"] * (1 + 1e-5), errs
    assert not torch.equal(s.mask, first_mask)  # the last run chose another 2:4 mask


def test_alternation_keeps_the_best_round():
    """The stage returns the round of lowest output error, with that round's own adapters: its error
    is the minimum over the rounds that a stage with fewer rounds returns."""
    W, X, st = hessian_layer(5)
    e = [out_err(W, run([SGPT, LORA | {"iterations": k}], W, st).effective_weight(), X) for k in (1, 2, 3, 4, 5)]
    assert all(abs(e[k] - min(e[:k + 1])) <= 1e-5 * e[0] for k in range(5)), e


def test_refits_need_the_right_grid_before_them():
    sweep_3bit = {"method": "sparsegpt", "sparsity": "2:4", "bits": 3}
    for stages in ([{"method": "rtn", "bits": 4}, {"method": "wanda", "sparsity": "2:4"}, LORA | {"iterations": 2, "reselect_mask": True}],
                   [{"method": "sparsegpt", "sparsity": "2:4"}, {"method": "rtn", "bits": 4}, LORA | {"iterations": 2, "reselect_mask": True}],
                   [sweep_3bit, {"method": "gptq", "bits": 4}, LORA | {"iterations": 2, "reselect_mask": True}]):
        with pytest.raises(RecipeError, match="reselect_mask"):  # the last grid is not a joint sweep
            Recipe.from_dict({"stages": stages})
    with pytest.raises(RecipeError, match="iterations > 1"):  # nothing to re-fit with
        Recipe.from_dict({"stages": [{"method": "wanda", "sparsity": "2:4"}, LORA | {"iterations": 2}]})
    Recipe.from_dict({"stages": [SGPT, LORA | {"iterations": 2, "reselect_mask": True}]})
    Recipe.from_dict({"stages": [sweep_3bit, {"method": "gptq", "bits": 4}, LORA | {"iterations": 2}]})
    for cfg in ({"iterations": 0}, {"iterations": 2.0}, {"iterations": 3, "refit": False},
                {"iterations": 2, "reselect_mask": True, "refit": False}, {"reselect_mask": True}):
        with pytest.raises(RecipeError, match="iterations|refit"):
            build_stage(LORA | cfg)


def test_a_later_grid_drops_the_earlier_refits():
    """GPTQ after SparseGPT + bits re-quantizes the weight: SparseGPT's joint re-prune must not survive
    on the state (it would re-fit to the old grid)."""
    W, X, st = hessian_layer(0)
    s = run([{"method": "sparsegpt", "sparsity": "2:4", "bits": 3}], W, st)
    assert s.reprune is not None and s.requantize is not None
    s = build_stage({"method": "gptq", "bits": 4}).run(s, st)
    assert s.reprune is None and s.requantize is not None


def test_hessian_lowrank_is_the_output_error_optimum():
    from slimkit.ops.lowrank import hessian_lowrank
    g = torch.Generator().manual_seed(4)
    E = torch.randn(30, 50, generator=g)
    X = correlated_inputs(4000, 50, 4)
    H = X.T @ X / 4000
    r = 6
    L, R = hessian_lowrank(E, H, r, percdamp=0.0)
    def oerr(M):
        return (X @ (E - M).T).norm()
    best = oerr((L @ R).T)
    # equals the Eckart-Young bound of E C (C C^T = H) and beats the diagonal weighting
    C = torch.linalg.cholesky(H.double())
    S = torch.linalg.svdvals(E.double() @ C)
    assert torch.isclose(best.double() / 4000**0.5, S[r:].square().sum().sqrt(), rtol=1e-3)
    Ld, Rd = weighted_lowrank(E, H.diag().sqrt(), r)
    assert best < oerr((Ld @ Rd).T)


def test_slim_quant_is_one_symmetric_scale():
    W, X, st = setup_layer()
    s = run([{"method": "slim_quant", "bits": 4}], W, st)
    assert torch.all(s.scale == s.scale[0, 0]) and torch.all(s.zero == 8)
    q = s.weight / s.scale
    assert torch.allclose(q, q.round(), atol=1e-4) and q.round().min() >= -8 and q.round().max() <= 7
    assert s.bits()["scales"] == 16


def test_outlier_channels_are_carried():
    from slimkit.ops.quant import dequantize
    from slimkit.state_io import layer_record
    W, X, st = setup_layer(3)
    s = run([{"method": "slim_quant", "bits": 4, "outliers": 0.05}], W, st)
    inv = s.tensors["input_scale"]
    assert (inv == 0.5).sum() == 7 and torch.all((inv == 0.5) | (inv == 1))
    tensors, meta = layer_record(s)
    deq = dequantize(tensors["layer.codes"].float(), tensors["layer.scale"], tensors["layer.zero"].float())
    assert torch.allclose(deq * inv[None, :], s.weight, atol=1e-6)  # the same function is computed
    assert meta["bits"]["outlier_index"] == 7 * 16


def test_rank_resolution():
    assert resolve_rank(0.1, 576, 576, 128) == 128
    assert resolve_rank(0.1, 192, 576, 128) == 128
    assert resolve_rank(0.1, 576, 1536, None) == 57
    assert resolve_rank(0.5, 64, 128, 128) == 64  # padding capped at full rank
    assert resolve_rank(0.25, 64, 128, 32) == 32
    assert resolve_rank(200, 64, 128, None) == 64


def test_saliency_diag_has_no_zero():
    d = saliency_diag(torch.tensor([0.0, 4.0, 1.0]))
    assert torch.all(d > 0) and torch.isclose(d[0], torch.tensor(1.0))


@pytest.mark.parametrize("cfg,msg", [({"rank": 0}, "rank"), ({"rank": 1.5}, "ratio"), ({"adapter_bits": 1}, "adapter_bits"),
                                     ({"pad_to": 0}, "pad_to"), ({"rank": "x"}, "rank")])
def test_bad_lora_config(cfg, msg):
    with pytest.raises(RecipeError, match=msg):
        build_stage({"method": "slim_lora", **cfg})


def test_finetune_needs_adapters():
    with pytest.raises(RecipeError, match="adapters"):
        Recipe.from_dict({"stages": [{"method": "rtn"}], "finetune": {"steps": 2}})
    with pytest.raises(RecipeError, match="finetune"):
        Recipe.from_dict({"stages": [{"method": "slim_lora"}], "finetune": {"stepz": 2}})


def test_slim_recipes_on_a_tiny_model(tiny_llama, text_file, tmp_path):
    from slimkit.api import compress
    from slimkit.state_io import load_state

    r = compress(str(tiny_llama), "slim", tmp_path / "o", calib=str(text_file), nsamples=8, seqlen=32,
                 eval_data=str(text_file), eval_tokens=128, progress=False)
    comp = r["compression"]
    assert all(l["rank"] > 0 for l in comp["layers"])
    assert comp["bits_by_part"]["adapters"] > 0
    tensors, meta = load_state(tmp_path / "o")
    name = "model.layers.0.self_attn.q_proj"
    assert meta["layers"][name]["adapters"]["bits"] == 4 and tensors[f"{name}.L"].shape == (64, 64)  # 0.1*64 padded to 128, capped at full rank


def test_adapter_finetuning_on_a_tiny_model(tiny_llama, text_file, tmp_path):
    import yaml

    from slimkit.api import compress
    from slimkit.state_io import load_state

    rec = load_recipe("slim-ft").to_dict()
    rec["finetune"] = {"steps": 6, "batch_size": 2, "lr": 1e-2, "warmup": 1}
    p = tmp_path / "ft.yaml"
    p.write_text(yaml.safe_dump(rec))
    r = compress(str(tiny_llama), str(p), tmp_path / "o", calib=str(text_file), nsamples=8, seqlen=32,
                 eval_data=None, progress=False)
    ft = r["finetune"]
    assert len(ft["loss"]) == 6 and all(x > 0 for x in ft["loss"])
    saved = json.loads((tmp_path / "o" / "report.json").read_text())
    assert saved["finetune"]["loss"] == ft["loss"]
    tensors, _ = load_state(tmp_path / "o")
    L = tensors["model.layers.0.self_attn.q_proj.L"]
    assert torch.allclose(absmax_quantize(L, 4, 128)[0], L, atol=1e-6)  # stored quantized
    # the saved model computes base + trained adapters
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    from slimkit.ops.quant import dequantize
    n = "model.layers.0.self_attn.q_proj"
    base = dequantize(tensors[f"{n}.codes"].float(), tensors[f"{n}.scale"], tensors[f"{n}.zero"].float())
    base = base * tensors[f"{n}.mask"]
    merged = base + (tensors[f"{n}.L"] @ tensors[f"{n}.R"]).T
    assert torch.allclose(m.model.layers[0].self_attn.q_proj.weight, merged, atol=1e-5)
