"""GPTQ / OPTQ: quantize column by column, compensating each error with the inverse Hessian."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import RecipeError
from ..ops.obs import obs_sweep
from .base import HESSIAN, LinearState, LinearStats, QuantFields, Stage, register


@dataclass
class SweepFields:
    percdamp: float = 0.01
    blocksize: int = 128

    def check_sweep(self):
        if not (0 <= self.percdamp < 10):
            raise RecipeError(f"percdamp must be in [0, 10), got {self.percdamp!r}")
        if not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise RecipeError(f"blocksize must be a positive integer, got {self.blocksize!r}")


@register
@dataclass
class GPTQ(SweepFields, QuantFields, Stage):
    name = "gptq"
    needs = frozenset({HESSIAN})
    quantizes = True
    requantizes = True
    examples = ({"bits": 4, "group_size": 32}, {"bits": 3, "group_size": 48, "actorder": True},
                {"bits": 3, "group_size": 16, "weighted_search": True, "actorder": True})
    actorder: bool = False

    def __post_init__(self):
        self.quant_spec()
        self.check_sweep()

    def apply(self, state: LinearState, stats: LinearStats) -> LinearState:
        spec = self.quant_spec()
        inv = stats.inverse(self.percdamp, self.actorder, state.name)
        importance = stats.act_norm if spec.weighted_search else None  # proportional to diag(H)

        def requantize(target, mask):
            res = obs_sweep(target, inv, quant=spec, mask=mask, blocksize=self.blocksize, importance=importance)
            return res.W, res.scale, res.zero

        state.weight, state.scale, state.zero = requantize(state.weight, state.mask)
        state.quant, state.requantize = spec, requantize
        state.notes["damp"] = inv.damp
        return state
