"""Low-rank compensation: weighted SVD of a compression error, and AbsMax-quantized adapters."""
from __future__ import annotations

import torch


def weighted_lowrank(E: torch.Tensor, d: torch.Tensor | None, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapters L (in, r), R (r, out) with (L R)^T the best rank-r approximation of E (out, in)
    in the norm ||(E - (L R)^T) diag(d)||_F (d=None: unweighted, Naive-LoRA).

    SVD of E diag(d) = U S V^T; L = diag(d)^-1 V_r S_r, R = U_r^T, so x (L R) approximates x E^T.
    """
    Ew = E if d is None else E * d[None, :]  # (out, in)
    U, S, Vh = torch.linalg.svd(Ew.to(torch.float64), full_matrices=False)
    r = min(rank, S.numel())
    L = Vh[:r].T * S[:r][None, :]  # (in, r)
    if d is not None:
        L = L / d.to(torch.float64)[:, None]
    R = U[:, :r].T  # (r, out)
    return L.to(torch.float32), R.to(torch.float32)


def hessian_lowrank(E: torch.Tensor, H: torch.Tensor, rank: int, percdamp: float = 0.01
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapters minimising the OUTPUT error tr((E - M) H (E - M)^T), M = (L R)^T, over rank-r M.

    With H + damp I = C C^T (Cholesky), the problem is min ||(E - M) C||_F: SVD of E C = U S V^T,
    M = U_r S_r V_r^T C^-1, i.e. L = C^-T V_r S_r (a triangular solve), R = U_r^T.
    """
    H = H.to(torch.float64)
    damp = percdamp * torch.diag(H).mean().clamp_min(1e-12)
    C = torch.linalg.cholesky(H + damp * torch.eye(H.shape[0], dtype=H.dtype, device=H.device))  # (in, in) lower
    U, S, Vh = torch.linalg.svd(E.to(torch.float64) @ C, full_matrices=False)
    r = min(rank, S.numel())
    L = torch.linalg.solve_triangular(C.T, Vh[:r].T * S[:r][None, :], upper=True)  # (in, r)
    return L.to(torch.float32), U[:, :r].T.contiguous().to(torch.float32)


def saliency_diag(act_norm: torch.Tensor) -> torch.Tensor:
    """sqrt of the activation statistic, shifted by its smallest positive value so no entry is 0."""
    a = act_norm.to(torch.float64)
    pos = a > 0  # smallest positive entry without a data-dependent shape (no host sync)
    shift = torch.where(pos.any(), torch.where(pos, a, torch.inf).amin(),
                        torch.tensor(1.0, dtype=torch.float64, device=a.device))
    return (a + shift).sqrt().to(torch.float32)


def absmax_quantize(M: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric AbsMax fake-quantization of M (rows, cols) in groups of ``group`` consecutive
    entries along dim 0. -> (dequantized M, scales (ceil(rows / group), cols))."""
    rows, cols = M.shape
    qmax = 2 ** (bits - 1) - 1
    G = -(-rows // group)
    pad = G * group - rows
    Mp = torch.cat([M, M.new_zeros(pad, cols)]) if pad else M
    blocks = Mp.reshape(G, group, cols)  # (G, group, cols)
    scale = blocks.abs().amax(dim=1) / qmax  # (G, cols)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(blocks / scale[:, None, :]), -qmax, qmax)
    return (q * scale[:, None, :]).reshape(G * group, cols)[:rows], scale


def resolve_rank(rank: float | int, out_features: int, in_features: int, pad_to: int | None) -> int:
    """A ratio of min(out, in) (floored) or an absolute rank, rounded up to a multiple of pad_to."""
    full = min(out_features, in_features)
    r = int(rank * full) if isinstance(rank, float) else int(rank)
    r = max(1, min(r, full))
    if pad_to:
        r = min(-(-r // pad_to) * pad_to, full) if r < full else full
    return r
