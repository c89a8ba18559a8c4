from .perplexity import EvalResult, evaluate

__all__ = ["EvalResult", "evaluate"]
