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
    centres = (torch.arange(bins, dtype=torch.float64, device=a.device) + 0.5) * width
    return centres, pdf, torch.tensor(width, dtype=torch.float64, device=a.device)


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
    coarse_idx = torch.linspace(0, nb - 1, 11).round().long()  # host side: 11 bin indices
    coarse = expected_error(centres[coarse_idx.to(centres.device)], centres, pdf, width, bits)
    best = int(coarse.argmin())
    idx = coarse_idx.tolist()
    lo = idx[max(best - 1, 0)]
    hi = idx[min(best + 1, len(idx) - 1)]
    fine_idx = torch.arange(lo, hi + 1, device=centres.device)
    fine = expected_error(centres[fine_idx], centres, pdf, width, bits)
    return float(centres[lo + int(fine.argmin())])


def slim_scale(alpha: float, bits: int) -> float:
    """Step of the applied quantizer: Q = clamp(round(W (2^(q-1)-1) / alpha), -2^(q-1), 2^(q-1)-1)."""
    return alpha / (2 ** (bits - 1) - 1)
