"""Compression stages. Importing this package imports every module in it, which registers
each built-in stage (a new method only needs a module here with an @register'ed class)."""
import importlib
import pkgutil

from .base import STAGES, LinearState, LinearStats, Stage, build_stage, register

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod != "base":
        importlib.import_module(f"{__name__}.{_mod}")

__all__ = ["STAGES", "LinearState", "LinearStats", "Stage", "build_stage", "register"]
