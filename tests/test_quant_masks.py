import pytest
import torch

from slimkit.errors import RecipeError
from slimkit.ops.masks import is_nm, mask_from_scores, parse_sparsity
from slimkit.ops.quant import (QuantSpec, fake_quantize, fake_quantize_matrix, fit, group_slices, minmax_params,
                               quantize_matrix)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [None, 32, 48])  # 48 leaves a ragged last group of 100 columns
@pytest.mark.parametrize("sym", [False, True])
def test_grid_codes_and_levels(bits, group, sym):
    torch.manual_seed(0)
    W = torch.randn(16, 100)
    spec = QuantSpec(bits, group, sym)
    scale, zero = fit(W, spec)
    G = -(-100 // (group or 100))
    assert scale.shape == zero.shape == (16, G)
    q = quantize_matrix(W, scale, zero, spec)
    assert q.min() >= 0 and q.max() <= 2**bits - 1 and torch.equal(q, q.round())
    Wq = fake_quantize_matrix(W, scale, zero, spec)
    for sl in group_slices(100, group):
        for r in range(16):
            assert len(torch.unique(Wq[r, sl])) <= 2**bits
    # inside the representable range the error is at most half a step
    err = (Wq - W).abs()
    from slimkit.ops.quant import expand
    step = expand(scale, 100, group)
    if not sym:
        assert (err <= step / 2 + 1e-6).all()
    else:
        assert (err <= step + 1e-6).all()  # the extreme positive value may clip by one step


def test_ragged_last_group():
    assert [(s.start, s.stop) for s in group_slices(576, 128)][-1] == (512, 576)
    assert QuantSpec(4, 128).ngroups(576) == 5


def test_symmetric_zero_is_midpoint():
    scale, zero = fit(torch.randn(4, 64), QuantSpec(4, 32, True))
    assert torch.all(zero == 8)


def test_clip_search_no_worse_than_minmax():
    torch.manual_seed(1)
    W = torch.randn(32, 128) * torch.exp(torch.randn(32, 128))
    base = QuantSpec(3, 64)
    clipped = QuantSpec(3, 64, clip_search=True)
    e0 = (fake_quantize_matrix(W, *fit(W, base), base) - W).abs().pow(2.4).sum(1)
    e1 = (fake_quantize_matrix(W, *fit(W, clipped), clipped) - W).abs().pow(2.4).sum(1)
    assert (e1 <= e0 + 1e-5).all() and e1.sum() < e0.sum()


@pytest.mark.parametrize("bits", [1, 9, 0, 2.5, True])
def test_bits_out_of_range(bits):
    with pytest.raises(RecipeError):
        QuantSpec(bits)


@pytest.mark.parametrize("value", ["5:4", "0:4", "4:4", "a:b", "2:4:8", 0, 1.0, 1.5, "-10%", "x"])
def test_bad_sparsity(value):
    with pytest.raises(RecipeError):
        parse_sparsity(value)


def test_parse_sparsity():
    assert parse_sparsity("2:4").n == 2 and parse_sparsity("2:4").m == 4
    assert parse_sparsity("50%").ratio == 0.5 and parse_sparsity(0.3).ratio == 0.3
    assert parse_sparsity("1:8").density == 7 / 8


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_nm_mask_exact(pattern):
    sp = parse_sparsity(pattern)
    scores = torch.rand(8, 64)
    keep = mask_from_scores(scores, sp)
    groups = keep.reshape(8, -1, sp.m).sum(-1)
    assert torch.all(groups == sp.m - sp.n)
    assert is_nm(keep, sp.n, sp.m)
    # the dropped scores are the lowest of each run
    s = scores.reshape(8, -1, sp.m)
    k = keep.reshape(8, -1, sp.m)
    assert torch.all((s * ~k).amax(-1) <= s.masked_fill(~k, float("inf")).amin(-1))


def test_row_mask_ratio():
    keep = mask_from_scores(torch.rand(5, 100), parse_sparsity(0.3))
    assert torch.all(keep.sum(1) == 70)


def _weighted_group_errors(W, spec, imp):
    """(out, G) importance-weighted squared error of every (row, group) under ``spec``'s fit."""
    s, z = fit(W, spec, imp)
    e = (fake_quantize_matrix(W, s, z, spec) - W) ** 2 * imp[None, :]
    return torch.stack([e[:, sl].sum(1) for sl in group_slices(W.shape[1], spec.group_size)], 1)


@pytest.mark.parametrize("bits,group,sym", [(2, 16, False), (3, 32, True), (4, 24, False), (4, None, True)])
def test_weighted_search_never_worse_than_minmax_on_any_group(bits, group, sym):
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(48, 96, generator=g) * torch.exp(torch.randn(96, generator=g))[None, :]
    imp = torch.exp(2 * torch.randn(96, generator=g))  # uneven second moments, as real inputs have
    weighted = _weighted_group_errors(W, QuantSpec(bits, group, sym, weighted_search=True), imp)
    minmax = _weighted_group_errors(W, QuantSpec(bits, group, sym), imp)
    unweighted = _weighted_group_errors(W, QuantSpec(bits, group, sym, clip_search=True), imp)
    assert (weighted <= minmax * (1 + 1e-6)).all()
    assert weighted.sum() < 0.95 * minmax.sum()  # the search does find better ranges
    assert weighted.sum() < unweighted.sum()  # and the weights matter


def test_weighted_search_needs_importance_and_excludes_clip_search():
    with pytest.raises(RecipeError, match="choose one"):
        QuantSpec(4, 32, clip_search=True, weighted_search=True)
    with pytest.raises(RecipeError, match="second moments"):
        fit(torch.randn(4, 32), QuantSpec(4, 32, weighted_search=True))


def test_rtn_weighted_search_asks_for_calibration_statistics():
    from slimkit.methods import build_stage

    assert build_stage({"method": "rtn", "bits": 4}).needs == frozenset()
    assert build_stage({"method": "rtn", "bits": 4, "weighted_search": True}).needs == {"act_norm"}


def _group_errors(W, spec, imp, norm):
    """(out, G) sum of d_j |e_j|^norm of every (row, group) under ``spec``'s fit."""
    s, z = fit(W, spec, imp)
    e = (fake_quantize_matrix(W, s, z, spec) - W).abs() ** norm * imp[None, :]
    return torch.stack([e[:, sl].sum(1) for sl in group_slices(W.shape[1], spec.group_size)], 1)


@pytest.mark.parametrize("grid,maxshrink,norm", [(20, 1.0, 3.0), (50, 0.5, 4.0), (100, 0.8, 1.5)])
def test_search_options_choose_the_best_of_their_candidates(grid, maxshrink, norm):
    """search_grid / search_maxshrink / search_norm: every (row, group) gets the shrink 1 - i/grid
    (i < maxshrink * grid) of lowest sum d_j |e_j|^norm, found by brute force here."""
    g = torch.Generator().manual_seed(grid)
    W = torch.randn(16, 64, generator=g) * torch.exp(torch.randn(64, generator=g))[None, :]
    imp = torch.exp(2 * torch.randn(64, generator=g))
    spec = QuantSpec(2, 32, weighted_search=True, search_grid=grid, search_maxshrink=maxshrink, search_norm=norm)
    found = _group_errors(W, spec, imp, norm)
    best = torch.full_like(found, float("inf"))
    for i in range(int(maxshrink * grid)):
        for gi, sl in enumerate(group_slices(64, 32)):
            s, z = minmax_params(W[:, sl] * (1 - i / grid), 2, False)
            e = ((fake_quantize(W[:, sl], s[:, None], z[:, None], 2) - W[:, sl]).abs() ** norm * imp[sl]).sum(1)
            best[:, gi] = torch.minimum(best[:, gi], e)
    torch.testing.assert_close(found, best, rtol=1e-5, atol=0)
    # the exponent matters: the fit under another norm scores worse under this one
    other = _group_errors(W, QuantSpec(2, 32, weighted_search=True, search_grid=grid, search_maxshrink=maxshrink,
                                       search_norm=2.0 if norm != 2.0 else 3.0), imp, norm)
    assert (found <= other * (1 + 1e-6)).all() and found.sum() < other.sum()


def test_search_options_are_checked_on_construction():
    from slimkit.methods import build_stage

    assert QuantSpec(4, 32, weighted_search=True).norm == 2.0 and QuantSpec(4, 32, clip_search=True).norm == 2.4
    with pytest.raises(RecipeError, match="turn on weighted_search or clip_search"):
        QuantSpec(4, 32, search_norm=3.0)
    for bad in ({"search_grid": 0}, {"search_grid": 2.5}, {"search_maxshrink": 0}, {"search_maxshrink": 1.5},
                {"search_norm": -1}, {"search_norm": True}):
        with pytest.raises(RecipeError, match=next(iter(bad))):
            QuantSpec(4, 32, weighted_search=True, **bad)
        with pytest.raises(RecipeError, match=next(iter(bad))):
            build_stage({"method": "gptq", "bits": 4, "weighted_search": True} | bad)
    st = build_stage({"method": "sparsegpt", "sparsity": "2:4", "bits": 4, "weighted_search": True, "search_norm": 3})
    assert st.quant_spec().norm == 3.0 and build_stage({"method": "sparsegpt", "sparsity": "2:4"}).quant_spec() is None
