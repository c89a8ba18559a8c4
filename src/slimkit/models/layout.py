"""Where a model keeps its decoder blocks: found from the model itself.

The decoder blocks of any causal LM are the ``nn.ModuleList`` whose children are of the classes
the model names in ``_no_split_modules`` (the unit transformers itself never splits across
devices), or, failing that, the layers of ``model.get_decoder()``. ``BLOCK_PATHS`` holds
overrides for models where that is ambiguous (none are known today; it is checked first).
Everything else is found from the loaded model: the Linear layers of a block are its
``nn.Linear`` submodules, and Linears fed the same tensor (q/k/v, gate/up) are grouped at run
time, so no per-family code is needed.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ModelError

# model_type -> dotted path of the ModuleList of decoder blocks, where discovery would be ambiguous
BLOCK_PATHS: dict[str, str] = {}


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

    def transform_blocks(self, fn) -> None:
        """Apply ``fn(index, block)`` to every block, now (a model-level stage such as rotate)."""
        for i, b in enumerate(self._blocks):
            fn(i, b)

    def block_prefix(self, index: int) -> str:
        return f"{self.layout.blocks_path}.{index}."

    def linears(self, index: int, block: nn.Module) -> dict[str, nn.Linear]:
        prefix = self.block_prefix(index)
        return {prefix + n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def _module_lists(model: nn.Module):
    """(dotted path, ModuleList) of every non-empty ModuleList, outermost first."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]


def find_blocks_path(model: nn.Module) -> str:
    """The dotted path of the decoder blocks: the ModuleList whose children are all of a class in
    ``_no_split_modules`` (the longest such list if there are several), else the layers of
    ``get_decoder()``. ModelError naming what was looked for when neither exists."""
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    candidates = [(n, m) for n, m in _module_lists(model)
                  if no_split and all(type(c).__name__ in no_split for c in m)]
    if candidates:
        return max(candidates, key=lambda nm: (len(nm[1]), -nm[0].count(".")))[0]
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is not None:
        layers = getattr(decoder, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            for n, m in model.named_modules():
                if m is layers:
                    return n
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise ModelError(f"cannot find the decoder blocks of this {kind} model: no ModuleList of its "
                     f"_no_split_modules classes ({', '.join(sorted(no_split)) or 'none declared'}) and no "
                     "get_decoder().layers; not a decoder-only causal LM this tool can compress")


def layout_for(model: nn.Module) -> ModelLayout:
    model_type = getattr(model.config, "model_type", None) or type(model).__name__
    path = BLOCK_PATHS.get(model_type) or find_blocks_path(model)
    layout = ModelLayout(model_type, path)
    try:
        blocks = layout.blocks(model)
    except AttributeError:
        raise ModelError(f"a {model_type} model without {path}: not a causal LM this tool knows") from None
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ModelError(f"{model_type} model has no decoder blocks at {path}")
    return layout


def replace_output_head(model: nn.Module, head: nn.Module) -> None:
    """Install ``head`` as the model's output head, untied from the input embedding: the
    ``tie_word_embeddings`` flag is cleared on the config and on its text config (a composite
    model's), so that saving and reloading keep the head as its own weight."""
    configs = (model.config, getattr(model.config, "get_text_config", lambda: None)())
    for cfg in {id(c): c for c in configs if c is not None}.values():
        cfg.tie_word_embeddings = False
    model.set_output_embeddings(head)
