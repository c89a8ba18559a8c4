"""Compression stages. Importing this package registers every built-in stage."""
from . import gptq, pruning, rtn  # noqa: F401  (registration)
from .base import STAGES, LinearState, LinearStats, Stage, build_stage, register

__all__ = ["STAGES", "LinearState", "LinearStats", "Stage", "build_stage", "register"]
