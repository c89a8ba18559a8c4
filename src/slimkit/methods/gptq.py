"""GPTQ / OPTQ: quantize column by column, compensating each error with the inverse Hessian."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import RecipeError, is_number, require_bools
from ..ops.obs import dense_target, obs_sweep
from .base import DENSE_CROSS, HESSIAN, LinearState, LinearStats, QuantFields, Stage, register


@dataclass
class SweepFields:
    """Fields of the stages that run the OBS sweep (GPTQ, SparseGPT, SliM-LLM, the GGUF sweeps)."""

    percdamp: float = 0.01
    blocksize: int = 128

    def check_sweep(self):
        if not (0 <= self.percdamp < 10):
            raise RecipeError(f"percdamp must be in [0, 10), got {self.percdamp!r}")
        if not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise RecipeError(f"blocksize must be a positive integer, got {self.blocksize!r}")


@dataclass
class AimFields:
    """GPTAQ's asymmetric calibration for the sweeps that re-fit a whole weight (GPTQ, SparseGPT)."""

    # aim at the dense model's outputs on its own inputs, not at this Linear's original weight on
    # the compressed model's inputs (W <- W + W D H^-1 before the sweep; D: LinearStats.dense_cross)
    dense_target: bool = False
    dense_alpha: float = 0.25  # the fraction of that correction taken (GPTAQ's reference code: 0.25)

    def check_aim(self):
        require_bools(self, ("dense_target",))
        a = self.dense_alpha
        if not is_number(a) or not 0 < a <= 1:
            raise RecipeError(f"dense_alpha must be a number in (0, 1], got {a!r}")
        if a != 0.25 and not self.dense_target:
            raise RecipeError("dense_alpha scales the dense_target correction: set dense_target: true")

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({HESSIAN, DENSE_CROSS}) if self.dense_target else frozenset({HESSIAN})

    def aim(self, state: LinearState, stats: LinearStats, inv) -> None:
        """With ``dense_target``, move the weight (and the target of later stages: low-rank fits
        and re-fits) to the one whose outputs on this model's inputs best match the dense model's."""
        if self.dense_target:
            state.weight = state.aimed = dense_target(state.original, stats.dense_cross, inv, self.dense_alpha)
            if state.mask is not None:  # a mask from an earlier stage still holds
                state.weight = state.weight * state.mask


@register
@dataclass
class GPTQ(SweepFields, AimFields, QuantFields, Stage):
    name = "gptq"
    quantizes = True
    requantizes = True
    examples = ({"bits": 4, "group_size": 32}, {"bits": 3, "group_size": 48, "actorder": False},
                {"bits": 3, "group_size": 16, "weighted_search": True})
    # sweep the columns by decreasing Hessian diagonal, each group's grid fitted up front on the natural
    # order (static groups: codes, scales and group boundaries are those of a natural-order checkpoint).
    # On by default, as in llm-compressor's GPTQ: on the default model it lowered perplexity on each of 3
    # calibration seeds at W3 g64 and W4 g128 (docs/results.md, "quality frontier"); the built-in gptq-*
    # recipes turn it off, being the papers' GPTQ baseline.
    actorder: bool = True

    def __post_init__(self):
        require_bools(self, ("actorder",))
        self.quant_spec()
        self.check_sweep()
        self.check_aim()

    def apply(self, state: LinearState, stats: LinearStats) -> LinearState:
        spec = self.quant_spec()
        inv = stats.inverse(self.percdamp, self.actorder, state.name)
        importance = stats.act_norm if spec.weighted_search else None  # proportional to diag(H)
        self.aim(state, stats, inv)

        def requantize(target, mask):
            res = obs_sweep(target, inv, quant=spec, mask=mask, blocksize=self.blocksize, importance=importance)
            return res.W, res.scale, res.zero

        state.weight, state.scale, state.zero = requantize(state.weight, state.mask)
        state.quant, state.requantize = spec, requantize
        state.notes["damp"] = inv.damp
        return state
