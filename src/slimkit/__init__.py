"""slimkit: one-shot compression of LLM weights (quantization, sparsity, low-rank compensation)."""
__version__ = "0.1.0"

from .api import compress, evaluate_model  # noqa: E402
from .pack import load  # noqa: E402
from .recipe import Recipe, load_recipe  # noqa: E402

__all__ = ["__version__", "compress", "evaluate_model", "load", "Recipe", "load_recipe"]
