"""Typed recipes: a name, which Linears to leave alone, and a pipeline of stages.

YAML form::

    name: sparsegpt-2:4-gptq-w4
    description: SparseGPT 2:4 with joint 4-bit group quantization
    ignore: ["re:.*lm_head$"]      # module names (regex with re:, else fnmatch glob)
    stages:
      - method: sparsegpt
        sparsity: "2:4"
        bits: 4
        group_size: 64
"""
from __future__ import annotations

import dataclasses
import fnmatch
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from .errors import RecipeError, first_line
from .finetune import FinetuneConfig
from .methods import STAGES, Stage, build_stage

RECIPE_KEYS = {"name", "description", "ignore", "stages", "finetune"}

_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}


def _matches(value, tp) -> bool | None:
    """Whether a YAML value fits a scalar annotation (None: not checked here, e.g. ``list``
    fields, which stages may also accept as one scalar)."""
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp in (str, type(None)):
        return isinstance(value, tp)
    return None


def check_stage_types(d) -> None:
    """RecipeError when a stage value has the wrong YAML type (``bits: four``, ``symmetric: "no"``),
    named by method and key; ranges and anything else are left to the stage's own checks."""
    if not isinstance(d, dict) or d.get("method") not in STAGES:
        return  # build_stage explains
    cls = STAGES[d["method"]]
    try:
        hints = typing.get_type_hints(cls)
    except Exception:
        return
    fields = {f.name for f in dataclasses.fields(cls)}
    for key, value in d.items():
        if key not in fields or key not in hints:
            continue
        tp = hints[key]
        options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        verdicts = [_matches(value, t) for t in options]
        if None in verdicts or any(verdicts):
            continue
        want = " or ".join(_TYPE_WORDS[t] for t in options)
        hint = ""
        if float in options and isinstance(value, str) and re.fullmatch(r"[-+]?\d+[eE][-+]?\d+", value.strip()):
            hint = f" (YAML reads {value} without a dot as a string: write e.g. 1.0e-4)"
        raise RecipeError(f"method {d['method']!r}: {key} must be {want}, got {value!r}{hint}")


@dataclass
class Recipe:
    name: str
    stages: list[Stage]
    description: str = ""
    ignore: list[str] = field(default_factory=list)
    finetune: FinetuneConfig | None = None  # train the adapters after compression

    def __post_init__(self):
        if not self.stages:
            raise RecipeError(f"recipe {self.name!r} has no stages")
        for pat in self.ignore:
            if not isinstance(pat, str):
                raise RecipeError(f"recipe {self.name!r}: ignore entries must be strings, got {pat!r}")
            if pat.startswith("re:"):
                try:
                    re.compile(pat[3:])
                except re.error as e:
                    raise RecipeError(f"recipe {self.name!r}: bad regex {pat!r}: {e}") from None
        if sum(1 for s in self.stages if s.prunes) > 1:
            raise RecipeError(f"recipe {self.name!r} prunes more than once")
        if self.finetune is not None and not any(s.makes_adapters for s in self.stages):
            raise RecipeError(f"recipe {self.name!r}: finetune trains adapters, but no stage makes any")

    @property
    def needs(self) -> set[str]:
        out: set[str] = set()
        for s in self.stages:
            out |= set(s.needs)
        return out

    def ignores(self, module_name: str) -> bool:
        for pat in self.ignore:
            if pat.startswith("re:"):
                if re.fullmatch(pat[3:], module_name):
                    return True
            elif fnmatch.fnmatchcase(module_name, pat):
                return True
        return False

    def to_dict(self) -> dict:
        d = {"name": self.name, "description": self.description, "ignore": list(self.ignore),
             "stages": [s.to_dict() for s in self.stages]}
        if self.finetune is not None:
            d["finetune"] = self.finetune.to_dict()
        return d

    @classmethod
    def from_dict(cls, d, default_name: str = "custom") -> "Recipe":
        if not isinstance(d, dict):
            raise RecipeError("a recipe must be a mapping with a 'stages' list")
        unknown = set(d) - RECIPE_KEYS
        if unknown:
            raise RecipeError(f"unknown recipe key {sorted(unknown)[0]!r}; allowed: {', '.join(sorted(RECIPE_KEYS))}")
        stages = d.get("stages")
        if not isinstance(stages, list):
            raise RecipeError("a recipe needs a 'stages' list")
        ignore = d.get("ignore") or []
        if isinstance(ignore, str):
            ignore = [ignore]
        ft = d.get("finetune")
        return cls(name=str(d.get("name") or default_name), description=str(d.get("description") or ""),
                   ignore=list(ignore), stages=[_build(s) for s in stages],
                   finetune=None if ft is None else FinetuneConfig.from_dict(ft))

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist")
        try:
            d = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise RecipeError(f"recipe file {str(path)!r} is not valid YAML: {first_line(e)}") from None
        return cls.from_dict(d, default_name=path.stem)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _build(d) -> Stage:
    check_stage_types(d)
    return build_stage(d)


def _builtin_dir():
    return resources.files("slimkit") / "recipes"


def builtin_recipes() -> dict[str, Path]:
    out = {}
    for entry in _builtin_dir().iterdir():
        if entry.name.endswith(".yaml"):
            out[entry.name[:-5]] = entry
    return dict(sorted(out.items()))


def load_recipe(name_or_path: str) -> Recipe:
    """A built-in recipe by name, or a YAML file by path."""
    builtins = builtin_recipes()
    if name_or_path in builtins:
        return Recipe.from_dict(yaml.safe_load(builtins[name_or_path].read_text()), default_name=name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or Path(name_or_path).exists():
        return Recipe.from_yaml(name_or_path)
    raise RecipeError(f"unknown recipe {name_or_path!r}; built-in: {', '.join(builtins)} (or a .yaml file)")
