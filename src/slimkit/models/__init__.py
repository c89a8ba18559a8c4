from .layout import BLOCK_PATHS, ModelLayout, layout_for
from .loading import DEFAULT_MODEL, load_model, load_tokenizer

__all__ = ["BLOCK_PATHS", "ModelLayout", "layout_for", "DEFAULT_MODEL", "load_model", "load_tokenizer"]
