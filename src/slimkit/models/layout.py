"""Where a model keeps its decoder blocks: data, keyed by ``config.model_type``.

Everything else is found from the loaded model: the Linear layers of a block
are its ``nn.Linear`` submodules, and Linears fed the same tensor (q/k/v,
gate/up) are grouped at run time, so no per-family code is needed.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ModelError

# model_type -> dotted path of the ModuleList of decoder blocks
BLOCK_PATHS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "phi3": "model.layers",
    "olmo": "model.layers",
    "opt": "model.decoder.layers",
}


@dataclass
class ModelLayout:
    model_type: str
    blocks_path: str

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        mod = model
        for part in self.blocks_path.split("."):
            mod = getattr(mod, part)
        return mod

    def linears(self, model: nn.Module, index: int) -> dict[str, nn.Linear]:
        """Full module name -> Linear, for every Linear inside block ``index``."""
        return ResidentBlocks(model, self).linears(index, self.blocks(model)[index])


class ResidentBlocks:
    """The blocks of a model held in memory: the engine's default source of blocks (see
    streaming.StreamedModel for blocks read from disk one at a time)."""

    resident = True

    def __init__(self, model: nn.Module, layout: ModelLayout):
        self.layout = layout
        self._blocks = layout.blocks(model)

    def __len__(self) -> int:
        return len(self._blocks)

    def peek(self, index: int) -> nn.Module:
        return self._blocks[index]

    get = peek

    def linears(self, index: int, block: nn.Module) -> dict[str, nn.Linear]:
        prefix = f"{self.layout.blocks_path}.{index}."
        return {prefix + n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def layout_for(model: nn.Module) -> ModelLayout:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in BLOCK_PATHS:
        raise ModelError(f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(BLOCK_PATHS))}")
    layout = ModelLayout(model_type, BLOCK_PATHS[model_type])
    try:
        blocks = layout.blocks(model)
    except AttributeError:
        raise ModelError(f"a {model_type} model without {layout.blocks_path}: not a causal LM this tool knows") from None
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ModelError(f"{model_type} model has no decoder blocks at {layout.blocks_path}")
    return layout
