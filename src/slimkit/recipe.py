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
import math
import os
import re
import stat
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

MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few lines; anything larger is refused unread
MAX_YAML_DEPTH = 32  # nesting of mappings and lists (a recipe needs 4)

MAX_STAGE_INT = 2**63  # what a torch int64 holds; larger integers in a stage are refused

# ranges that a stage's own checks leave open, by method and key, applied to numbers (not to
# null or other types, which the type check handles): (test, what it must be)
_STAGE_RANGES = {
    "reallm": {
        "seed": (lambda v: 0 <= v < 2**64, "a non-negative integer (below 2**64)"),
        "decoder_seconds": (lambda v: v > 0, "a positive number of seconds"),
    },
    "slim_llm_plus": {  # sigmoid(theta_init) divides the initial clip: no underflow to 0
        "theta_init": (lambda v: -50 <= v <= 50, "a number in [-50, 50]"),
    },
    "sparsegpt": {  # only checked by the stage when bits is set
        "group_size": (lambda v: v >= 1, "a positive integer or null (per-channel)"),
    },
}

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


def _bad_number(value) -> str | None:
    """What is wrong with a NaN / infinite float or an integer beyond int64 anywhere in a YAML
    value (lists and mappings searched), else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return "a finite number"
    if isinstance(value, int) and not isinstance(value, bool) and not -MAX_STAGE_INT <= value < MAX_STAGE_INT:
        return "an integer below 2**63"
    items = value if isinstance(value, (list, tuple)) else value.values() if isinstance(value, dict) else ()
    return next((w for w in map(_bad_number, items) if w), None)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_stage_types(d) -> None:
    """RecipeError when a stage value has the wrong YAML type (``bits: four``, ``symmetric: "no"``)
    or is a NaN / infinite number, named by method and key; ranges are left to the stage's own
    checks (and to ``_STAGE_RANGES`` for the few that it leaves open)."""
    if not isinstance(d, dict):
        return  # build_stage explains
    method = d.get("method")
    if not isinstance(method, str):
        raise RecipeError(f"a stage needs a 'method' name (a string), got {method!r}; known: {', '.join(sorted(STAGES))}")
    if method not in STAGES:
        return  # build_stage explains
    for key, value in d.items():
        want = _bad_number(value)
        if want:
            raise RecipeError(f"method {method!r}: {key} must be {want}, got {value!r}")
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
    for key, (ok, want) in _STAGE_RANGES.get(method, {}).items():
        if key in d and _is_number(d[key]) and not ok(d[key]):
            raise RecipeError(f"method {method!r}: {key} must be {want}, got {d[key]!r}")


def _makes_adapters(stage: Stage) -> bool:
    """Whether ``stage`` can leave low-rank adapters (a ReALLM stage only with a rank above 0)."""
    if not stage.makes_adapters:
        return False
    ranks = getattr(stage, "ranks", None)
    return ranks is None or any(r > 0 for r in ranks)


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
        levels = [s.model_level for s in self.stages]
        if all(levels):
            raise RecipeError(f"recipe {self.name!r} has no stage that compresses a Linear")
        if any(levels[levels.index(False):]):
            raise RecipeError(f"recipe {self.name!r}: a model-level stage ("
                              f"{next(s.name for s in self.stages if s.model_level)}) must come before every "
                              "per-Linear stage")
        if sum(levels) > 1:
            raise RecipeError(f"recipe {self.name!r} has more than one model-level stage")
        lone = [s.name for s in self.layer_stages if s.alone]
        if lone and len(self.layer_stages) > 1:
            raise RecipeError(f"recipe {self.name!r}: {lone[0]} writes the layer's final stored form (GGUF blocks) "
                              "and must be the recipe's only stage (sparsegpt_gguf prunes in the same sweep)")
        if sum(1 for s in self.stages if s.prunes) > 1:
            raise RecipeError(f"recipe {self.name!r} prunes more than once")
        for i, s in enumerate(self.stages):
            grid = next((t for t in reversed(self.stages[:i]) if t.quantizes), None)  # what the weight sits on
            if s.needs_reprune and not (grid is not None and grid.reprunes):
                raise RecipeError(f"recipe {self.name!r}: {s.name} with reselect_mask chooses the sparsity mask "
                                  "again, jointly with the grid: the last quantizing stage before it must prune and "
                                  "quantize in one sweep (sparsegpt with bits)")
            if s.needs_requantize and not (grid is not None and grid.requantizes):
                raise RecipeError(f"recipe {self.name!r}: {s.name} with iterations > 1 re-fits the base on its grid: "
                                  "the last quantizing stage before it must leave a re-fit (rtn, gptq, slim_quant, "
                                  "sparsegpt with bits)")
        if self.finetune is not None and not any(_makes_adapters(s) for s in self.stages):
            raise RecipeError(f"recipe {self.name!r}: its finetune: section trains low-rank adapters, but no "
                              "stage makes any (slim_lora, or reallm with a rank above 0)")

    @property
    def layer_stages(self) -> list[Stage]:
        """The stages that run on every Linear (model-level stages such as rotate run before)."""
        return [s for s in self.stages if not s.model_level]

    def record_parts(self, name: str, out_features: int, in_features: int, position=None) -> dict[str, int]:
        """At least the bytes of each tensor of this Linear's state record: the largest that a stage
        declares (a later stage replaces an earlier one's), without the unquantized base weight when
        a stage put the base on a uniform grid (its codes are recorded instead)."""
        parts: dict[str, int] = {}
        for st in self.layer_stages:
            for key, n in st.record_bytes(name, out_features, in_features, position).items():
                parts[key] = max(parts.get(key, 0), n)
        if "codes" in parts:
            parts.pop("weight", None)
        return parts

    def record_bytes(self, name: str, out_features: int, in_features: int, position=None) -> int:
        return sum(self.record_parts(name, out_features, in_features, position).values())

    @property
    def model_stages(self) -> list[Stage]:
        return [s for s in self.stages if s.model_level]

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
        unknown = [k for k in d if k not in RECIPE_KEYS]
        if unknown:
            raise RecipeError(f"unknown recipe key {sorted(unknown, key=str)[0]!r}; "
                              f"allowed: {', '.join(sorted(RECIPE_KEYS))}")
        stages = d.get("stages")
        if not isinstance(stages, list):
            raise RecipeError("a recipe needs a 'stages' list")
        for key in ("name", "description"):
            if d.get(key) is not None and not isinstance(d[key], str):
                raise RecipeError(f"recipe {key} must be a string, got {d[key]!r}")
        ignore = d.get("ignore") or []
        if isinstance(ignore, str):
            ignore = [ignore]
        if not isinstance(ignore, list):
            raise RecipeError(f"recipe ignore must be a list of module name patterns, got {ignore!r}")
        ft = d.get("finetune")
        return cls(name=d.get("name") or default_name, description=d.get("description") or "",
                   ignore=list(ignore), stages=[_build(s) for s in stages],
                   finetune=None if ft is None else FinetuneConfig.from_dict(ft))

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        where = f"recipe file {str(path)!r}"
        return cls.from_dict(load_yaml(_read_recipe_file(path, where), where), default_name=path.stem)

    def to_yaml(self) -> str:
        """The recipe as YAML that load_recipe reads back (no anchors or aliases, even where two
        stages share a list)."""
        return yaml.dump(self.to_dict(), Dumper=_NoAliasDumper, sort_keys=False)


def _read_recipe_file(path: Path, where: str) -> str:
    """The text of a recipe file: a regular file of at most MAX_RECIPE_BYTES of UTF-8, read
    with a bound (never a FIFO, a device or a huge file read whole)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise RecipeError(f"{where} does not exist") from None
    except OSError as e:
        raise RecipeError(f"cannot read {where}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise RecipeError(f"{where} is not a regular file")
    too_big = f"{where} is larger than {MAX_RECIPE_BYTES / 2**20:g} MiB, the most a recipe may be"
    if st.st_size > MAX_RECIPE_BYTES:
        raise RecipeError(too_big)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise RecipeError(f"cannot read {where}: {e.strerror}") from None
    if len(data) > MAX_RECIPE_BYTES:  # it grew since stat
        raise RecipeError(too_big)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{where} is not valid YAML: {first_line(e)}") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")  # as Path.read_text reads it


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data):
        return True


class _Refused(Exception):
    """A YAML construct that recipes do not allow (anchors and aliases, deep nesting)."""


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader without anchors and aliases (no "billion laughs": a small file that expands to
    an enormous value through nested aliases) and with bounded nesting (no deep recursion)."""

    _depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused(f"YAML anchors and aliases (&, *) are not allowed in a recipe "
                           f"(line {event.start_mark.line + 1})")
        if self._depth >= MAX_YAML_DEPTH:
            raise _Refused(f"nested more than {MAX_YAML_DEPTH} levels deep (line {event.start_mark.line + 1})")
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_yaml(text: str, where: str):
    """The value of the YAML document ``text`` (``where`` names it in errors) read by
    _RecipeLoader: RecipeError on invalid YAML, anchors, aliases or deep nesting."""
    loader = _RecipeLoader(text)
    try:
        return loader.get_single_data()
    except _Refused as e:
        raise RecipeError(f"{where}: {e}") from None
    except (yaml.YAMLError, RecursionError) as e:
        raise RecipeError(f"{where} is not valid YAML: {first_line(e)}") from None
    finally:
        loader.dispose()


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
        where = f"built-in recipe {name_or_path!r}"
        return Recipe.from_dict(load_yaml(builtins[name_or_path].read_text(), where), default_name=name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or Path(name_or_path).exists():
        return Recipe.from_yaml(name_or_path)
    raise RecipeError(f"unknown recipe {name_or_path!r}; built-in: {', '.join(builtins)} (or a .yaml file)")
