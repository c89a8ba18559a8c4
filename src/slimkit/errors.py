"""User-facing errors: each becomes one line on stderr and a non-zero exit in the CLI."""


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
