"""How a compressed Linear's base weight is stored: one registered type per storage form.

Methods leave their result in a layer's state tensors; which tensors (and which slimkit.json
record) they leave decides the form. Every exporter asks ``form_of`` and says which forms it
can hold, so a layer that a format cannot hold is refused by name instead of silently
becoming a float weight.

- ``uniform``: integer codes on a per-(row, group) grid: ``codes``, ``scale``, ``zero``
  (RTN, GPTQ, SparseGPT+GPTQ, SLiM-Quant with ``input_scale``);
- ``mixed``: the same with a bit-width per group, ``group_bits`` (SliM-LLM);
- ``vq``: a vector-quantized code, ``vq_codes``, ``vq_codebook``, ... (ReALLM);
- ``gguf``: llama.cpp block bytes of one GGUF type, ``gguf_blocks`` (rtn_gguf, gptq_gguf);
- ``dense``: a float weight (pruned-only, adapters on a float base, untouched).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class StorageForm:
    name: str
    keys: tuple[str, ...]  # the state tensors that make this form (all present)
    describe: Callable[[dict, dict], str]  # (tensors, meta) -> e.g. "W4 g64 asym", "GGUF Q4_K"

    def matches(self, tensors: dict) -> bool:
        return all(k in tensors for k in self.keys)


def _uniform(t, meta):
    q = meta.get("quant") or {}
    g = q.get("group_size")
    return f"W{q.get('bits')} {'g' + str(g) if g else 'per-channel'} {'sym' if q.get('symmetric') else 'asym'} grid"


FORMS: list[StorageForm] = []


def register(form: StorageForm) -> StorageForm:
    FORMS.append(form)
    return form


GGUF = register(StorageForm("gguf", ("gguf_blocks",), lambda t, m: f"GGUF {(m.get('gguf') or {}).get('type', '?')} blocks"))
VQ = register(StorageForm("vq", ("vq_codes", "vq_codebook"), lambda t, m: "vector-quantized code (ReALLM)"))
MIXED = register(StorageForm("mixed", ("codes", "scale", "zero", "group_bits"),
                             lambda t, m: "mixed per-group bit-widths (SliM-LLM)"))
UNIFORM = register(StorageForm("uniform", ("codes", "scale", "zero"), _uniform))
DENSE = register(StorageForm("dense", (), lambda t, m: "float weight"))


def form_of(tensors: dict[str, torch.Tensor]) -> StorageForm:
    """The first registered form whose tensors are all present (``dense`` matches anything)."""
    return next(f for f in FORMS if f.matches(tensors))
