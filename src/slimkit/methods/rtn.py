"""Round-to-nearest on a uniform grid (any bits 2..8, per-channel or per-group, sym/asym)."""
from __future__ import annotations

from dataclasses import dataclass

from ..ops.quant import fake_quantize_matrix, fit
from .base import ACT_NORM, LinearState, QuantFields, Stage, register


@register
@dataclass
class RTN(QuantFields, Stage):
    """Round to nearest; with ``weighted_search`` each group's range is searched to minimise the
    error weighted by the input's second moments (so it then needs calibration data)."""

    name = "rtn"
    quantizes = True
    requantizes = True
    examples = ({"bits": 4, "group_size": 32}, {"bits": 3, "group_size": None, "symmetric": True},
                {"bits": 3, "group_size": 16, "weighted_search": True})

    def __post_init__(self):
        self.quant_spec()  # validates

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({ACT_NORM}) if self.weighted_search else frozenset()

    def apply(self, state: LinearState, stats) -> LinearState:
        spec = self.quant_spec()
        importance = stats.act_norm if spec.weighted_search else None

        def requantize(target, mask):
            W = target if mask is None else target * mask
            scale, zero = fit(W, spec, importance)
            Wq = fake_quantize_matrix(W, scale, zero, spec)
            return (Wq if mask is None else Wq * mask), scale, zero

        state.weight, state.scale, state.zero = requantize(state.weight, state.mask)
        state.quant, state.requantize = spec, requantize
        return state
