"""Quantization into llama.cpp's GGUF block formats: round-to-nearest (``rtn_gguf``) and the
GPTQ sweep (``gptq_gguf``, optionally SparseGPT N:M pruning in the same sweep), with the
per-tensor type that ``llama-quantize`` would choose for the same llama.cpp file type.

Persisted per Linear ``P``: ``P.gguf_blocks`` (out, in / block * type_size) uint8, the block
bytes llama.cpp reads (the exporter writes them unchanged), and in slimkit.json the layer's
``gguf`` record {type, ftype}. The model's weight is their exact dequantization.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


from ..errors import RecipeError, require_bools
from ..ops.gguf import CATEGORIES, TYPES, BlockGrid, category_of, check_ftype, check_width, llama_type, storage_bits
from ..ops.masks import Sparsity, parse_sparsity
from ..ops.obs import obs_sweep
from .base import HESSIAN, LayerPosition, LinearState, LinearStats, Stage, register
from .gptq import SweepFields

BLOCKS = "gguf_blocks"


@dataclass
class GGUFFields:
    ftype: str = "Q4_K_M"  # a llama.cpp file type: its mixture of block types, tensor by tensor
    pure: bool = False  # every tensor the file type's own block type (llama-quantize --pure)

    calibrated: ClassVar[bool] = False  # choose types as llama-quantize does with an importance matrix
    alone: ClassVar[bool] = True

    def check_gguf(self) -> None:
        self.ftype = check_ftype(self.ftype)
        require_bools(self, ("pure",))

    def uses_imatrix(self) -> bool:
        return self.calibrated

    def layer_type(self, name: str, in_features: int, state: LinearState | None = None,
                   position: LayerPosition | None = None) -> str:
        pos = state.position if state is not None else position
        return llama_type(self.ftype, category_of(name), in_features,
                          pos.block if pos else None, pos.n_blocks if pos else None,
                          pos.n_gqa if pos else 1, has_imatrix=self.uses_imatrix(), pure=self.pure)

    def check_layer(self, name: str, out_features: int, in_features: int) -> None:
        try:
            t = self.layer_type(name, in_features)
        except RecipeError as e:
            raise RecipeError(f"{name}: {e}") from None
        check_width(TYPES[t], in_features, name)

    def record_bytes(self, name: str, out_features: int, in_features: int,
                     position: LayerPosition | None = None) -> dict[str, int]:
        """The block bytes of the type llama-quantize would choose here (uint8)."""
        t = TYPES[self.layer_type(name, in_features, position=position)]
        return {BLOCKS: out_features * -(-in_features // t.block) * t.type_size}

    def refuse_mask(self, state: LinearState) -> None:
        if state.mask is not None or state.quant is not None or BLOCKS in state.tensors or state.L is not None:
            raise RecipeError(f"{state.name} was already compressed by an earlier stage; a GGUF stage works on "
                              "the dense weight alone (sparsegpt_gguf prunes in its own sweep)")

    def record(self, state: LinearState, grid: BlockGrid, W) -> LinearState:
        out, k = W.shape
        state.weight = W
        state.tensors[BLOCKS] = grid.data()
        state.storage = storage_bits(grid.type, out, k)
        state.notes["gguf"] = {"type": grid.type.name, "ftype": self.ftype, "pure": self.pure,
                               "imatrix": self.uses_imatrix()}
        state.notes["grid"] = f"GGUF {grid.type.name} ({self.ftype}{' pure' if self.pure else ''})"
        return state


@register
@dataclass
class RTNGGUF(GGUFFields, Stage):
    """Round-to-nearest into each tensor's GGUF block type (block parameters searched for the
    least squared error, no calibration data): the baseline of ``gptq_gguf``."""

    name = "rtn_gguf"
    quantizes = True
    uniform_grid = False
    accepts_mask = False
    examples = ({"ftype": "Q4_0"}, {"ftype": "Q4_K_M", "pure": True})

    def __post_init__(self):
        self.check_gguf()

    def apply(self, state: LinearState, stats) -> LinearState:
        self.refuse_mask(state)
        out, k = state.weight.shape
        grid = BlockGrid(TYPES[self.layer_type(state.name, k, state)], out, k)
        return self.record(state, grid, grid.round_all(state.weight))


@register
@dataclass
class GPTQGGUF(SweepFields, GGUFFields, Stage):
    """GPTQ into each tensor's GGUF block type: the OBS sweep fits every block (super-block) on
    the error-compensated weights when it reaches it, with the Hessian's diagonal as the
    importance of each column in the scale search."""

    name = "gptq_gguf"
    needs = frozenset({HESSIAN})
    quantizes = True
    uniform_grid = False
    accepts_mask = False
    calibrated = True
    examples = ({"ftype": "Q4_0"}, {"ftype": "Q3_K_M", "actorder": True})
    actorder: bool = False  # sweep columns by decreasing Hessian diagonal, every block fitted up front

    def __post_init__(self):
        self.check_gguf()
        self.check_sweep()
        require_bools(self, ("actorder",))

    def pattern(self) -> Sparsity | None:
        return None

    def uses_imatrix(self) -> bool:  # the importance-matrix rule picks Q4_1/Q5_1, which have no exact zero
        return self.calibrated and self.pattern() is None

    def apply(self, state: LinearState, stats: LinearStats) -> LinearState:
        self.refuse_mask(state)
        out, k = state.weight.shape
        inv = stats.inverse(self.percdamp, self.actorder and self.pattern() is None, state.name)
        imp = stats.hessian.diagonal().clone()
        grid = BlockGrid(TYPES[self.layer_type(state.name, k, state)], out, k, importance=imp)
        pattern = self.pattern()
        res = obs_sweep(state.weight, inv, sparsity=pattern, blocksize=self.blocksize, block_grid=grid)
        if pattern is not None:
            state.mask, state.sparsity = res.keep, pattern
        state.notes["damp"] = inv.damp
        return self.record(state, grid, res.W)


@register
@dataclass
class SparseGPTGGUF(GPTQGGUF):
    """SparseGPT pruning (N:M or unstructured) and GPTQ into GGUF blocks in one OBS sweep, for
    file types of symmetric blocks only: their zero code is an exact 0, so a pruned weight
    stays pruned in the file llama.cpp reads."""

    name = "sparsegpt_gguf"
    prunes = True
    examples = ({"ftype": "Q4_0", "sparsity": "2:4"}, {"ftype": "Q8_0", "sparsity": 0.5})
    sparsity: str | float = "2:4"

    def record_bytes(self, name: str, out_features: int, in_features: int,
                     position: LayerPosition | None = None) -> dict[str, int]:
        return super().record_bytes(name, out_features, in_features, position) | {"mask": out_features * in_features}

    def __post_init__(self):
        super().__post_init__()
        if self.actorder:
            raise RecipeError("act-order cannot be combined with pruning in the same sweep (N:M runs)")
        parse_sparsity(self.sparsity)
        types = {llama_type(self.ftype, cat, n, layer, 16, gqa, pure=self.pure)
                 for cat in (*CATEGORIES.values(), "output", "other") for n in (4096, 4128)
                 for layer in range(16) for gqa in (1, 4)}
        asym = sorted(t for t in types if not TYPES[t].symmetric)
        if asym:
            raise RecipeError(f"sparsity with GGUF {self.ftype}: {', '.join(asym)} has no exact zero for a pruned "
                              "weight; use a file type of symmetric blocks (Q8_0, Q6_K, Q5_0, Q4_0, Q3_K_S)")

    def pattern(self) -> Sparsity | None:
        return parse_sparsity(self.sparsity)

    def check_layer(self, name: str, out_features: int, in_features: int) -> None:
        super().check_layer(name, out_features, in_features)
        self.pattern().check_width(in_features, name)
