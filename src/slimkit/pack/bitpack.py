"""Bit packing of small unsigned integers: a flat little-endian bit stream.

Value i of a b-bit stream occupies bits [i*b, (i+1)*b) of the stream, least significant bit
first, and stream bit j lives in byte j // 8 at bit j % 8. At 4 bits this is two codes per byte
(the low nibble first), at 8 bits one per byte, at 3 bits eight codes in three bytes.
"""
from __future__ import annotations

import torch


def packed_nbytes(count: int, bits: int) -> int:
    return -(-count * bits // 8)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Flat uint8 stream of ``values`` (any integer tensor, each in [0, 2^bits)), row-major."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    v = values.reshape(-1).to(torch.uint8)
    if bits == 8:
        return v.clone()
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte
        per = 8 // bits
        pad = -v.numel() % per
        v = torch.cat([v, v.new_zeros(pad)]).view(-1, per).to(torch.int32)  # (bytes, per)
        shifts = torch.arange(per, dtype=torch.int32) * bits
        return (v << shifts).sum(1).to(torch.uint8)
    stream = ((v[:, None] >> torch.arange(bits, dtype=torch.uint8)) & 1).reshape(-1)  # (count * bits,) bits
    pad = -stream.numel() % 8
    stream = torch.cat([stream, stream.new_zeros(pad)]).view(-1, 8).to(torch.int32)  # (bytes, 8)
    return (stream << torch.arange(8, dtype=torch.int32)).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` values as a flat uint8 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    p = packed.reshape(-1).to(torch.uint8)
    if p.numel() < packed_nbytes(count, bits):
        raise ValueError(f"a {bits}-bit stream of {count} values needs {packed_nbytes(count, bits)} bytes, "
                         f"got {p.numel()}")
    if bits == 8:
        return p[:count].clone()
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.uint8) * bits
        return ((p[:, None] >> shifts) & (2**bits - 1)).reshape(-1)[:count]
    stream = ((p[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[: count * bits]  # (count*bits,)
    weights = (1 << torch.arange(bits, dtype=torch.int32))
    return (stream.view(count, bits).to(torch.int32) * weights).sum(1).to(torch.uint8)
