"""Models larger than RAM: decoder blocks read from safetensors one at a time and written out
one at a time (``slimkit compress --low-memory``).

The model is built with ONE real decoder block (the shell: embeddings, final norm, head and
block 0, loaded from the checkpoint); every other block is held as an empty structure on the
meta device, built from the config for its own index (its own layer type: sliding or global
attention, dense or mixture-of-experts), materialized and filled from the memory-mapped
safetensors files when the engine reaches it, and dropped once its compressed weights are in the
output shard. Peak memory is then the shell, one block, its statistics and
the calibration activations, whatever the number of blocks.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import ModelError, first_line
from .layout import ModelLayout, layout_for
from .loading import CHUNK_ELEMENTS, check_complete, check_finite, check_tokenizer_fits, resolve

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
_DTYPE_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "I8": 1, "BOOL": 1}


class TensorStore:
    """Every tensor of a safetensors model folder (one file or an index of shards), read on demand."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.where: dict[str, Path] = {}
        index = self.folder / INDEX
        try:
            if index.is_file():
                for key, fname in json.loads(index.read_text())["weight_map"].items():
                    self.where[key] = self.folder / fname
            else:
                for f in sorted(self.folder.glob("model*.safetensors")):  # not e.g. slimkit_state.safetensors
                    with safe_open(str(f), "pt") as h:
                        for key in h.keys():
                            self.where[key] = f
        except Exception as e:
            raise ModelError(f"cannot read the weights of {str(self.folder)!r}: {first_line(e)}") from None
        if not self.where:
            raise ModelError(f"--low-memory needs safetensors weights; {str(self.folder)!r} has none")

    def get(self, key: str) -> torch.Tensor:
        f = self.where.get(key)
        if f is None:
            raise ModelError(f"the weights of {str(self.folder)!r} have no tensor {key!r} (--low-memory reads tensors "
                             "under the model's own parameter names; a checkpoint that transformers renames or fuses "
                             "at load, e.g. per-expert keys of a mixture-of-experts model, compresses in memory)")
        try:  # opened per read: a mapping kept open would keep the file's pages in this process
            with safe_open(str(f), "pt") as h:
                return h.get_tensor(key)
        except Exception as e:
            raise ModelError(f"cannot load the weights of {str(self.folder)!r}: {first_line(e)}") from None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of every tensor, from the files' headers (no tensor data is read); a tensor
        the index names but its file does not hold is left out (then reported missing)."""
        out: dict[str, tuple[int, ...]] = {}
        by_file: dict[Path, list[str]] = {}
        for key, f in self.where.items():
            by_file.setdefault(f, []).append(key)
        for f, keys in by_file.items():
            try:
                with safe_open(str(f), "pt") as h:
                    held = set(h.keys())
                    for key in keys:
                        if key in held:
                            out[key] = tuple(h.get_slice(key).get_shape())
            except Exception as e:
                raise ModelError(f"cannot read the weights of {str(self.folder)!r}: {first_line(e)}") from None
        return out

    def pieces(self, key: str, elements: int = CHUNK_ELEMENTS) -> Iterator[torch.Tensor]:
        """Tensor ``key`` in pieces of whole rows of about ``elements`` values (one piece at a time
        in memory, whatever the tensor's size)."""
        try:
            with safe_open(str(self.where[key]), "pt") as h:
                sl = h.get_slice(key)
                shape = sl.get_shape()
                if len(shape) < 2:
                    yield h.get_tensor(key)
                    return
                row = max(1, torch.Size(shape[1:]).numel())
                step = max(1, elements // row)
                for start in range(0, shape[0], step):
                    yield sl[start:start + step]
        except ModelError:
            raise
        except Exception as e:
            raise ModelError(f"cannot load the weights of {str(self.folder)!r}: {first_line(e)}") from None

    def scanned(self, keys) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, piece) for every piece of every tensor of ``keys``, read one at a time (for check_finite)."""
        for key in keys:
            for piece in self.pieces(key):
                yield key, piece


def _ignore_regex(patterns) -> re.Pattern | None:
    patterns = set(patterns or ())
    return re.compile("|".join(f"({p})" for p in patterns)) if patterns else None


def check_store(spec: str, store: TensorStore, model: nn.Module) -> None:
    """Before any work: the checkpoint holds every tensor ``model`` (the full model, built on the meta
    device) should have, with its shape, and nothing else (as transformers' loading allows: a tied
    weight whose partner is stored, the class's ``_keys_to_ignore_on_load_missing/unexpected``
    patterns, legacy rotary ``inv_freq`` and ``position_ids`` buffers); then every stored value is
    finite, read one piece at a time."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes = store.shapes()
    aliases: dict[int, list[str]] = {}  # tied parameters: one Parameter under several names
    for name, prm in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(prm), []).append(name)
    stored_alias = {n for names in aliases.values() if any(m in shapes for m in names) for n in names}
    skip_missing = _ignore_regex(getattr(model, "_keys_to_ignore_on_load_missing", None))
    unexpected_patterns = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    buffers = [n for n, _ in model.named_buffers()]
    if any(n.endswith("rotary_emb.inv_freq") for n in buffers):
        unexpected_patterns.add(r"rotary_emb\.inv_freq")
    if any(n.endswith("position_ids") for n in buffers):
        unexpected_patterns.add(r"(^|\.)position_ids$")
    skip_unexpected = _ignore_regex(unexpected_patterns)
    missing = {k for k in expected if k not in shapes and k not in stored_alias
               and not (skip_missing and skip_missing.search(k))}
    unexpected = {k for k in store.where if k not in expected and not (skip_unexpected and skip_unexpected.search(k))}
    mismatched = [(k, shapes[k], expected[k]) for k in expected if k in shapes and shapes[k] != expected[k]]
    check_complete(spec, missing, unexpected, mismatched,
                   hint=" (--low-memory reads tensors under the model's own names; without it, transformers "
                        "may rename or fuse some at load)" if missing or unexpected else "")
    check_finite(spec, store.scanned(sorted(k for k in expected if k in shapes)))


def _one_block_config(config):
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = 1
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[:1]
    return cfg


class StreamedModel:
    """The shell model (one block) plus the means to fetch and write every block."""

    resident = False

    def __init__(self, spec: str, with_tokenizer: bool = True, dtype="auto"):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from ..calib.device import resolve_dtype

        kind, loc = resolve(spec)
        if kind != "dir":
            raise ModelError(f"--low-memory reads a local safetensors folder; {spec!r} is a {kind} model")
        self.location = loc
        try:
            self.config = AutoConfig.from_pretrained(loc)
        except Exception as e:
            raise ModelError(f"cannot read the config of {spec!r}: {first_line(e)}") from None
        self.dtype = resolve_dtype(dtype, self.config)  # storage: the checkpoint's own, by default
        self.store = TensorStore(loc)
        self.n_blocks = int(self.config.num_hidden_layers)
        # every block's own structure, at no memory cost; the shell runs all of them (as the
        # engine's recorders) with the full config, so each block gets its own arguments
        with torch.device("meta"):
            full = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype)
        check_store(spec, self.store, full)  # before any work: every tensor there, none extra, all finite
        self.model = AutoModelForCausalLM.from_config(_one_block_config(self.config), dtype=self.dtype)
        self.model.eval().requires_grad_(False)
        self.model.config.use_cache = False
        self.layout: ModelLayout = layout_for(self.model)
        self.block_transforms = []  # fn(index, block) of model-level stages, applied as each block is read
        self.prefix = self.layout.blocks_path + "."
        shell = {k: v for k, v in self.model.state_dict().items() if not k.startswith(self.prefix)}
        tied = getattr(self.config, "tie_word_embeddings", False)
        for key, t in shell.items():
            if key not in self.store.where:
                continue  # tied to a stored tensor (restored by tie_weights below) or allowed absent (check_store)
            t.copy_(self.store.get(key))  # (copy_ casts to the shell's dtype)
        if tied:
            self.model.tie_weights()
        self.template = self.layout.blocks(self.model)[0]
        self.fill(0, self.template)
        self.structures = layout_for(full).blocks(full)
        parent, _, attr = self.layout.blocks_path.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, attr,
                nn.ModuleList([self.template, *list(self.structures)[1:]]))
        # what the checkpoint does not hold but the construction computed (e.g. rotary inv_freq)
        check_finite(spec, self.model.named_buffers())
        self.model.config.num_hidden_layers = self.n_blocks
        if isinstance(getattr(self.config, "layer_types", None), list):
            self.model.config.layer_types = list(self.config.layer_types)
        self.tokenizer = None
        if with_tokenizer:
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(loc)
            except Exception as e:
                raise ModelError(f"cannot load the tokenizer of {spec!r}: {first_line(e)}") from None
            check_tokenizer_fits(spec, self.model, self.tokenizer)

    def fill(self, index: int, block: nn.Module) -> nn.Module:
        for name, t in list(block.named_parameters()) + list(block.named_buffers()):
            key = f"{self.prefix}{index}.{name}"
            if key in self.store.where or isinstance(t, nn.Parameter):
                t.data = self.store.get(key).to(t.dtype if not t.is_floating_point() else
                                                self.dtype if isinstance(t, nn.Parameter) else t.dtype)
        for m in block.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = index
        return block

    # the engine's block source -----------------------------------------------------------
    def __len__(self) -> int:
        return self.n_blocks

    def peek(self, index: int) -> nn.Module:
        """A module with block ``index``'s structure (for names and shapes only)."""
        return self.template if index == 0 else self.structures[index]

    def transform_blocks(self, fn) -> None:
        """Apply ``fn(index, block)`` to block 0 (resident in the shell) now, and to every other
        block as ``get`` reads it from the checkpoint (a model-level stage such as rotate)."""
        fn(0, self.template)
        self.block_transforms.append(fn)

    def get(self, index: int) -> nn.Module:
        if index == 0:
            return self.template
        block = copy.deepcopy(self.structures[index]).to_empty(device="cpu")
        # buffers the checkpoint does not hold (computed at construction) come from block 0
        ref = dict(self.template.named_buffers())
        for name, b in block.named_buffers():
            if f"{self.prefix}{index}.{name}" not in self.store.where:
                if name not in ref or ref[name].shape != b.shape:
                    raise ModelError(f"--low-memory cannot build block {index}: its buffer {name!r} is "
                                     "neither in the checkpoint nor in block 0")
                b.data = ref[name].clone()
        self.fill(index, block)
        for fn in self.block_transforms:
            fn(index, block)
        return block

    def block_prefix(self, index: int) -> str:
        return f"{self.prefix}{index}."

    def linears(self, index: int, block: nn.Module) -> dict[str, nn.Linear]:
        return {f"{self.prefix}{index}.{n}": m for n, m in block.named_modules() if isinstance(m, nn.Linear)}

    # output ------------------------------------------------------------------------------
    def shard_name(self, index: int) -> str:
        return f"model-{index + 1:05d}-of-{self.n_blocks + 1:05d}.safetensors"

    def write_block(self, index: int, block: nn.Module, out: Path) -> None:
        tensors = {f"{self.prefix}{index}.{k}": v.contiguous() for k, v in block.state_dict().items()}
        save_file(tensors, str(out / self.shard_name(index)), metadata={"format": "pt"})

    def write_rest(self, out: Path) -> None:
        """The shell's own tensors, the shard index, the config (and the tokenizer)."""
        seen: set[int] = set()
        shell = {}
        for k, v in self.model.state_dict().items():
            if k.startswith(self.prefix) or v.data_ptr() in seen:
                continue  # blocks are in their shards; a tied head is stored once, as the embedding
            seen.add(v.data_ptr())
            shell[k] = v.contiguous()
        last = self.shard_name(self.n_blocks)
        save_file(shell, str(out / last), metadata={"format": "pt"})
        weight_map = {k: last for k in shell}
        total = sum(v.numel() * v.element_size() for v in shell.values())
        for i in range(self.n_blocks):
            with safe_open(str(out / self.shard_name(i)), "pt") as h:
                for k in h.keys():
                    weight_map[k] = self.shard_name(i)
                    sl = h.get_slice(k)
                    total += torch.Size(sl.get_shape()).numel() * _DTYPE_BYTES.get(sl.get_dtype(), 4)
        (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                             "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        config = copy.deepcopy(self.config)
        for c, shell in ((config, self.model.config), (config.get_text_config(), self.model.config.get_text_config())):
            if hasattr(shell, "tie_word_embeddings"):  # a model-level stage may have untied the head
                c.tie_word_embeddings = shell.tie_word_embeddings
        config.dtype = self.dtype
        config.use_cache = True
        config.save_pretrained(out)
        gen = Path(self.location) / "generation_config.json"
        if gen.is_file():
            shutil.copyfile(gen, out / gen.name)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(out)
