"""What compression decided for every Linear, persisted next to the fake-quantized model.

``slimkit_state.safetensors`` holds, per Linear ``P``: ``P.codes`` (uint8 integer codes of the
base weight) with ``P.scale`` / ``P.zero`` (per row and group), ``P.mask`` (uint8, 1 = kept),
``P.L`` / ``P.R`` (low-rank adapters, y += (x L) R), ``P.weight`` (the fp32 base weight, when it
is not quantized but differs from the model's merged weight), and any tensors a method adds.
``slimkit.json`` holds the matching per-layer metadata under ``"layers"``. Exporters build every
other format from these two files.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .calib.checkpoint import atomic_write
from .errors import SlimkitError, first_line
from .methods.base import LinearState
from .ops.quant import quantize_matrix

STATE_FILE = "slimkit_state.safetensors"
STATE_INDEX = "slimkit_state.index.json"  # instead of STATE_FILE when written block by block
META_FILE = "slimkit.json"


def layer_record(state: LinearState) -> tuple[dict[str, torch.Tensor], dict]:
    out, k = state.weight.shape
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {"shape": [out, k], "grid": state.notes.get("grid") or (state.quant.describe() if state.quant else "fp16")}
    if state.quant is not None:
        spec = state.quant
        W = state.weight
        if "input_scale" in state.tensors:  # W = dequant(codes) * input_scale (SLiM-Quant^O outlier channels)
            W = W / state.tensors["input_scale"][None, :]
        tensors["codes"] = quantize_matrix(W, state.scale, state.zero, spec).to(torch.uint8)
        tensors["scale"] = state.scale.float()
        tensors["zero"] = state.zero.to(torch.uint8)
        meta["quant"] = {"bits": spec.bits, "group_size": spec.group_size, "symmetric": spec.symmetric,
                         "per_tensor": spec.per_tensor}
    if state.mask is not None:
        tensors["mask"] = state.mask.to(torch.uint8)
        meta["sparsity"] = state.sparsity.describe() if state.sparsity else "mask"
    if state.L is not None:
        tensors["L"], tensors["R"] = state.L.float(), state.R.float()
        meta["adapters"] = {"rank": state.rank, "bits": state.adapter_bits, "group": state.adapter_group}
        if state.quant is None:
            tensors["weight"] = state.weight.float()
    for key, value in state.tensors.items():
        tensors[key] = value
    if "vq" in state.notes:  # how to decode a vector-quantized base from its tensors
        meta["vq"] = state.notes["vq"]
    if "gguf" in state.notes:  # the GGUF block type of ``gguf_blocks`` and the llama.cpp file type
        meta["gguf"] = state.notes["gguf"]
    meta["bits"] = state.bits()
    # records live on the CPU (a stage may leave its tensors on the compute device)
    return {f"{state.name}.{k}": v.detach().cpu().contiguous() for k, v in tensors.items()}, meta


def save_sorted(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Sorted, with ONE metadata key (safetensors writes metadata in hash order): the file's bytes
    depend only on its content, not on the order of recording (resume) or the process. The file is
    written beside and renamed into place: a checkpoint may hold a hard link to the one it replaces
    (a resumed streamed run may write a restored block's records again), which must keep its content."""
    atomic_write(path, lambda tmp: save_file({k: tensors[k].contiguous() for k in sorted(tensors)}, str(tmp),
                                             metadata={"format": "slimkit-state/1"}))


def _holds(path: Path, tensors: dict[str, torch.Tensor]) -> bool:
    """Whether the safetensors file ``path`` holds exactly ``tensors`` (names, dtypes, values)."""
    try:
        there = load_file(str(path))
    except Exception:  # missing, truncated: not what it should be
        return False
    return there.keys() == tensors.keys() and all(
        there[k].dtype == v.dtype and there[k].shape == v.shape and torch.equal(there[k], v.cpu())
        for k, v in tensors.items())


class StateRecorder:
    """An ``on_layer`` callback for the engine that keeps every layer's record."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self.layers: dict[str, dict] = {}
        self._new: list[str] = []
        self.shards: dict[str, str] = {}  # tensor -> shard file, for records already written out

    def spill(self, directory: Path, index: int, tensors: dict[str, torch.Tensor], keep: bool = False) -> Path:
        """Write one block's records to their own shard and drop them from memory (models larger
        than RAM); ``save`` then writes an index of the shards. Returns the shard's path. ``keep``:
        a shard there that holds exactly these tensors is left as it is (a resumed run's restored
        block: the checkpoint may hold a hard link to it, which a rewrite would double)."""
        name = f"slimkit_state-{index:05d}.safetensors"
        if not (keep and _holds(Path(directory) / name, tensors)):
            save_sorted(tensors, Path(directory) / name)
        for k in tensors:
            self.tensors.pop(k, None)
            self.shards[k] = name
        return Path(directory) / name

    def __call__(self, state: LinearState) -> None:
        tensors, meta = layer_record(state)
        self.add(tensors, {state.name: meta})

    def add(self, tensors: dict[str, torch.Tensor], layers: dict[str, dict]) -> None:
        self.tensors.update(tensors)
        self.layers.update(layers)
        self._new += list(layers)

    def take_new(self) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
        """The records of the layers added since the last call (one block's, for a checkpoint)."""
        names, self._new = self._new, []
        prefixes = tuple(f"{n}." for n in names)
        return ({k: v for k, v in self.tensors.items() if k.startswith(prefixes)},
                {n: self.layers[n] for n in names})

    def save(self, directory: Path, header: dict) -> None:
        if self.shards:
            if self.tensors:
                raise RuntimeError("records left in memory next to written shards")
            (directory / STATE_INDEX).write_text(json.dumps({"weight_map": dict(sorted(self.shards.items()))}, indent=1))
        else:
            save_sorted(self.tensors, directory / STATE_FILE)
        (directory / META_FILE).write_text(json.dumps(header | {"layers": self.layers}, indent=1))


def load_state(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """-> (tensors, metadata) of a compressed folder; one-line errors on missing or corrupt files."""
    d = Path(directory)
    meta_path, state_path, index_path = d / META_FILE, d / STATE_FILE, d / STATE_INDEX
    if not meta_path.is_file() or not (state_path.is_file() or index_path.is_file()):
        raise SlimkitError(f"{str(d)!r} is not a slimkit output folder (no {META_FILE} / {STATE_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
        files = sorted(set(json.loads(index_path.read_text())["weight_map"].values())) \
            if not state_path.is_file() else [STATE_FILE]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SlimkitError(f"{str(meta_path)!r} or its index is corrupt: {e}") from None
    tensors = {}
    for name in files:
        try:
            tensors.update(load_file(str(d / name)))
        except Exception as e:
            raise SlimkitError(f"{str(d / name)!r} is corrupt: {first_line(e)}") from None
    return tensors, meta
