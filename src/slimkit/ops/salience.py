"""SliM-LLM's pure tensor math: salience, salience-determined bit allocation (SBA),
salience-weighted quantizer calibration (SQC), mixed-width group grids, learnable clipping.

W is (out, in), cut along ``in`` into groups of ``group_size`` columns (the last group is
ragged when ``in`` is not a multiple). Every column group has one bit-width for all rows
(the "bit map", shape (G,)); every (row, group) has a scale and a zero point.

One grid formula serves every width: codes ``q = clamp(round(w / scale + zero), 0, 2^b - 1)``,
value ``(q - zero) * scale``. For b >= 2 the zero point is an integer (asymmetric min-max grid,
range including 0), so this equals ops.quant's ``round(w / scale) + zero``. A 1-bit group is
binarized per row, ``sign(w - m) * a + m`` with m = mean(w), a = mean|w - m|, which is the same
grid with scale 2a and the fractional zero (a - m) / 2a.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .quant import group_slices, minmax_params

NORM = 2.4  # SQC's error exponent


def weight_salience(W: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """delta_ij = W_ij^2 / Hinv_jj^2, with d = diag of the upper Cholesky factor of H^-1. (out, in)"""
    return W.square() / d.square()[None, :]


def group_salience(delta: torch.Tensor, group_size: int) -> torch.Tensor:
    """Sum of delta over every column group (all rows). (G,)"""
    return torch.stack([delta[:, sl].sum() for sl in group_slices(delta.shape[1], group_size)])


def clip_codes(q: torch.Tensor, maxq) -> torch.Tensor:
    """clamp(q, 0, maxq) for a number or a tensor ``maxq`` broadcasting against q."""
    return torch.minimum(q.clamp(min=0), torch.as_tensor(maxq, dtype=q.dtype, device=q.device))


def grid_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq) -> torch.Tensor:
    """clamp(round(w / scale + zero), 0, maxq); params broadcast against w."""
    return clip_codes(torch.round(w / scale + zero), maxq)


def grid_fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq) -> torch.Tensor:
    return (grid_codes(w, scale, zero, maxq) - zero) * scale


def binarize_params(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row binarization of w (rows, k) as a 1-bit grid: scale 2a, zero (a - m) / 2a. (rows,), (rows,)"""
    m = w.mean(dim=1)
    a = (w - m[:, None]).abs().mean(dim=1)
    scale = torch.where(a > 0, 2 * a, torch.ones_like(a))
    return scale, (a - m) / scale


def sqc_params(w: torch.Tensor, bits: int, weight: torch.Tensor | None = None, span: float = 0.1,
               steps: int = 101, norm: float = NORM, chunk_elems: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """SQC: per row of w (rows, k), scale the min-max range [min(w, 0), max(w, 0)] by each
    t in linspace(1 - span, 1 + span, steps) and keep the t with the lowest
    sum weight * |Q(w) - w|^norm. Plain min-max (t = 1) is the starting point, so the
    result is never worse than it. -> scale (rows,), zero (rows,)"""
    maxq = 2**bits - 1
    rows, k = w.shape
    best_s, best_z = minmax_params(w, bits, symmetric=False)
    best_err = _sqc_err(w, best_s[None, :, None], best_z[None, :, None], maxq, weight, norm)[0]  # (rows,)
    wmin = w.amin(dim=1).clamp(max=0)  # (rows,)
    wmax = w.amax(dim=1).clamp(min=0)
    ts = torch.linspace(1 - span, 1 + span, steps, dtype=w.dtype, device=w.device)
    per = max(1, chunk_elems // max(1, rows * k))
    rows_idx = torch.arange(rows, device=w.device)
    for c in range(0, steps, per):
        t = ts[c:c + per, None]  # (T, 1)
        scale = t * (wmax - wmin)[None, :] / maxq  # (T, rows)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-t * wmin[None, :] / scale)
        err = _sqc_err(w, scale[..., None], zero[..., None], maxq, weight, norm)  # (T, rows)
        e, i = err.min(dim=0)
        better = e < best_err
        best_err = torch.where(better, e, best_err)
        best_s = torch.where(better, scale[i, rows_idx], best_s)
        best_z = torch.where(better, zero[i, rows_idx], best_z)
    return best_s, best_z


def _sqc_err(w, scale, zero, maxq: int, weight, norm):
    """sum over k of weight * |Q(w) - w|^norm -> (T, rows), for params (T, rows, 1); in place for speed."""
    e = (w[None] / scale).add_(zero).round_().clamp_(0, maxq).sub_(zero).mul_(scale)  # (T, rows, k)
    e = e.sub_(w[None]).abs_().pow_(norm)
    if weight is not None:
        e = e * weight[None]
    return e.sum(dim=-1)


def salient_weights(delta: torch.Tensor, lam: float, z: float = 2.0) -> torch.Tensor | None:
    """SQC's error weights: lam where |z-score of delta| > z (within the group), else 1; None when lam == 1."""
    if lam == 1:
        return None
    std = delta.std()  # kept on the device: no host sync (this runs once per column group)
    zs = torch.where(std > 0, (delta - delta.mean()) / std, torch.zeros_like(delta))
    return torch.where(zs.abs() > z, torch.full_like(delta, lam), torch.ones_like(delta))


def minmax_group_fake_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The SBA search's quantizer for one group w (rows, k): asymmetric min-max, or binarization at 1 bit."""
    if bits == 1:
        s, z = binarize_params(w)
    else:
        s, z = minmax_params(w, bits, symmetric=False)
    return grid_fake_quantize(w, s[:, None], z[:, None], 2**bits - 1)


def softmax_kl(logits_hat: torch.Tensor, logits: torch.Tensor) -> float:
    """mean over tokens of KL(softmax(logits_hat) || softmax(logits)), softmax over the last dim."""
    return _softmax_kl(logits_hat, logits).item()


def _softmax_kl(logits_hat: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """softmax_kl as a 0-dim fp64 tensor on the logits' device (no host sync)."""
    lq = torch.log_softmax(logits_hat.double(), dim=-1)
    lp = torch.log_softmax(logits.double(), dim=-1)
    return (lq.exp() * (lq - lp)).sum(-1).mean()


def sba_ks(n_swappable: int) -> list[int]:
    """Candidate k: 1 .. G/2 - 1 (at least k = 1 when two groups can swap; none below two)."""
    if n_swappable < 2:
        return [0]
    return list(range(1, max(2, n_swappable // 2)))


def sba_bits(order: torch.Tensor, n_groups: int, bits: int, k: int) -> torch.Tensor:
    """Bit map (G,): ``order`` lists the swappable groups by salience, highest first; its top k get
    bits + 1, its bottom k bits - 1, every other group ``bits``."""
    bmap = torch.full((n_groups,), bits, dtype=torch.int64, device=order.device)
    if k:
        bmap[order[:k]] = bits + 1
        bmap[order[-k:]] = bits - 1
    return bmap


@dataclass
class Allocation:
    bits: torch.Tensor  # (G,) int64 bit-width of every column group
    k: int  # groups moved up (and down) by one bit
    kl: dict[int, float]  # KL of every candidate k


def sba_search(W: torch.Tensor, d: torch.Tensor, X: torch.Tensor, bits: int, group_size: int) -> Allocation:
    """Salience-determined bit allocation: rank the full-width groups by salience; for every
    candidate k move the top k up and the bottom k down one bit (the ragged last group, if any,
    keeps ``bits``, so the average over weights is exactly ``bits``); fake-quantize with min-max
    (binarization at 1 bit) and keep the k whose outputs on X (n, in) have the lowest
    KL(softmax(x W_hat^T) || softmax(x W^T)) over the output dimension, averaged over tokens.
    Outputs are updated incrementally, two group matmuls per k."""
    out, n_in = W.shape
    slices = group_slices(n_in, group_size)
    G = len(slices)
    full = [gi for gi, sl in enumerate(slices) if sl.stop - sl.start == group_size]
    gsal = group_salience(weight_salience(W, d), group_size)  # (G,)
    order = torch.tensor(full, dtype=torch.int64, device=W.device)
    if len(full):
        order = order[torch.argsort(gsal[order], descending=True, stable=True)]
    ks = sba_ks(len(full))
    X = X.to(torch.float32)
    Y = X @ W.T  # (n, out)
    Wb = torch.cat([minmax_group_fake_quantize(W[:, sl], bits) for sl in slices], dim=1)  # (out, in)
    Yhat = X @ Wb.T  # (n, out) every group at ``bits``
    if ks == [0]:
        return Allocation(sba_bits(order, G, bits, 0), 0, {0: softmax_kl(Yhat, Y)})
    order_list = order.tolist()  # host copy: no sync per candidate
    kl_t = []  # KLs stay on the device until the loop is done
    for k in range(1, ks[-1] + 1):
        for gi, b in ((order_list[k - 1], bits + 1), (order_list[-k], bits - 1)):
            sl = slices[gi]
            dW = minmax_group_fake_quantize(W[:, sl], b) - Wb[:, sl]  # (out, width)
            Yhat += X[:, sl] @ dW.T
        kl_t.append(_softmax_kl(Yhat, Y))
    kls: dict[int, float] = dict(zip(range(1, ks[-1] + 1), torch.stack(kl_t).tolist()))
    best = min(ks, key=lambda k: (kls[k], k))
    return Allocation(sba_bits(order, G, bits, best), best, kls)


class MixedGrid:
    """Per-group grid provider for ops.obs.obs_sweep: each column group has its own bit-width;
    b >= 2 groups are fitted by SQC, 1-bit groups binarized; fitted when the sweep reaches them."""

    def __init__(self, bits: torch.Tensor, d: torch.Tensor, group_size: int, lam: float = 1.0,
                 span: float = 0.1, steps: int = 101):
        self.bits = [int(b) for b in bits.tolist()]  # one host copy, not one sync per group
        self.d = d
        self.slices = group_slices(d.shape[0], group_size)
        self.lam, self.span, self.steps = lam, span, steps

    def fit(self, gi: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.bits[gi]
        if b == 1:
            return binarize_params(w)
        weight = None
        if self.lam != 1:
            weight = salient_weights(weight_salience(w, self.d[self.slices[gi]]), self.lam)
        return sqc_params(w, b, weight, self.span, self.steps)

    def fake_quantize(self, gi: int, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return grid_fake_quantize(w, scale, zero, 2 ** self.bits[gi] - 1)


def column_maxq(bits: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """(in,) largest code of every column under the bit map."""
    widths = torch.tensor([sl.stop - sl.start for sl in group_slices(in_features, group_size)], device=bits.device)
    return (2 ** bits.to(torch.int64) - 1).repeat_interleave(widths, output_size=in_features).to(torch.float32)


def mixed_codes(Wq: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """Integer codes (out, in) of a weight that sits on its mixed grid."""
    k = Wq.shape[1]
    s = scale.repeat_interleave(group_size, dim=1)[:, :k]
    z = zero.repeat_interleave(group_size, dim=1)[:, :k]
    return grid_codes(Wq, s, z, column_maxq(bits, k, group_size)[None, :])


def mixed_storage(bits: torch.Tensor, out_features: int, in_features: int, group_size: int,
                  kept: torch.Tensor | None = None) -> dict[str, int]:
    """Stored bits of a mixed-width grid: codes at each group's width (only kept weights when
    masked), an fp16 scale per (row, group), a zero point per (row, group) of the group's width
    (fp16 for binarized groups, whose zero is fractional), and the uint8 bit map."""
    widths = [sl.stop - sl.start for sl in group_slices(in_features, group_size)]
    values = zeros = 0
    kept_list = None if kept is None else [int(n) for n in kept.tolist()]  # one host copy, not one per group
    for gi, (b, w) in enumerate(zip(bits.tolist(), widths)):
        n = out_features * w if kept is None else kept_list[gi]
        values += n * b
        zeros += out_features * (16 if b == 1 else b)
    return {"values": values, "scales": out_features * len(widths) * 16, "zeros": zeros,
            "bitmap": len(widths) * 8}


def to_groups(W: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) -> (out, G, group_size), the ragged last group padded with zeros."""
    out, k = W.shape
    G = math.ceil(k / group_size)
    return torch.nn.functional.pad(W, (0, G * group_size - k)).view(out, G, group_size)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


def lwc_fake_quantize(Wg: torch.Tensor, theta_up: torch.Tensor, theta_low: torch.Tensor,
                      base_max: torch.Tensor, base_min: torch.Tensor, maxq: torch.Tensor):
    """Learnable weight clipping (OmniQuant style), differentiable through straight-through rounding.
    Wg (out, G, g) grouped weights; theta_*, base_* (out, G); maxq (G,). The clipped range is
    [sigmoid(theta_low) base_min, sigmoid(theta_up) base_max]. -> (values (out, G, g), scale, zero)"""
    xmax = torch.sigmoid(theta_up) * base_max  # (out, G)
    xmin = torch.sigmoid(theta_low) * base_min
    scale = ((xmax - xmin) / maxq[None, :]).clamp_min(1e-8)
    zero = round_ste(-xmin / scale)
    q = clip_codes(round_ste(Wg / scale[..., None]) + zero[..., None], maxq[None, :, None])
    return (q - zero[..., None]) * scale[..., None], scale, zero
