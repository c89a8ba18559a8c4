"""Conformance battery over every registered stage, on tiny Linear layers with synthetic statistics."""
import logging

import pytest
import torch

from slimkit.errors import NumericalError, RecipeError
from slimkit.methods import STAGES, LinearState, LinearStats, build_stage
from slimkit.ops.masks import is_nm, parse_sparsity
from slimkit.ops.obs import inverse_hessian, obs_sweep
from slimkit.ops.quant import QuantSpec, group_slices

from helpers import correlated_inputs

OUT, IN = 48, 128

# every registered stage runs with the representative configurations it declares
CASES = [(name, dict(cfg)) for name, cls in sorted(STAGES.items()) if not cls.model_level for cfg in cls.examples]


def test_every_stage_declares_examples():
    assert all(cls.examples for cls in STAGES.values())


@pytest.mark.parametrize("method,cfg", [c for c in CASES if not STAGES[c[0]].accepts_mask])
def test_mask_refusers_say_so(method, cfg):
    W, X, stats = layer()
    s = run({"method": "magnitude", "sparsity": "2:4"}, W, stats)
    with pytest.raises(RecipeError):
        run({"method": method, **cfg}, W, stats, state=s)


def layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(OUT, IN, generator=g)
    X = correlated_inputs(2048, IN, seed)
    stats = LinearStats(IN, want_hessian=True, sample_rows=1024)  # samples: for stages that score outputs
    stats.add(X.reshape(8, 256, IN))
    stats.finalize()
    return W, X, stats


def run(cfg, W, stats, state=None):
    stage = build_stage(cfg)
    if state is None:
        state = LinearState.from_weight("layer", W)
        for pre in type(stage).battery_prelude:
            state = build_stage(pre).run(state, stats)
    return stage.run(state, stats)


def out_err(W, Wq, X):
    return ((X @ (W - Wq).T).norm() / (X @ W.T).norm()).item()


@pytest.mark.parametrize("method,cfg", CASES)
def test_shape_finite_deterministic(method, cfg):
    W, X, stats = layer()
    a = run({"method": method, **cfg}, W, stats)
    _, _, stats2 = layer()
    b = run({"method": method, **cfg}, W, stats2)
    assert a.weight.shape == W.shape and torch.isfinite(a.weight).all()
    assert torch.equal(a.effective_weight(), b.effective_weight())
    assert torch.equal(a.original, W)  # the original is never modified
    assert 0 < out_err(W, a.effective_weight(), X) < 1


@pytest.mark.parametrize("method,cfg", [c for c in CASES if STAGES[c[0]].prunes])
def test_pruners_meet_their_pattern(method, cfg):
    W, X, stats = layer()
    s = run({"method": method, **cfg}, W, stats)
    assert s.mask is not None and torch.all(s.weight[~s.mask] == 0)
    if cfg["sparsity"] == "2:4":
        assert is_nm(s.mask, 2, 4) and is_nm(s.weight != 0, 2, 4)
        assert s.mask.float().mean().item() == 0.5
    else:
        assert abs(1 - s.mask.float().mean().item() - cfg["sparsity"]) < 0.01


@pytest.mark.parametrize("method,cfg", [c for c in CASES if build_stage({"method": c[0], **c[1]}).quantizes and
                                        not STAGES[c[0]].prunes and STAGES[c[0]].accepts_mask])
@pytest.mark.parametrize("pruner", ["magnitude", "wanda"])
def test_quantizers_keep_an_existing_mask(method, cfg, pruner):
    W, X, stats = layer()
    s = run({"method": pruner, "sparsity": "2:4"}, W, stats)
    mask = s.mask.clone()
    s = run({"method": method, **cfg}, W, stats, state=s)
    assert torch.equal(s.mask, mask)
    assert torch.all(s.weight[~mask] == 0)
    assert is_nm(s.weight != 0, 2, 4)


@pytest.mark.parametrize("method,cfg", [c for c in CASES if build_stage({"method": c[0], **c[1]}).quantizes
                                        and STAGES[c[0]].uniform_grid])
def test_quantized_weights_sit_on_their_grid(method, cfg):
    W, X, stats = layer()
    s = run({"method": method, **cfg}, W, stats)
    spec = s.quant
    Wg = s.weight / s.tensors["input_scale"][None, :] if "input_scale" in s.tensors else s.weight
    for gi, sl in enumerate(group_slices(IN, spec.group_size)):
        scale, zero = s.scale[:, gi:gi + 1], s.zero[:, gi:gi + 1]
        q = Wg[:, sl] / scale + zero
        assert torch.allclose(q, q.round(), atol=1e-3)
        kept = q if s.mask is None else q[s.mask[:, sl]]
        assert kept.round().min() >= 0 and kept.round().max() <= 2**spec.bits - 1


def hessian_error(W, Wq, H):
    D = W - Wq
    return torch.trace(D @ H @ D.T).item()


@pytest.mark.parametrize("bits,group", [(4, 32), (3, None), (2, 64), (4, 48)])
def test_gptq_beats_rtn_in_hessian_error(bits, group):
    W, X, stats = layer(1)
    g = run({"method": "gptq", "bits": bits, "group_size": group}, W, stats)
    r = run({"method": "rtn", "bits": bits, "group_size": group}, W, stats)
    assert hessian_error(W, g.weight, stats.hessian) < hessian_error(W, r.weight, stats.hessian)


@pytest.mark.parametrize("sparsity", ["2:4", 0.5, "4:8"])
def test_sparsegpt_beats_magnitude_at_same_budget(sparsity):
    W, X, stats = layer(2)
    s = run({"method": "sparsegpt", "sparsity": sparsity}, W, stats)
    m = run({"method": "magnitude", "sparsity": sparsity}, W, stats)
    assert abs(s.mask.sum().item() - m.mask.sum().item()) <= OUT  # same budget (per-block vs per-row rounding)
    assert hessian_error(W, s.weight, stats.hessian) < hessian_error(W, m.weight, stats.hessian)


def test_wanda_beats_magnitude_on_skewed_inputs():
    W, X, stats = layer(3)
    w = run({"method": "wanda", "sparsity": 0.5}, W, stats)
    m = run({"method": "magnitude", "sparsity": 0.5}, W, stats)
    assert out_err(W, w.weight, X) < out_err(W, m.weight, X)


def test_cholesky_failure_escalates_damping(caplog):
    X = correlated_inputs(8, 32)  # rank 8 < 32: singular Hessian
    H = 2 * X.T @ X / 8
    with caplog.at_level(logging.INFO, logger="slimkit.ops.obs"):
        inv = inverse_hessian(H, percdamp=0.0, name="singular")
    # undamped fails (fp32 and fp64); the first escalation from 0 is 1e-4 of mean diag H, enough here
    assert inv.damp == pytest.approx(1e-4) and torch.isfinite(inv.Hinv).all()
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warned] == ["singular: Cholesky needed damping 0.0001 (asked 0)"], caplog.text
    # and Hinv really is the upper factor of the inverse of the damped Hessian: U^T U (H + damp I) = I
    U = inv.Hinv.double()
    damped = H.double() + 1e-4 * H.double().diagonal().mean() * torch.eye(32, dtype=torch.float64)
    assert torch.equal(U, U.triu())
    assert (U.T @ U @ damped - torch.eye(32, dtype=torch.float64)).abs().max() < 1e-2


def test_dead_inputs_are_zeroed():
    W, X, _ = layer()
    X[:, 5] = 0
    stats = LinearStats(IN, want_hessian=True)
    stats.add(X)
    stats.finalize()
    s = run({"method": "gptq", "bits": 4, "group_size": 32}, W, stats)
    assert torch.all(s.weight[:, 5] == 0) and torch.isfinite(s.weight).all()


def test_nan_hessian_is_named():
    H = torch.eye(8)
    H[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="mylayer"):
        inverse_hessian(H, name="mylayer")


def test_nan_weight_is_named():
    W = torch.randn(4, 8)
    W[1, 2] = float("inf")
    with pytest.raises(NumericalError, match="q_proj"):
        LinearState.from_weight("q_proj", W)


@pytest.mark.parametrize("cfg,msg", [
    ({"method": "rtn", "bits": 1}, "bits"), ({"method": "rtn", "bits": 9}, "bits"),
    ({"method": "wanda", "sparsity": "5:4"}, "5:4"), ({"method": "rtn", "bitz": 4}, "bitz"),
    ({"method": "nope"}, "nope"), ({"method": "gptq", "percdamp": -1}, "percdamp"),
    ({"method": "rtn", "group_size": 0}, "group_size"), ("rtn", "mapping"),
])
def test_bad_stage_configs(cfg, msg):
    with pytest.raises(RecipeError, match=msg):
        build_stage(cfg)


def test_nm_needs_divisible_width():
    stage = build_stage({"method": "wanda", "sparsity": "2:4"})
    with pytest.raises(RecipeError, match="multiple of 4"):
        stage.check_layer("x", 8, 30)


def test_actorder_with_nm_refused():
    W, X, stats = layer()
    inv = stats.inverse(0.01, True, "layer")
    assert inv.perm is not None  # an act-order inverse
    # pruning N:M inside an act-order sweep would break the N:M runs: refused, whatever else is asked
    for quant in (None, QuantSpec(4, 32)):
        with pytest.raises(RecipeError, match="act-order cannot be combined with N:M"):
            obs_sweep(W, inv, quant=quant, sparsity=parse_sparsity("2:4"))
    # unstructured pruning in an act-order sweep is not refused
    res = obs_sweep(W, inv, sparsity=parse_sparsity(0.5))
    assert res.keep.sum().item() == OUT * IN // 2
    # an existing N:M mask is fine with act-order GPTQ: kept exactly, pruned weights stay zero
    s = run({"method": "wanda", "sparsity": "2:4"}, W, stats)
    mask = s.mask.clone()
    s = run({"method": "gptq", "bits": 4, "actorder": True}, W, stats, state=s)
    assert torch.equal(s.mask, mask) and is_nm(s.mask, 2, 4)
    assert torch.all(s.weight[~s.mask] == 0)


def test_bits_accounting():
    W, X, stats = layer()
    s = run({"method": "sparsegpt", "sparsity": "2:4", "bits": 4, "group_size": 32}, W, stats)
    # 48 x 128 = 6,144 weights, 3,072 kept at 4 bits = 12,288; a 2-bit position per kept value =
    # 6,144; 48 rows x 4 groups = 192 (row, group) grids: fp16 scales 3,072, 4-bit zeros 768
    assert (OUT, IN) == (48, 128)
    assert s.bits() == {"values": 12288, "mask": 6144, "scales": 3072, "zeros": 768}
    assert QuantSpec(4, 32).ngroups(IN) == 4 and QuantSpec(4, 48).ngroups(IN) == 3  # ragged last group


def test_input_sample_keeps_first_rows():
    X = correlated_inputs(300, 16)
    stats = LinearStats(16, want_hessian=False, sample_rows=250)
    stats.add(X[:200].reshape(2, 100, 16))
    stats.add(X[200:])
    stats.finalize()
    assert torch.equal(stats.sample, X[:250])


@pytest.mark.parametrize("actorder", [False, True])
def test_sweep_fits_weighted_groups_with_the_input_moments(actorder):
    """A weighted_search grid inside the sweep is fitted with the columns' second moments: with
    act-order (static groups) its scales are exactly the weighted fit of the initial weights."""
    from slimkit.ops.quant import fit

    W, X, stats = layer()
    spec = QuantSpec(3, 32, weighted_search=True)
    inv = stats.inverse(0.01, actorder, "layer")
    with pytest.raises(RecipeError, match="second moments"):
        obs_sweep(W, inv, quant=spec)
    res = obs_sweep(W, inv, quant=spec, importance=stats.act_norm)
    levels = (res.W[:, :32] / res.scale[:, :1]).round() - res.W[:, :32] / res.scale[:, :1]
    assert levels.abs().max() < 1e-3  # every weight on its group's grid
    if actorder:
        s, z = fit(W, spec, stats.act_norm)
        assert torch.equal(res.scale, s) and torch.equal(res.zero, z)
    else:  # groups fitted as the sweep reaches them: the first one sees the weights unchanged
        s, z = fit(W[:, :32], spec, stats.act_norm[:32])
        assert torch.equal(res.scale[:, :1], s) and torch.equal(res.zero[:, :1], z)
        s_plain, _ = fit(W, QuantSpec(3, 32, clip_search=True))
        assert not torch.equal(res.scale, s_plain)


def test_gptq_actorder_default_and_the_builtin_baselines():
    # the stage sweeps in act-order unless told otherwise (llm-compressor's default); the built-in gptq-*
    # recipes are the papers' natural-order baseline, their gptaq-* twins keep act-order
    from slimkit.recipe import builtin_recipes, load_recipe

    assert build_stage({"method": "gptq", "bits": 4}).actorder is True
    W, X, stats = layer()
    default = run({"method": "gptq", "bits": 4, "group_size": 32}, W, stats)
    natural = run({"method": "gptq", "bits": 4, "group_size": 32, "actorder": False}, W, stats)
    ordered = run({"method": "gptq", "bits": 4, "group_size": 32, "actorder": True}, W, stats)
    assert torch.equal(default.weight, ordered.weight) and not torch.equal(default.weight, natural.weight)
    plain = [n for n in builtin_recipes() if n.startswith("gptq-w")]
    assert len(plain) == 7
    for name in plain:
        (stage,) = load_recipe(name).stages
        assert stage.actorder is False, name
        (twin,) = load_recipe("gptaq-" + name.removeprefix("gptq-")).stages
        assert twin.actorder is True and twin.bits == stage.bits and twin.group_size == stage.group_size
    with pytest.raises(RecipeError, match="actorder must be true or false"):
        build_stage({"method": "gptq", "bits": 4, "actorder": "static"})


@pytest.mark.parametrize("method,cfg", CASES)
def test_record_estimate_bounds_the_record(method, cfg):
    """The disk check's estimate of a Linear's state record (the recipe's stages, prelude first) is
    at least the record's real size, and not far above it: at most a quarter more, except ReALLM,
    whose estimate counts its fp16 budget twice (the low-rank part is kept in fp32) and the fp32
    base weight whenever a rank above 0 is among its candidates."""
    from slimkit.methods.base import LayerPosition
    from slimkit.recipe import Recipe
    from slimkit.state_io import layer_record

    W, X, stats = layer()
    position = LayerPosition(0, 1)
    state = LinearState.from_weight("layer", W, position)
    stages = [*STAGES[method].battery_prelude, {"method": method, **cfg}]
    for st in stages:
        state = build_stage(st).run(state, stats)
    tensors, _ = layer_record(state)
    real = sum(v.numel() * v.element_size() for v in tensors.values())
    estimate = Recipe.from_dict({"stages": stages}).record_bytes("layer", OUT, IN, position)
    assert estimate >= real, (estimate, real)
    if method == "reallm":
        plain = 2 * cfg["bits"] * OUT * IN / 8 + 64 + (4 * OUT * IN if max(cfg.get("ranks", [0, 8])) else 0)
        assert estimate <= plain + 1
    else:
        assert estimate <= 1.25 * real, (estimate, real)
