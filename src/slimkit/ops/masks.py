"""Sparsity patterns and masks. A mask is a bool tensor, True where a weight is KEPT."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..errors import RecipeError


@dataclass(frozen=True)
class Sparsity:
    """Either N:M (N weights ZEROED in every M consecutive input columns of a row,
    SparseGPT's prunen:prunem; 2:4 keeps 2 of 4) or an unstructured ratio."""

    n: int = 0
    m: int = 0
    ratio: float = 0.0

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def density(self) -> float:
        return 1 - self.n / self.m if self.structured else 1 - self.ratio

    def describe(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"{self.ratio:.0%}"

    def check_width(self, in_features: int, where: str = "") -> None:
        if self.structured and in_features % self.m:
            raise RecipeError(f"{self.describe()} sparsity needs the input width to be a multiple of {self.m}, "
                              f"{where or 'a layer'} has {in_features}")


def parse_sparsity(value) -> Sparsity:
    """'2:4' -> N:M; 0.5, '50%', '0.5' -> unstructured ratio."""
    if isinstance(value, Sparsity):
        return value
    if isinstance(value, str) and ":" in value:
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", value)
        if not m:
            raise RecipeError(f"sparsity pattern {value!r} is not of the form N:M")
        n, mm = int(m.group(1)), int(m.group(2))
        if not (0 < n < mm <= 64):
            raise RecipeError(f"sparsity pattern {value!r} is out of range: need 0 < N < M <= 64")
        return Sparsity(n=n, m=mm)
    try:
        if isinstance(value, str) and value.strip().endswith("%"):
            ratio = float(value.strip()[:-1]) / 100
        else:
            ratio = float(value)
    except (TypeError, ValueError):
        raise RecipeError(f"sparsity {value!r} is neither N:M nor a ratio") from None
    if not (0 < ratio < 1) or math.isnan(ratio):
        raise RecipeError(f"sparsity ratio {value!r} must be strictly between 0 and 1")
    return Sparsity(ratio=ratio)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask zeroing the n lowest scores in every m consecutive columns of each row."""
    rows, cols = scores.shape
    s = scores.reshape(rows, cols // m, m)  # (rows, groups, m)
    drop = torch.topk(s, n, dim=2, largest=False).indices
    keep = torch.ones_like(s, dtype=torch.bool).scatter_(2, drop, False)
    return keep.reshape(rows, cols)


def row_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep-mask zeroing the lowest ``ratio`` fraction of each row."""
    rows, cols = scores.shape
    k = int(cols * ratio)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k:
        drop = torch.topk(scores, k, dim=1, largest=False).indices
        keep.scatter_(1, drop, False)
    return keep


def mask_from_scores(scores: torch.Tensor, sparsity: Sparsity) -> torch.Tensor:
    if sparsity.structured:
        return nm_mask(scores, sparsity.n, sparsity.m)
    return row_mask(scores, sparsity.ratio)


def is_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """True if every m consecutive columns of each row keep at most m - n weights."""
    rows, cols = mask.shape
    return bool((mask.reshape(rows, cols // m, m).sum(-1) <= m - n).all())
