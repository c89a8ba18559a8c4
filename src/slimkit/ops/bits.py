"""What a compressed Linear costs in stored bits, part by part.

Conventions (the storage a deployment would use, and what the native format writes):
values are fp16 unless quantized; a quantized weight costs its bit-width; with a
mask only the kept values are stored, plus ceil(log2 M) position bits per kept
value for N:M or a 1-bit map per weight for unstructured sparsity; every (row,
group) has an fp16 scale and, for asymmetric grids, a zero point of the same
bit-width as the codes.
"""
from __future__ import annotations

import math

FP16 = 16


def weight_bits(out_features: int, in_features: int, *, bits: int | None = None, ngroups: int = 0,
                asymmetric: bool = False, kept: int | None = None, nm_m: int = 0) -> dict[str, int]:
    numel = out_features * in_features
    stored = numel if kept is None else kept
    parts = {"values": stored * (bits or FP16), "scales": 0, "zeros": 0, "mask": 0}
    if bits is not None:
        parts["scales"] = out_features * ngroups * FP16
        if asymmetric:
            parts["zeros"] = out_features * ngroups * bits
    if kept is not None:
        parts["mask"] = kept * math.ceil(math.log2(nm_m)) if nm_m else numel
    return parts
