"""Reading a slimkit output folder (fake-quantized HF weights + slimkit_state + slimkit.json)
as per-Linear records that every exporter builds from."""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .. import __version__
from ..errors import SlimkitError, first_line  # noqa: F401 (pack modules import it from here)
from ..ops.quant import group_slices
from ..state_io import META_FILE, STATE_FILE, STATE_INDEX, load_state
from .forms import GGUF, StorageForm, form_of


class PackError(SlimkitError):
    """A packed or exported folder is missing, corrupt, truncated or of an unknown version."""


META_FORMAT, META_VERSION = "slimkit-fakequant", 1  # what `slimkit compress` writes in slimkit.json
MAX_JSON_BYTES = 256 << 20  # slimkit.json / an index: a few hundred bytes per layer
SAFETENSORS_HEADER_MAX = 100 << 20  # the safetensors library's own limit on a header


def read_json_file(path: Path, what: str = "") -> object:
    """The JSON value of the regular file ``path`` (at most MAX_JSON_BYTES); PackError
    "'path' is corrupt: ..." when it is not one."""
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise PackError(f"{str(path)!r} is not a regular file")
        if size > MAX_JSON_BYTES:
            raise PackError(f"{str(path)!r} is corrupt: {size} bytes, more than {what or 'such a file'} ever holds")
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
        return json.loads(data.decode("utf-8"))
    except FileNotFoundError:
        raise PackError(f"{str(path)!r} is missing") from None
    except OSError as e:
        raise PackError(f"cannot read {str(path)!r}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise PackError(f"{str(path)!r} is corrupt: not JSON ({first_line(e)})") from None


def _int(v, lo: int = 1, hi: int | None = None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _check_fields(obj, spec: dict, where: str, required=()) -> str | None:
    """What is wrong with the JSON object ``obj`` against ``spec`` (key -> (test, wanted)), else None."""
    if not isinstance(obj, dict):
        return f"{where} is a {type(obj).__name__}, not an object"
    for key in required:
        if key not in obj:
            return f"{where or 'it'} has no {key!r}"
    for key, (test, want) in spec.items():
        if key in obj and not test(obj[key]):
            return f"{where + ': ' if where else ''}{key!r} must be {want}, got {obj[key]!r}"
    return None


_OPT_STR = (lambda v: isinstance(v, str), "a string")
_LAYER = {
    "shape": (lambda v: isinstance(v, list) and len(v) == 2 and all(_int(x) for x in v), "[out, in] positive integers"),
    "grid": _OPT_STR,
    "sparsity": _OPT_STR,
    "bits": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and _number(x) for k, x in v.items()),
             "an object of bit counts"),
    "quant": (lambda v: isinstance(v, dict), "an object"),
    "adapters": (lambda v: isinstance(v, dict), "an object"),
    "vq": (lambda v: isinstance(v, dict), "an object"),
    "gguf": (lambda v: isinstance(v, dict), "an object"),
}
_QUANT = {
    "bits": (lambda v: _int(v, 1, 16), "an integer from 1 to 16"),
    "group_size": (lambda v: v is None or _int(v), "a positive integer or null"),
    "symmetric": (lambda v: isinstance(v, bool), "true or false"),
    "per_tensor": (lambda v: isinstance(v, bool), "true or false"),
}
_ADAPTERS = {
    "rank": (lambda v: _int(v, 0), "a non-negative integer"),
    "bits": (lambda v: v is None or _int(v, 1, 16), "an integer from 1 to 16 or null"),
    "group": (lambda v: _int(v), "a positive integer"),
}
_GGUF = {"type": _OPT_STR, "ftype": _OPT_STR, "pure": (lambda v: isinstance(v, bool), "true or false"),
         "imatrix": (lambda v: isinstance(v, bool), "true or false")}
_VQ = {key: (lambda v: _int(v), "a positive integer") for key in ("d", "code_bits", "block", "scale_group")}
_HEADER = {
    "slimkit_version": _OPT_STR, "source_model": _OPT_STR, "model_type": _OPT_STR,
    "recipe": (lambda v: isinstance(v, dict), "an object"),
    "layers": (lambda v: isinstance(v, dict), "an object (layer name -> its record)"),
}


def _safetensors_header(path: Path) -> dict:
    """The header of a safetensors file, after checking that the file holds every byte it
    describes (a truncated or overwritten file is a one-line PackError, not a crash later)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 2 <= n <= min(SAFETENSORS_HEADER_MAX, size - 8):
                raise PackError(f"{str(path)!r} is corrupt: no safetensors header in its {size} bytes (truncated?)")
            header = json.loads(f.read(n).decode("utf-8"))
    except FileNotFoundError:
        raise PackError(f"{str(path)!r} is missing") from None
    except OSError as e:
        raise PackError(f"cannot read {str(path)!r}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PackError(f"{str(path)!r} is corrupt: its safetensors header is not JSON ({first_line(e)})") from None
    if not isinstance(header, dict):
        raise PackError(f"{str(path)!r} is corrupt: its safetensors header is not an object")
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_int(x, 0) for x in offsets)
                and isinstance(entry.get("shape"), list)):
            raise PackError(f"{str(path)!r} is corrupt: bad safetensors entry {key!r}")
        end = max(end, offsets[1])
    if size != 8 + n + end:
        raise PackError(f"{str(path)!r} is corrupt: {size} bytes, its header describes {8 + n + end} (truncated?)")
    return {k: v for k, v in header.items() if k != "__metadata__"}


def _state_shapes(d: Path) -> dict[str, list[int]]:
    """Shapes of every tensor of a folder's slimkit_state (one file or shards named by its index),
    with every file checked present and complete."""
    if (d / STATE_FILE).exists() or not (d / STATE_INDEX).exists():
        files, by = [STATE_FILE], d / META_FILE
    else:
        by = d / STATE_INDEX
        index = read_json_file(d / STATE_INDEX, "an index")
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not (isinstance(wm, dict) and all(isinstance(k, str) and isinstance(v, str) and v and Path(v).name == v
                                             for k, v in wm.items())):
            raise PackError(f"{str(d / STATE_INDEX)!r} is corrupt: it needs a 'weight_map' of tensor -> file name")
        files = sorted(set(wm.values()))
    shapes = {}
    for name in files:
        if not (d / name).is_file():
            raise PackError(f"{str(d / name)!r} is missing (the state that {str(by)!r} refers to)")
        shapes.update({k: v["shape"] for k, v in _safetensors_header(d / name).items()})
    return shapes


def read_meta(directory: str | Path) -> dict:
    """The validated slimkit.json of a slimkit output folder (format, version, one record per
    layer, each with what the exporters read), after checking that slimkit_state holds the
    tensors it lists in full. Every problem is one PackError naming the file and what is wrong."""
    d = Path(directory)
    path = d / META_FILE
    if not path.is_file():
        raise PackError(f"{str(d)!r} is not a slimkit output folder (no {META_FILE} / {STATE_FILE})")
    meta = read_json_file(path, "a slimkit.json")
    if not isinstance(meta, dict):
        raise PackError(f"{str(path)!r} is corrupt: it holds a JSON {type(meta).__name__}, not an object")
    if "format" not in meta or "version" not in meta:
        raise PackError(f"{str(path)!r} is corrupt: it has no 'format' and 'version'")
    if meta["format"] != META_FORMAT:
        raise PackError(f"{str(path)!r} has format {meta['format']!r}; this slimkit reads {META_FORMAT!r}")
    if not _int(meta["version"], META_VERSION, META_VERSION):
        raise PackError(f"{str(path)!r} has format version {meta['version']!r}; this slimkit ({__version__}) "
                        f"reads version {META_VERSION}")
    problem = _check_fields(meta, _HEADER, "", required=("layers",))
    for name, lm in (meta["layers"].items() if problem is None else ()):
        where = f"layer {name!r}"
        problem = _check_fields(lm, _LAYER, where, required=("shape",)) \
            or ("quant" in lm and _check_fields(lm["quant"], _QUANT, f"{where} quant", required=("bits",))) \
            or ("adapters" in lm and _check_fields(lm["adapters"], _ADAPTERS, f"{where} adapters")) \
            or ("vq" in lm and _check_fields(lm["vq"], _VQ, f"{where} vq", required=tuple(_VQ))) \
            or ("gguf" in lm and (_check_fields(lm["gguf"], _GGUF, f"{where} gguf", required=("type", "ftype"))
                                  or _gguf_type_problem(lm["gguf"], where))) or None
        if problem:
            break
    if problem:
        raise PackError(f"{str(path)!r} is corrupt: {problem}")
    _check_state(d, meta["layers"])
    return meta


def _gguf_type_problem(rec: dict, where: str) -> str | None:
    from ..ops.gguf import FTYPES, TYPES

    if rec["type"] not in TYPES:
        return f"{where} gguf: unknown block type {rec['type']!r}"
    if rec["ftype"] not in FTYPES:
        return f"{where} gguf: unknown llama.cpp file type {rec['ftype']!r}"
    return None


def _check_state(d: Path, layers: dict) -> None:
    """PackError when slimkit_state lacks a tensor that slimkit.json's records need, or holds it
    in a shape that does not fit the layer."""
    shapes = _state_shapes(d)
    for name, lm in layers.items():
        out, k = lm["shape"]
        need = {}
        if "quant" in lm:
            need |= {"codes": [out, k], "scale": None, "zero": None}
        if "sparsity" in lm:
            need["mask"] = [out, k]
        if "adapters" in lm:
            need |= {"L": None, "R": None}
        if "gguf" in lm:
            from ..ops.gguf import TYPES

            t = TYPES[lm["gguf"]["type"]]
            if k % t.block:
                raise PackError(f"{str(d / META_FILE)!r} records layer {name!r} in GGUF {t.name}, whose blocks of "
                                f"{t.block} do not divide its {k} columns")
            need["gguf_blocks"] = [out, k // t.block * t.type_size]
        for key, shape in need.items():
            got = shapes.get(f"{name}.{key}")
            if got is None:
                raise PackError(f"{str(d / META_FILE)!r} records layer {name!r}, but the state has no "
                                f"tensor {name + '.' + key!r}")
            if shape is not None and got != shape:
                raise PackError(f"{str(d / META_FILE)!r} records layer {name!r} as {shape}, but its state's "
                                f"{key} has shape {got}")
        if "adapters" in lm:
            L, R = shapes[f"{name}.L"], shapes[f"{name}.R"]
            if len(L) != 2 or len(R) != 2 or L[0] != k or R[1] != out or L[1] != R[0]:
                raise PackError(f"{name}: adapters of shapes {L} and {R} do not fit a [{out}, {k}] layer")


def expand_groups(params: torch.Tensor, in_features: int, group_size: int | None) -> torch.Tensor:
    """(out, G) or (G,) per-group values -> (out, in) / (in,) per-column values (ragged last group)."""
    g = group_size or in_features
    return params.repeat_interleave(g, dim=-1)[..., :in_features]


@dataclass
class LayerRecord:
    """One compressed Linear as slimkit recorded it. ``tensors`` are the state tensors without
    the ``name.`` prefix (codes, scale, zero, mask, L, R, weight, group_bits, input_scale, ...)."""

    name: str
    meta: dict
    tensors: dict[str, torch.Tensor]
    effective: torch.Tensor  # (out, in) the weight the fake-quantized model computes with
    bias: torch.Tensor | None = None
    extras: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        if self.effective.dim() == 2:
            return tuple(self.effective.shape)
        return tuple(self.meta["shape"])

    @property
    def quant(self) -> dict | None:
        return self.meta.get("quant") if "codes" in self.tensors else None

    @property
    def group_size(self) -> int | None:
        return self.quant.get("group_size") if self.quant else None

    @property
    def has_adapters(self) -> bool:
        return "L" in self.tensors

    @property
    def form(self) -> StorageForm:
        return form_of(self.tensors)

    def describe_form(self) -> str:
        return self.form.describe(self.tensors, self.meta)

    def require_form(self, allowed: tuple[str, ...], fmt: str, hint: str = "") -> StorageForm:
        """This layer's storage form, or a PackError naming it when ``fmt`` cannot hold it."""
        form = self.form
        if form.name not in allowed:
            raise PackError(f"{self.name} is stored as {self.describe_form()}, which {fmt} cannot hold"
                            + (f"; {hint}" if hint else ""))
        return form

    def column_bits(self) -> torch.Tensor:
        """(in,) bit-width of every column's codes (per-group bits from ``group_bits`` if present)."""
        k = self.shape[1]
        gb = self.tensors.get("group_bits")
        if gb is not None:
            return expand_groups(gb.to(torch.int64).reshape(-1), k, self.group_size)
        return torch.full((k,), int(self.quant["bits"]), dtype=torch.int64)

    def dequantized(self) -> torch.Tensor:
        """Base weight (out, in) from codes: (codes - zero) * scale [* input_scale], as the grids compute it."""
        t, k, g = self.tensors, self.shape[1], self.group_size
        s, z = expand_groups(t["scale"].float(), k, g), expand_groups(t["zero"].float(), k, g)
        W = (t["codes"].float() - z) * s
        if "input_scale" in t:
            W = W * t["input_scale"].float()[None, :]
        return W

    def base_weight(self) -> torch.Tensor:
        if "weight" in self.tensors:
            return self.tensors["weight"].float()
        if self.form is GGUF:
            from ..ops.gguf import TYPES, dequantize_data

            return dequantize_data(self.tensors["gguf_blocks"], TYPES[self.meta["gguf"]["type"]], self.shape[1])
        if "codes" in self.tensors:
            return self.dequantized()
        if self.has_adapters:
            raise PackError(f"{self.name}: adapters without a stored base weight or codes")
        return self.effective

    def merged(self, base: torch.Tensor | None = None) -> torch.Tensor:
        """base + (L R)^T computed as LinearState.effective_weight does."""
        base = self.base_weight() if base is None else base
        if not self.has_adapters:
            return base
        return base + (self.tensors["L"].float() @ self.tensors["R"].float()).T

    def exact(self) -> bool:
        """Does the recorded state reproduce the fake-quantized weight bit for bit?"""
        return torch.equal(self.merged(), self.effective)


class SlimkitFolder:
    """A slimkit output folder. ``dense`` holds every model tensor that is not the weight of
    a compressed Linear (embeddings, norms, biases, lm_head, untouched Linears)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not (self.dir / "config.json").is_file():
            raise PackError(f"{str(self.dir)!r} is not a model folder (no config.json)")
        self.header = read_meta(self.dir)  # validated, and the state checked complete
        tensors, _ = load_state(self.dir)
        self.layer_meta: dict[str, dict] = self.header.get("layers", {})
        self._state = tensors
        self.model_tensors = read_model_tensors(self.dir)
        self.config = json.loads((self.dir / "config.json").read_text())

    def layer_names(self) -> list[str]:
        return list(self.layer_meta)

    def record(self, name: str) -> LayerRecord:
        prefix = name + "."
        t = {k[len(prefix):]: v for k, v in self._state.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        key = prefix + "weight"
        if key not in self.model_tensors:
            raise PackError(f"{str(self.dir)!r}: the model has no tensor {key!r} recorded in {META_FILE}")
        eff = self.model_tensors[key]
        if eff.dim() == 2 and list(eff.shape) != self.layer_meta[name]["shape"]:
            raise PackError(f"{str(self.dir)!r}: the model's {key!r} has shape {list(eff.shape)}, {META_FILE} "
                            f"says {self.layer_meta[name]['shape']}")
        known = {"codes", "scale", "zero", "mask", "L", "R", "weight"}
        return LayerRecord(name, self.layer_meta[name], t, eff, self.model_tensors.get(prefix + "bias"),
                           extras=sorted(set(t) - known))

    def records(self):
        for name in self.layer_names():
            yield self.record(name)

    def dense_tensors(self) -> dict[str, torch.Tensor]:
        skip = {n + ".weight" for n in self.layer_meta}
        return {k: v for k, v in self.model_tensors.items() if k not in skip}


def read_model_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a HF folder's safetensors weights (single file or sharded)."""
    files = sorted(directory.glob("model*.safetensors"))
    if not files:
        raise PackError(f"{str(directory)!r} has no model*.safetensors weights")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    out[k] = h.get_tensor(k)
        except Exception as e:
            raise PackError(f"{str(f)!r} is corrupt: {first_line(e)}") from None
    return out


def group_widths(in_features: int, group_size: int | None) -> list[int]:
    return [sl.stop - sl.start for sl in group_slices(in_features, group_size)]
