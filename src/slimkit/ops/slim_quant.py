"""SLiM-Quant: one symmetric scale for a whole matrix, its clip value chosen by minimising the
expected quantization error under the empirical density of |W| (SLiM, arXiv 2410.09615).

Objective for clip alpha with q bits (step d = alpha / 2^q), over a histogram of |W|:
    E(alpha) = sum_{x < alpha} pdf(x) (x - floor(x / d) d)^2 dx + sum_{x >= alpha} pdf(x) (x - alpha)^2 dx
Search: 11 coarse candidates (every tenth of the bins), then every bin between the neighbours
of the coarse minimum. The quantizer applied afterwards rounds (the objective floors): the
released code does so, and the published numbers come from it.
"""
from __future__ import annotations

import torch


def histogram(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (centres, pdf, width) of the density histogram of |W|."""
    a = W.detach().abs().flatten().to(torch.float64)
    bins = int(max(512, min(a.numel() / 1000, 20000)))
    top = a.max().item() or 1.0
    counts = torch.histc(a, bins=bins, min=0.0, max=top)
    width = top / bins
    pdf = counts / (counts.sum() * width)
    centres = (torch.arange(bins, dtype=torch.float64) + 0.5) * width
    return centres, pdf, torch.tensor(width, dtype=torch.float64)


def expected_error(alphas: torch.Tensor, centres: torch.Tensor, pdf: torch.Tensor, width, bits: int) -> torch.Tensor:
    """E(alpha) for every candidate in ``alphas`` (C,) -> (C,)."""
    x = centres[None, :]  # (1, B)
    a = alphas[:, None]  # (C, 1)
    d = a / 2**bits
    inside = (x - torch.floor(x / d) * d) ** 2
    outside = (x - a) ** 2
    err = torch.where(x < a, inside, outside) * pdf[None, :] * width
    return err.sum(1)


def search_alpha(W: torch.Tensor, bits: int) -> float:
    """The clip value alpha of SLiM-Quant for W at ``bits``."""
    centres, pdf, width = histogram(W)
    nb = centres.numel()
    coarse_idx = torch.linspace(0, nb - 1, 11).round().long()
    coarse = expected_error(centres[coarse_idx], centres, pdf, width, bits)
    best = int(coarse.argmin())
    lo = int(coarse_idx[max(best - 1, 0)])
    hi = int(coarse_idx[min(best + 1, len(coarse_idx) - 1)])
    fine_idx = torch.arange(lo, hi + 1)
    fine = expected_error(centres[fine_idx], centres, pdf, width, bits)
    return float(centres[fine_idx[int(fine.argmin())]])


def slim_scale(alpha: float, bits: int) -> float:
    """Step of the applied quantizer: Q = clamp(round(W (2^(q-1)-1) / alpha), -2^(q-1), 2^(q-1)-1)."""
    return alpha / (2 ** (bits - 1) - 1)
