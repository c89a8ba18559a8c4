"""User-facing errors: each becomes one line on stderr and a non-zero exit in the CLI."""


def is_number(x) -> bool:
    """An int or a float, not a bool (YAML's true/false are ints to Python): the check every
    numeric option makes before its range check."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class SlimkitError(Exception):
    """A problem with the user's input or environment, stated in one line."""


class RecipeError(SlimkitError):
    """A recipe (or a stage's configuration) is malformed or out of range."""


class DataError(SlimkitError):
    """Calibration or evaluation text is missing, empty or too short."""


class ModelError(SlimkitError):
    """A model cannot be found, loaded or handled."""


class NumericalError(SlimkitError):
    """NaN/Inf or a factorisation that cannot be repaired."""


class ResumeError(SlimkitError):
    """A checkpoint cannot be resumed: damaged, edited, or its files changed ("cannot resume: ...")."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when empty): one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def require_bools(obj, keys, prefix: str = "") -> None:
    """RecipeError unless every attribute ``keys`` of a config dataclass is true or false."""
    for key in keys:
        v = getattr(obj, key)
        if not isinstance(v, bool):
            raise RecipeError(f"{prefix}{key} must be true or false, got {v!r}")


def require_positive_ints(obj, keys, prefix: str = "") -> None:
    """RecipeError unless every attribute ``keys`` of a config dataclass is a positive integer."""
    for key in keys:
        v = getattr(obj, key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise RecipeError(f"{prefix}{key} must be a positive integer, got {v!r}")
