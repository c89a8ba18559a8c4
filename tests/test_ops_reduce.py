"""ops.reduce: the block loop's fast finiteness test and sum of squares give what the obvious forms give."""
import pytest
import torch

from slimkit.ops.reduce import all_finite, sum_squares

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_finite_is_isfinite_all(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 40, generator=g).to(dtype)
    assert all_finite(x)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[2, 49, 39] = bad
        assert not all_finite(y)
    both = x.clone()
    both[0, 0, 0], both[1, 1, 1] = float("inf"), -float("inf")  # inf + -inf: the sum is NaN, still caught
    assert not all_finite(both)
    huge = torch.full((64,), torch.finfo(dtype).max, dtype=dtype)  # every value finite, the sum overflows
    assert all_finite(huge)
    assert all_finite(torch.arange(10)) and all_finite(torch.zeros(0, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (7,), (5, 33), (2, 64, 96)])
def test_sum_squares_matches_fp64(dtype, shape):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    got = sum_squares(x)
    assert got.dtype == torch.float64 and got.dim() == 0
    want = x.double().square().sum()
    assert float(got) == pytest.approx(float(want), rel=1e-12 if dtype == torch.float64 else 1e-6)
    assert float(sum_squares(torch.zeros(0, 4, dtype=dtype))) == 0.0
