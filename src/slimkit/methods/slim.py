"""SLiM (arXiv 2410.09615): SLiM-Quant (per-tensor, probabilistic clip search), optional
outlier-channel scaling (SLiM-Quant^O), and saliency-weighted low-rank compensation
(SLiM-LoRA, optionally with 4-bit AbsMax adapters) with a re-fit of the base weight.

The paper's pipeline is the recipe [slim_quant, wanda, slim_lora]: quantize first, prune with
Wanda masks from the ORIGINAL weight, then compensate W - mask * Q(W) with adapters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import RecipeError, is_number
from ..ops.lowrank import absmax_quantize, hessian_lowrank, resolve_rank, saliency_diag, weighted_lowrank
from ..ops.quant import QuantSpec, fake_quantize
from ..ops.slim_quant import search_alpha, slim_scale
from .base import ACT_NORM, HESSIAN, LinearState, LinearStats, Stage, register

SALIENCY = {"activation": frozenset({ACT_NORM}), "none": frozenset(), "hessian": frozenset({HESSIAN})}


def _check_bits(bits, what="bits", lo=2, hi=8):
    if not isinstance(bits, int) or isinstance(bits, bool) or not lo <= bits <= hi:
        raise RecipeError(f"{what} must be an integer from {lo} to {hi}, got {bits!r}")


@register
@dataclass
class SlimQuant(Stage):
    """Symmetric per-tensor quantization with SLiM-Quant's clip value. ``outliers`` > 0 is
    SLiM-Quant^O: that fraction of input channels (top by a_j * sum_i |W_ij|) is doubled before
    quantization and halved after; the halving is stored as ``input_scale`` with the layer."""

    name = "slim_quant"
    quantizes = True
    requantizes = True
    examples = ({"bits": 4}, {"bits": 3, "outliers": 0.02})
    bits: int = 4
    outliers: float = 0.0

    def __post_init__(self):
        _check_bits(self.bits)
        if not (0 <= self.outliers < 0.5):
            raise RecipeError(f"outliers must be a fraction in [0, 0.5), got {self.outliers!r}")

    @property
    def needs(self):  # type: ignore[override]
        return frozenset({ACT_NORM}) if self.outliers else frozenset()

    def record_bytes(self, name: str, out_features: int, in_features: int, position=None) -> dict[str, int]:
        """uint8 codes, a per-row fp32 scale and uint8 zero point; SLiM-Quant^O's fp32 input scale."""
        grid = {"codes": out_features * in_features, "scale": 4 * out_features, "zero": out_features}
        return grid | ({"input_scale": 4 * in_features} if self.outliers else {})

    def apply(self, state: LinearState, stats: LinearStats | None) -> LinearState:
        out, k = state.weight.shape
        spec = QuantSpec(self.bits, None, symmetric=True, per_tensor=True)
        dev = state.weight.device
        col = torch.ones(k, device=dev)
        if self.outliers:
            n = max(1, math.ceil(self.outliers * k))
            score = stats.act_norm * state.original.abs().sum(0)  # (in,)
            col[torch.topk(score, n).indices] = 2.0
            state.tensors["input_scale"] = 1.0 / col
            state.extra_bits["outlier_index"] = n * 16

        def requantize(target: torch.Tensor, mask: torch.Tensor | None):
            alpha = search_alpha(target if mask is None else target[mask], self.bits)  # before the scaling
            s = torch.full((out, 1), slim_scale(alpha, self.bits), device=dev)
            z = torch.full((out, 1), float(2 ** (self.bits - 1)), device=dev)
            Wq = fake_quantize(target * col[None, :], s, z, self.bits) / col[None, :]
            return (Wq if mask is None else Wq * mask), s, z

        state.weight, state.scale, state.zero = requantize(state.weight, state.mask)
        state.quant, state.requantize = spec, requantize
        state.notes["grid"] = f"SLiM-Quant W{self.bits} per-tensor" + (f" +{self.outliers:.0%} outliers" if self.outliers else "")
        return state


@register
@dataclass
class SlimLoRA(Stage):
    """Low-rank compensation of the compression error E = W - W_c.

    saliency="activation" (SLiM-LoRA): SVD of E diag(d), d = sqrt(a + min positive a),
    L = diag(d)^-1 V_r S_r; "none": Naive-LoRA, SVD of E; "hessian": the exact minimiser of the
    layer's output error tr(E' H E'^T) with the full input covariance (slimkit's extension). Adapters optionally AbsMax-quantized (``adapter_bits``,
    groups of ``adapter_group`` along the first dimension of L and R). With ``refit`` the base is
    re-quantized to mask * (W - (L R)^T) by the quantizing stage's grid family (a fresh clip).

    ``iterations`` > 1 alternates the two fits (LoftQ-style): adapters of the current base's error,
    then the base re-fit to W - (L R)^T, and again. Neither step is exact for the other's objective
    (the adapters are rounded to their grid; GPTQ's re-fit minimises the output error, which is the
    adapters' own objective only with saliency "hessian"), so the stage scores every round by the
    adapters' objective and keeps the best: never worse than one round. It needs the recipe's last
    quantizing stage to leave a re-fit (rtn, gptq, slim_quant, sparsegpt with bits). With
    ``reselect_mask`` (iterations >= 2) the re-fits after the first also choose the sparsity mask
    again (same pattern), jointly with the grid, for the weight that the adapters leave to the base;
    the last quantizing stage must be SparseGPT with ``bits``."""

    name = "slim_lora"
    makes_adapters = True
    examples = ({"rank": 0.25, "pad_to": None}, {"rank": 16, "adapter_bits": None, "saliency": "none"},
                {"rank": 0.1, "adapter_bits": 4, "adapter_group": 32, "pad_to": 16, "saliency": "hessian"},
                {"rank": 8, "pad_to": None, "saliency": "hessian", "iterations": 2})
    battery_prelude = ({"method": "rtn", "bits": 3, "group_size": 32},)
    rank: float | int = 0.1
    saliency: str = "activation"
    adapter_bits: int | None = 4
    adapter_group: int = 128
    pad_to: int | None = 128
    refit: bool = True
    iterations: int = 1
    reselect_mask: bool = False

    def __post_init__(self):
        if not isinstance(self.iterations, int) or isinstance(self.iterations, bool) or not 1 <= self.iterations <= 100:
            raise RecipeError(f"iterations must be an integer from 1 to 100, got {self.iterations!r}")
        if (self.iterations > 1 or self.reselect_mask) and not self.refit:
            raise RecipeError("iterations > 1 and reselect_mask re-fit the base: they need refit: true")
        if self.reselect_mask and self.iterations < 2:
            raise RecipeError("reselect_mask acts in the re-fits after the first: it needs iterations >= 2")
        if self.saliency not in SALIENCY:
            raise RecipeError(f"saliency must be one of {', '.join(SALIENCY)}, got {self.saliency!r}")
        if not is_number(self.rank):
            raise RecipeError(f"rank must be a ratio in (0, 1] or a positive integer, got {self.rank!r}")
        if isinstance(self.rank, float) and not 0 < self.rank <= 1:
            raise RecipeError(f"a rank ratio must be in (0, 1], got {self.rank!r}")
        if isinstance(self.rank, int) and self.rank < 1:
            raise RecipeError(f"rank must be positive, got {self.rank!r}")
        if self.adapter_bits is not None:
            _check_bits(self.adapter_bits, "adapter_bits")
        for key in ("adapter_group", "pad_to"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise RecipeError(f"{key} must be a positive integer, got {v!r}")

    @property
    def needs(self):  # type: ignore[override]
        return SALIENCY[self.saliency]

    @property
    def needs_reprune(self) -> bool:  # type: ignore[override]
        return self.reselect_mask

    @property
    def needs_requantize(self) -> bool:  # type: ignore[override]
        return self.iterations > 1

    def record_bytes(self, name: str, out_features: int, in_features: int, position=None) -> dict[str, int]:
        """fp32 L (in, r) and R (r, out); and the fp32 base weight, which the record holds when no
        stage put the base on a uniform grid (``Recipe.record_bytes`` drops it when one did)."""
        r = resolve_rank(self.rank, out_features, in_features, self.pad_to)
        return {"L": 4 * in_features * r, "R": 4 * r * out_features, "weight": 4 * out_features * in_features}

    def apply(self, state: LinearState, stats: LinearStats | None) -> LinearState:
        W = state.target
        out, k = W.shape
        r = resolve_rank(self.rank, out, k, self.pad_to)
        if self.reselect_mask and state.reprune is None:
            raise RecipeError(f"{state.name}: reselect_mask needs a base pruned and quantized by SparseGPT with bits")
        refit = self.refit and state.requantize is not None
        d = saliency_diag(stats.act_norm) if self.saliency == "activation" else None
        best = None  # (objective, weight, mask, scale, zero, L, R): the best round of the alternation
        for it in range(self.iterations if refit else 1):
            E = W - state.weight
            if self.saliency == "hessian":
                L, R = hessian_lowrank(E, stats.hessian, r)
            else:
                L, R = weighted_lowrank(E, d, r)  # (in, r), (r, out)
            if self.adapter_bits is not None:
                L, _ = absmax_quantize(L, self.adapter_bits, self.adapter_group)
                R, _ = absmax_quantize(R, self.adapter_bits, self.adapter_group)
            if refit:
                target = W - (L @ R).T
                if self.reselect_mask and it > 0:  # round 1 keeps the mask: the best round is never worse than it
                    state.weight, state.mask, state.scale, state.zero = state.reprune(target)
                else:
                    state.weight, state.scale, state.zero = state.requantize(target, state.mask)
            if refit and self.iterations > 1:
                obj = self._objective(target - state.weight, stats, d)
                if best is None or obj < best[0]:
                    best = (obj, state.weight, state.mask, state.scale, state.zero, L, R)
        if best is not None:
            _, state.weight, state.mask, state.scale, state.zero, L, R = best
        state.L, state.R = L, R
        state.adapter_bits, state.adapter_group = self.adapter_bits, self.adapter_group
        return state

    def _objective(self, E: torch.Tensor, stats: LinearStats | None, d: torch.Tensor | None) -> float:
        """What the adapters minimise, for the error E left by base and adapters together: the
        output error tr(E H E^T) (hessian), ||E diag(d)||^2 (activation) or ||E||^2 (none)."""
        if self.saliency == "hessian":
            return float(((E @ stats.hessian) * E).sum())
        return float((E if d is None else E * d[None, :]).square().sum())
