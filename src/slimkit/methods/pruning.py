"""Pruning stages: magnitude, Wanda and SparseGPT (optionally with joint quantization)."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import RecipeError
from ..ops.masks import mask_from_scores, parse_sparsity
from ..ops.obs import obs_sweep
from ..ops.quant import QuantSpec
from .base import ACT_NORM, HESSIAN, LinearState, LinearStats, QuantFields, Stage, register
from .gptq import AimFields, SweepFields


@dataclass
class PruneFields:
    sparsity: str | float = "2:4"

    def pattern(self):
        return parse_sparsity(self.sparsity)

    def check_layer(self, name, out_features, in_features):
        self.pattern().check_width(in_features, name)

    def record_bytes(self, name: str, out_features: int, in_features: int, position=None) -> dict[str, int]:
        return {"mask": out_features * in_features}  # uint8


class ScorePruner(PruneFields, Stage):
    """Masks from a score of the ORIGINAL weight; the mask is applied to the current weight."""

    prunes = True

    def __post_init__(self):
        self.pattern()

    def scores(self, state: LinearState, stats: LinearStats | None):
        raise NotImplementedError

    def apply(self, state: LinearState, stats) -> LinearState:
        if state.mask is not None:
            raise RecipeError(f"{state.name} is already pruned; a recipe prunes once")
        pattern = self.pattern()
        keep = mask_from_scores(self.scores(state, stats), pattern)
        state.mask, state.sparsity = keep, pattern
        state.weight = state.weight * keep
        return state


@register
@dataclass
class Magnitude(ScorePruner):
    name = "magnitude"
    examples = ({"sparsity": "2:4"}, {"sparsity": 0.5})

    def scores(self, state, stats):
        return state.original.abs()


@register
@dataclass
class Wanda(ScorePruner):
    name = "wanda"
    examples = ({"sparsity": "2:4"}, {"sparsity": 0.5})
    needs = frozenset({ACT_NORM})

    def scores(self, state, stats):
        return state.original.abs() * stats.act_norm.sqrt()[None, :]  # (out, in)


@register
@dataclass
class SparseGPT(SweepFields, AimFields, PruneFields, QuantFields, Stage):
    """SparseGPT; with ``bits`` set it quantizes jointly in the same sweep (SparseGPT + OPTQ)."""

    name = "sparsegpt"
    examples = ({"sparsity": "2:4"}, {"sparsity": 0.5, "bits": 4, "group_size": 32})
    prunes = True
    bits: int | None = None  # QuantFields' grid, joint with the pruning; None: prune only

    def record_bytes(self, name: str, out_features: int, in_features: int, position=None) -> dict[str, int]:
        grid = QuantFields.record_bytes(self, name, out_features, in_features) if self.bits is not None else {}
        return PruneFields.record_bytes(self, name, out_features, in_features) | grid

    def __post_init__(self):
        self.pattern()
        self.check_sweep()
        self.check_aim()
        self.quant_spec()

    @property
    def quantizes(self) -> bool:  # type: ignore[override]
        return self.bits is not None

    @property
    def reprunes(self) -> bool:  # type: ignore[override]
        return self.bits is not None

    @property
    def requantizes(self) -> bool:  # type: ignore[override]
        return self.bits is not None

    def quant_spec(self) -> QuantSpec | None:
        if self.bits is None:
            return None
        return QuantFields.quant_spec(self)

    def apply(self, state: LinearState, stats: LinearStats) -> LinearState:
        if state.mask is not None:
            raise RecipeError(f"{state.name} is already pruned; a recipe prunes once")
        spec, pattern = self.quant_spec(), self.pattern()
        inv = stats.inverse(self.percdamp, False, state.name)
        importance = stats.act_norm if spec is not None and spec.weighted_search else None
        self.aim(state, stats, inv)
        res = obs_sweep(state.weight, inv, quant=spec, sparsity=pattern, blocksize=self.blocksize,
                        importance=importance)
        state.weight, state.mask, state.sparsity = res.W, res.keep, pattern
        if spec is not None:
            def requantize(target, mask):  # GPTQ on a fixed mask
                r = obs_sweep(target, inv, quant=spec, mask=mask, blocksize=self.blocksize, importance=importance)
                return r.W, r.scale, r.zero

            def reprune(target):  # the joint sweep again: a new mask of the same pattern
                r = obs_sweep(target, inv, quant=spec, sparsity=pattern, blocksize=self.blocksize,
                              importance=importance)
                return r.W, r.keep, r.scale, r.zero

            state.quant, state.scale, state.zero = spec, res.scale, res.zero
            state.requantize, state.reprune = requantize, reprune
        state.notes["damp"] = inv.damp
        return state
