"""Uniform integer quantization grids.

One grid idea covers per-channel and per-group quantization: a weight matrix
W (out, in) is cut along its input dimension into groups of ``group_size``
columns (the last group may be smaller when ``in`` is not a multiple), and every
(row, group) gets its own ``scale`` and ``zero``. ``group_size=None`` is one
group per row (per-channel).

Codes are stored unsigned, ``q in [0, 2^b - 1]``; the dequantized value is
``(q - zero) * scale``. Symmetric grids fix ``zero = 2^(b-1)`` (so the signed
code ``q - zero`` is in ``[-2^(b-1), 2^(b-1) - 1]``, as compressed-tensors
stores it) and use ``scale = 2 max|w| / (2^b - 1)``.  Asymmetric grids span
``[min(w, 0), max(w, 0)]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import RecipeError, is_number


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int | None = None  # None: per output channel
    symmetric: bool = False
    clip_search: bool = False  # search a per-row shrink of the range (GPTQ's "mse" grid)
    per_tensor: bool = False  # one scale for the whole matrix (stored per row, counted once)
    # search the shrink that minimises the importance-weighted squared error sum_j d_j (Q(w_j) - w_j)^2,
    # d the input's second moment (the Hessian diagonal; llm-compressor's imatrix_mse observer)
    weighted_search: bool = False
    # the range search's candidates: shrinks 1 - i / search_grid of the range for i < search_maxshrink *
    # search_grid, scored by |error|^search_norm (None: 2.4 for clip_search as GPTQ's, 2 for weighted_search)
    search_grid: int = 100
    search_maxshrink: float = 0.8
    search_norm: float | None = None

    def __post_init__(self):
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 2 <= self.bits <= 8:
            raise RecipeError(f"bits must be an integer from 2 to 8, got {self.bits!r}")
        if self.group_size is not None and (
            not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1
        ):
            raise RecipeError(f"group_size must be a positive integer or null (per-channel), got {self.group_size!r}")
        if self.weighted_search and self.clip_search:
            raise RecipeError("clip_search and weighted_search are two range searches: choose one")
        check_search(self.search_grid, self.search_maxshrink, self.search_norm)
        if not (self.clip_search or self.weighted_search) and (
                (self.search_grid, self.search_maxshrink, self.search_norm) != (100, 0.8, None)):
            raise RecipeError("search_grid, search_maxshrink and search_norm set a range search: "
                              "turn on weighted_search or clip_search")

    @property
    def norm(self) -> float:
        """The exponent of the range search's error."""
        if self.search_norm is not None:
            return float(self.search_norm)
        return 2.0 if self.weighted_search else 2.4

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def ngroups(self, in_features: int) -> int:
        g = self.group_size or in_features
        return -(-in_features // g)

    def group_width(self, in_features: int) -> int:
        return self.group_size or in_features

    def describe(self) -> str:
        g = "per-tensor" if self.per_tensor else f"g{self.group_size}" if self.group_size else "per-channel"
        return f"W{self.bits} {g} {'sym' if self.symmetric else 'asym'}"


def check_search(grid, maxshrink, norm) -> None:
    if not isinstance(grid, int) or isinstance(grid, bool) or not 1 <= grid <= 10_000:
        raise RecipeError(f"search_grid must be an integer from 1 to 10000, got {grid!r}")
    if not is_number(maxshrink) or not 0 < maxshrink <= 1:
        raise RecipeError(f"search_maxshrink must be a number in (0, 1], got {maxshrink!r}")
    if norm is not None and (not is_number(norm) or not 0 < norm <= 8):
        raise RecipeError(f"search_norm must be a number in (0, 8] or null, got {norm!r}")


def minmax_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for each row of ``w`` (rows, k), range including 0. Returns (rows,), (rows,)."""
    maxq = 2**bits - 1
    if symmetric:
        amax = w.abs().amax(dim=1)
        scale = 2 * amax / maxq
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
        return scale, zero
    wmin = w.amin(dim=1).clamp(max=0)
    wmax = w.amax(dim=1).clamp(min=0)
    scale = (wmax - wmin) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-wmin / scale)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (as float) of ``w`` on the grid; scale/zero broadcast against w."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero) * scale


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return dequantize(quantize(w, scale, zero, bits), scale, zero)


def search_params(
    w: torch.Tensor, bits: int, symmetric: bool, grid: int = 100, maxshrink: float = 0.8, norm: float = 2.4,
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max params with the per-row shrink factor that minimises sum_j d_j |Q(w_j) - w_j|^norm
    (d = ``importance`` (k,) of the columns, else 1). The shrink 1 (min-max itself) is a candidate,
    so the result never has a higher error than min-max."""
    best_s, best_z = minmax_params(w, bits, symmetric)
    best_err = torch.full((w.shape[0],), float("inf"), dtype=w.dtype, device=w.device)
    d = None if importance is None else importance.to(w.device, w.dtype)[None, :]
    for i in range(int(maxshrink * grid)):
        p = 1 - i / grid
        s, z = minmax_params(w * p, bits, symmetric)
        e = (fake_quantize(w, s[:, None], z[:, None], bits) - w).abs().pow(norm)
        err = (e if d is None else e * d).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z


def fit_group(w: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Params for one group of columns ``w`` (rows, k) -> (rows,), (rows,); ``importance`` (k,)
    weighs the columns' errors for ``weighted_search``."""
    if spec.weighted_search:
        if importance is None:
            raise RecipeError("weighted_search needs the input's second moments (calibration statistics)")
        return search_params(w, spec.bits, spec.symmetric, spec.search_grid, spec.search_maxshrink, spec.norm,
                             importance=importance)
    if spec.clip_search:
        return search_params(w, spec.bits, spec.symmetric, spec.search_grid, spec.search_maxshrink, spec.norm)
    return minmax_params(w, spec.bits, spec.symmetric)


def group_slices(in_features: int, group_size: int | None):
    """Column slices of the groups; the last one is ragged when in_features % group_size != 0."""
    g = group_size or in_features
    return [slice(s, min(s + g, in_features)) for s in range(0, in_features, g)]


def fit(W: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of every (row, group) of W (out, in) -> (out, G), (out, G); ``importance``
    (in,): the columns' weights for ``weighted_search``."""
    pairs = [fit_group(W[:, sl], spec, None if importance is None else importance[sl])
             for sl in group_slices(W.shape[1], spec.group_size)]
    return torch.stack([p[0] for p in pairs], 1), torch.stack([p[1] for p in pairs], 1)


def expand(params: torch.Tensor, in_features: int, group_size: int | None) -> torch.Tensor:
    """(out, G) per-group values -> (out, in) per-column values."""
    g = group_size or in_features
    return params.repeat_interleave(g, dim=1)[:, :in_features]


def quantize_matrix(W: torch.Tensor, scale, zero, spec: QuantSpec) -> torch.Tensor:
    """Integer codes (out, in) of W under per-group params."""
    k = W.shape[1]
    return quantize(W, expand(scale, k, spec.group_size), expand(zero, k, spec.group_size), spec.bits)


def fake_quantize_matrix(W: torch.Tensor, scale, zero, spec: QuantSpec) -> torch.Tensor:
    k = W.shape[1]
    s, z = expand(scale, k, spec.group_size), expand(zero, k, spec.group_size)
    return fake_quantize(W, s, z, spec.bits)
