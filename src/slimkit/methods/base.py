"""Stages: one step of a per-Linear compression pipeline, configured by a small dataclass.

A stage sees one Linear's state (original weight, current weight, mask, grid,
adapters) and the calibration statistics it asked for, and returns the new
state. Stages compose left to right (prune -> quantize -> low-rank compensation).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from .. import dist
from ..errors import NumericalError, RecipeError
from ..ops.bits import FP16 as FP16_BITS
from ..ops.bits import weight_bits
from ..ops.masks import Sparsity
from ..ops.obs import InverseHessian, inverse_hessian
from ..ops.quant import QuantSpec
from ..ops.reduce import all_finite

ACT_NORM = "act_norm"
HESSIAN = "hessian"
INPUT_SAMPLE = "input_sample"  # the first SAMPLE_ROWS input rows (tokens), e.g. to score output KL
# (2 / tokens) sum (x - x~)^T x~: x the dense model's input of the Linear, x~ the compressed model's (GPTAQ)
DENSE_CROSS = "dense_cross"
SAMPLE_ROWS = 4096


class LinearStats:
    """Calibration statistics of one Linear's input, shared by Linears fed the same tensor.

    act_norm: a_j = sum over tokens of x_j^2, divided by the number of sequences (Wanda).
    hessian:  H = (2 / tokens) sum x^T x, only when some stage asked for it.
    sample:   the first ``sample_rows`` input rows (tokens, in), only when asked.
    dense_cross: D = (2 / tokens) sum (x - x~)^T x~, where x~ is the input this Linear sees in the
              compressed model and x the dense model's input for the same token (``add(x~, dense=x)``),
              only when asked: with H it gives the weight whose outputs on x~ best match the
              dense model's outputs on x, W + W D H^-1 (GPTAQ's asymmetric calibration).
    """

    def __init__(self, in_features: int, want_hessian: bool, sample_rows: int = 0, want_cross: bool = False):
        self.in_features = in_features
        self.want_cross = want_cross
        self._C: torch.Tensor | None = None
        self.nsamples = 0
        self.ntokens = 0
        self.want_hessian = want_hessian
        self._act_sq: torch.Tensor | None = None  # allocated on the first input's device
        self._H: torch.Tensor | None = None
        self.sample_rows = sample_rows
        self._sample: list[torch.Tensor] = []
        self._inverse: dict[tuple, InverseHessian] = {}
        self.final = False

    def add(self, x: torch.Tensor, dense: torch.Tensor | None = None) -> None:
        if self.want_cross and (dense is None or dense.shape != x.shape):
            raise NumericalError(f"the dense model's input {None if dense is None else tuple(dense.shape)} does not "
                                 f"pair token by token with the compressed model's {tuple(x.shape)}")
        self.nsamples += x.shape[0] if x.dim() > 2 else 1
        x = x.reshape(-1, self.in_features).to(torch.float32)  # (tokens, in)
        if self._act_sq is None:
            self._act_sq = torch.zeros(self.in_features, dtype=torch.float64, device=x.device)
            if self.want_hessian:
                self._H = torch.zeros(self.in_features, self.in_features, device=x.device)
            if self.want_cross:
                self._C = torch.zeros(self.in_features, self.in_features, device=x.device)
        self.ntokens += x.shape[0]
        self._act_sq += x.square().sum(0, dtype=torch.float64)
        if self._H is not None:
            self._H.addmm_(x.T, x)
        if self._C is not None:
            self._C.addmm_(dense.reshape(-1, self.in_features).to(x.device, torch.float32).sub(x).T, x)
        have = sum(t.shape[0] for t in self._sample)
        if have < self.sample_rows:
            self._sample.append(x[: self.sample_rows - have].clone())

    def all_reduce(self) -> None:
        """Sum the statistics over torch.distributed workers (each saw its share of the
        calibration data); the input sample becomes the first rows of all workers' in order."""
        if self.final or not dist.active():
            return
        counts = dist.all_reduce_sum(torch.tensor([self.nsamples, self.ntokens], dtype=torch.float64))
        self.nsamples, self.ntokens = int(counts[0]), int(counts[1])
        dist.all_reduce_sum(self._act_sq)
        if self._H is not None:
            dist.all_reduce_sum(self._H)
        if self._C is not None:
            dist.all_reduce_sum(self._C)
        if self.sample_rows:
            local = torch.cat(self._sample) if self._sample else \
                torch.zeros(0, self.in_features, device=self._act_sq.device if self._act_sq is not None else None)
            self._sample = [dist.gather_rows(local, self.sample_rows)]

    def finalize(self, name: str = "") -> None:
        if self.final:
            return
        if self.ntokens == 0 or self._act_sq is None:
            raise NumericalError(f"{name or 'a layer'} saw no calibration tokens")
        if not all_finite(self._act_sq):
            raise NumericalError(f"the calibration activations entering {name or 'a layer'} contain NaN/Inf")
        self._act_sq /= self.nsamples
        if self._H is not None:
            self._H *= 2 / self.ntokens
        if self._C is not None:
            if not all_finite(self._C):
                raise NumericalError(f"the dense model's activations entering {name or 'a layer'} contain NaN/Inf")
            self._C *= 2 / self.ntokens
        self.final = True

    @property
    def act_norm(self) -> torch.Tensor:  # (in,)
        return self._act_sq.to(torch.float32)

    @property
    def sample(self) -> torch.Tensor:  # (rows, in)
        if not self.sample_rows:
            raise RuntimeError("this stage needs input samples but the engine did not collect them")
        return torch.cat(self._sample)

    @property
    def hessian(self) -> torch.Tensor:  # (in, in)
        if self._H is None:
            raise RuntimeError("this stage needs the Hessian but the engine did not collect it")
        return self._H

    @property
    def dense_cross(self) -> torch.Tensor:  # (in, in)
        if self._C is None:
            raise RuntimeError("this stage needs the dense model's inputs but the engine did not collect them")
        return self._C

    def inverse(self, percdamp: float, actorder: bool, name: str = "") -> InverseHessian:
        key = (percdamp, actorder)
        if key not in self._inverse:  # one factorisation serves every Linear sharing this input
            self._inverse[key] = inverse_hessian(self.hessian, percdamp, actorder, name=name)
        return self._inverse[key]


@dataclass(frozen=True)
class LayerPosition:
    """Where a Linear sits in its model, for stages whose choice depends on it (llama.cpp's
    per-tensor type mixtures): its block, the number of blocks, and the model's query heads
    per key/value head."""

    block: int
    n_blocks: int
    n_gqa: int = 1


def model_gqa(config) -> int:
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    return heads // kv if isinstance(heads, int) and isinstance(kv, int) and kv > 0 else 1


@dataclass
class LinearState:
    """One Linear under compression. The model computes with ``effective_weight()``:
    y = x W^T + (x L) R, folded into one dense matrix for the fake-quantized model."""

    name: str
    original: torch.Tensor  # (out, in) the dense weight, never modified
    weight: torch.Tensor  # (out, in) current base weight (quantized and/or pruned)
    mask: torch.Tensor | None = None  # (out, in) bool, True = kept
    sparsity: Sparsity | None = None
    quant: QuantSpec | None = None
    scale: torch.Tensor | None = None  # (out, G)
    zero: torch.Tensor | None = None  # (out, G)
    L: torch.Tensor | None = None  # (in, r) low-rank adapter, y += (x L) R
    R: torch.Tensor | None = None  # (r, out)
    adapter_bits: int | None = None  # None: fp16 adapters; else AbsMax codes of this width
    adapter_group: int = 128  # entries per AbsMax scale along the first dimension of L and R
    storage: dict[str, int] | None = None  # a method's own accounting of the base weight's bits
    extra_bits: dict[str, int] = field(default_factory=dict)  # further stored parts (e.g. outlier indices)
    # re-quantize a new target with the grid family of the quantizing stage: (target (out, in),
    # keep-mask or None) -> (weight, scale, zero); low-rank stages re-fit the base to W - L R with it
    requantize: Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    # prune and quantize a new target again, choosing a new mask of the same pattern jointly with the
    # grid: target (out, in) -> (weight, mask, scale, zero); set by stages that prune and quantize in
    # one sweep (SparseGPT with bits), used by low-rank stages that re-select the mask (reselect_mask)
    reprune: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # a method's extra tensors to persist
    notes: dict[str, Any] = field(default_factory=dict)
    position: LayerPosition | None = None
    # (out, in) the weight the compression aims at when a stage re-aimed it (GPTQ / SparseGPT with
    # dense_target: the dense model's outputs on this model's inputs), else None: the original
    aimed: torch.Tensor | None = None

    @classmethod
    def from_weight(cls, name: str, W: torch.Tensor, position: LayerPosition | None = None) -> "LinearState":
        W = W.detach().to(torch.float32, copy=True)  # the module's weight is overwritten later
        if not all_finite(W):
            raise NumericalError(f"the weight of {name} contains NaN/Inf")
        return cls(name=name, original=W, weight=W.clone(), position=position)

    @property
    def target(self) -> torch.Tensor:
        """What the base weight and adapters approximate: ``aimed`` when set, else ``original``."""
        return self.original if self.aimed is None else self.aimed

    @property
    def rank(self) -> int:
        return 0 if self.L is None else self.L.shape[1]

    def effective_weight(self) -> torch.Tensor:
        if self.L is None:
            return self.weight
        return self.weight + (self.L @ self.R).T  # (out, in)

    def bits(self) -> dict[str, int]:
        out, k = self.weight.shape
        if self.storage is not None:
            parts = dict(self.storage)
        else:
            kept = int(self.mask.sum()) if self.mask is not None else None
            parts = weight_bits(
                out, k,
                bits=self.quant.bits if self.quant else None,
                ngroups=self.quant.ngroups(k) if self.quant else 0,
                asymmetric=bool(self.quant and not self.quant.symmetric),
                kept=kept,
                nm_m=self.sparsity.m if (self.sparsity and self.sparsity.structured) else 0,
            )
        if self.quant is not None and self.quant.per_tensor and self.storage is None:
            parts["scales"] = FP16_BITS
        for k, v in self.extra_bits.items():
            parts[k] = parts.get(k, 0) + v
        if self.L is not None:
            parts["adapters"] = adapter_bits(self.L, self.R, self.adapter_bits, self.adapter_group)
        return parts


def adapter_bits(L: torch.Tensor, R: torch.Tensor, bits: int | None, group: int) -> int:
    """fp16 adapters, or AbsMax codes plus one fp16 scale per ``group`` entries of each column."""
    total = 0
    for M in (L, R):
        rows, cols = M.shape
        if bits is None:
            total += rows * cols * 16
        else:
            total += rows * cols * bits + -(-rows // group) * cols * 16
    return total


@dataclass
class BlockContext:
    """What a block-level refinement (e.g. learned clipping, adapter tuning on block output MSE)
    sees once every Linear of a block has been compressed."""

    index: int
    block: nn.Module
    linears: dict[str, nn.Linear]
    states: dict[str, LinearState]
    inputs: torch.Tensor  # (N, S, H) this block's calibration inputs (from the compressed model)
    targets: torch.Tensor  # (N, S, H) the dense block's outputs on the same inputs
    kwargs_list: list[dict]  # per-batch keyword arguments of the block (on the block's device)
    batch_size: int
    # the dtype each Linear's weight is stored in (the block computes in its weight's dtype):
    # a written weight is rounded to that first, so the block computes with what is saved
    stored: dict[str, torch.dtype] = field(default_factory=dict)

    def write(self, name: str) -> None:
        lin = self.linears[name]
        w = self.states[name].effective_weight()
        lin.weight.data.copy_(w.to(self.stored.get(name, lin.weight.dtype)).to(lin.weight.dtype))


class Stage:
    """Base of all stages. Subclasses are dataclasses registered with @register."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    # representative configurations that the conformance battery (tests/test_stages.py) runs
    examples: ClassVar[tuple[dict, ...]] = ()
    # stages the battery runs first, for a stage that works on an earlier stage's result
    battery_prelude: ClassVar[tuple[dict, ...]] = ()
    quantizes: ClassVar[bool] = False
    prunes: ClassVar[bool] = False
    makes_adapters: ClassVar[bool] = False  # leaves low-rank L, R that a recipe's finetune: section trains
    requantizes: ClassVar[bool] = False  # leaves state.requantize (its grid family for a new target)
    reprunes: ClassVar[bool] = False  # leaves state.reprune (a joint prune + quantize of a new target)
    # use state.requantize / state.reprune: the recipe's last quantizing stage before must leave it
    needs_requantize: ClassVar[bool] = False
    needs_reprune: ClassVar[bool] = False
    uniform_grid: ClassVar[bool] = True  # a quantizing stage that leaves a uniform grid in state.quant
    accepts_mask: ClassVar[bool] = True  # can run on an already pruned layer and keep its mask
    alone: ClassVar[bool] = False  # must be a recipe's only stage (its stored form is final: GGUF blocks)
    # works on the whole model before calibration (``transform``), not per Linear: rotate
    model_level: ClassVar[bool] = False

    def apply(self, state: LinearState, stats: LinearStats | None) -> LinearState:
        raise NotImplementedError

    def describe(self) -> str:
        args = ", ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                         if getattr(self, f.name) != f.default)
        return f"{self.name}({args})"

    def to_dict(self) -> dict:
        d = {"method": self.name}
        for f in dataclasses.fields(self):
            d[f.name] = getattr(self, f.name)
        return d

    def check_layer(self, name: str, out_features: int, in_features: int) -> None:
        """Raise RecipeError when this stage cannot handle a layer of this shape."""

    def record_bytes(self, name: str, out_features: int, in_features: int,
                     position: LayerPosition | None = None) -> dict[str, int]:
        """At least the bytes of each tensor this stage leaves in a Linear's state record
        (state_io.layer_record), by the record's tensor name: what the disk check counts before any
        work. A stage that leaves nothing there (rotate) returns {}."""
        return {}

    def refine_block(self, ctx: BlockContext) -> None:
        """Optional: runs once per block after every Linear went through all stages;
        may update ``ctx.states`` and must then call ``ctx.write(name)``."""

    def run(self, state: LinearState, stats: LinearStats | None) -> LinearState:
        t = time.perf_counter()
        if self.quantizes:  # an earlier grid's re-fits no longer describe the weight: this stage sets its own
            state.requantize = state.reprune = None
        state = self.apply(state, stats)
        state.notes.setdefault("seconds", {})[self.name] = time.perf_counter() - t
        return state


STAGES: dict[str, type[Stage]] = {}


def register(cls):
    if not cls.name:
        raise TypeError("a stage needs a name")
    STAGES[cls.name] = cls
    return cls


def build_stage(d: dict) -> Stage:
    if not isinstance(d, dict):
        raise RecipeError(f"a stage must be a mapping with a 'method' key, got {d!r}")
    d = dict(d)
    method = d.pop("method", None)
    if method not in STAGES:
        raise RecipeError(f"unknown method {method!r}; known: {', '.join(sorted(STAGES))}")
    cls = STAGES[method]
    names = {f.name for f in dataclasses.fields(cls)}
    for key in d:
        if key not in names:
            raise RecipeError(f"unknown key {key!r} for method {method!r}; allowed: {', '.join(sorted(names))}")
    try:
        return cls(**d)
    except RecipeError:
        raise
    except (TypeError, ValueError) as e:
        raise RecipeError(f"method {method!r}: {e}") from None


@dataclass
class QuantFields:
    """Grid fields shared by the quantizing stages."""

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    clip_search: bool = False
    weighted_search: bool = False  # range per (row, group) minimising the act-weighted squared error
    search_grid: int = 100  # the range search's candidates: shrinks 1 - i / search_grid ...
    search_maxshrink: float = 0.8  # ... for i < search_maxshrink * search_grid
    search_norm: float | None = None  # its error exponent (None: 2 weighted, 2.4 clip)

    def record_bytes(self, name: str, out_features: int, in_features: int,
                     position: LayerPosition | None = None) -> dict[str, int]:
        """One uint8 code per weight, an fp32 scale and a uint8 zero point per (row, group)."""
        groups = 1 if self.group_size is None else -(-in_features // self.group_size)
        return {"codes": out_features * in_features, "scale": 4 * out_features * groups, "zero": out_features * groups}

    def quant_spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.symmetric, self.clip_search,
                         weighted_search=self.weighted_search, search_grid=self.search_grid,
                         search_maxshrink=self.search_maxshrink, search_norm=self.search_norm)
