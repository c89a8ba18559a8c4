"""Reading a slimkit output folder (fake-quantized HF weights + slimkit_state + slimkit.json)
as per-Linear records that every exporter builds from."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import SlimkitError, first_line  # noqa: F401 (pack modules import it from here)
from ..ops.quant import group_slices
from ..state_io import META_FILE, load_state


class PackError(SlimkitError):
    """A packed or exported folder is missing, corrupt, truncated or of an unknown version."""


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
        tensors, self.header = load_state(self.dir)
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
