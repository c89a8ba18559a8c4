"""llama.cpp's GGUF block formats as quantization grids.

Each type cuts a row of a weight matrix (out, in) into blocks of 32 (Q8_0, Q5_0, Q5_1, Q4_0,
Q4_1) or super-blocks of 256 (the K-quants Q6_K, Q5_K, Q4_K, Q3_K, Q2_K) along the input
dimension. A block holds integer codes and fp16 scale(s); K-quants also hold per-sub-block
scales (and mins) quantized to 4, 6 or 8 bits against the super-block's fp16 ``d`` / ``dmin``.

A :class:`GGUFType` does three things, each exactly as llama.cpp (and the ``gguf`` package's
numpy dequantization) defines the format:

- ``fit(w, importance)``: the block parameters of ``w`` (rows, block): a search over scales
  minimising the (importance-weighted) squared error, then the sub-block scales quantized
  against the super-block scale, all stored values rounded to what the format holds;
- ``codes(params, w, cols)`` / ``dequantize(params, codes, cols)``: the nearest codes of columns
  ``cols`` of a block and their values, in fp32 with the same operations, in the same order, as
  the format's dequantization, so a value the grid leaves is bit for bit what llama.cpp reads;
- ``pack(params, codes)``: the block bytes.

:class:`BlockGrid` plugs a type into the OBS sweep (GPTQ, SparseGPT), which fits each block's
parameters when it reaches the block, on the error-compensated weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np
import torch

from ..errors import NumericalError, RecipeError
from .reduce import all_finite

QK_K = 256
_SHRINK = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.82, 0.79, 0.76, 0.73, 0.70)


def fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest fp16 value (kept in fp32), as the format stores it; a value beyond
    fp16's range is a NumericalError (the block would hold inf)."""
    y = x.to(torch.float16).to(torch.float32)
    if not all_finite(y):
        raise NumericalError(f"a GGUF block scale of {x[~torch.isfinite(y)].flatten()[0].item():.4g} is beyond "
                             "fp16's range (weights too large for llama.cpp's block formats)")
    return y


def _safe(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s == 0, torch.ones_like(s), s)


def _werr(w, x, imp):
    e = (w - x) ** 2
    return (e * imp).sum(-1) if imp is not None else e.sum(-1)


def _search_sym(w: torch.Tensor, imp: torch.Tensor | None, lo: int, hi: int, store: Callable | None = None,
                both_ends: bool = True) -> torch.Tensor:
    """Per (row, sub-block) scale s of a symmetric grid x = s q, q in [lo, hi] (w (..., S)): the
    signed value of largest magnitude mapped to ``lo`` (or ``hi``), shrunk by each factor of
    _SHRINK; ``store`` rounds a candidate to what the format stores."""
    idx = w.abs().argmax(-1, keepdim=True)
    smax = torch.gather(w, -1, idx).squeeze(-1)
    best_s = store(smax / lo) if store is not None else smax / lo
    best_e = torch.full_like(best_s, float("inf"))
    ends = (lo, hi) if both_ends and hi > 0 else (lo,)
    for end in ends:
        for p in _SHRINK:
            s = smax / end * p
            if store is not None:
                s = store(s)
            q = torch.clamp(torch.round(w / _safe(s)[..., None]), lo, hi)
            e = _werr(w, s[..., None] * q, imp)
            better = e < best_e
            best_e = torch.where(better, e, best_e)
            best_s = torch.where(better, s, best_s)
    return best_s


def _search_asym(w: torch.Tensor, imp: torch.Tensor | None, nmax: int, min_le_zero: bool,
                 store: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, sub-block) (a, b) of x = a q + b, q in [0, nmax]: the range [min, max] (min
    clamped to <= 0 where the format subtracts a non-negative min) shrunk by each factor, each
    candidate refitted once by weighted least squares on its codes."""
    wmin = w.amin(-1)
    if min_le_zero:
        wmin = wmin.clamp(max=0)
    wmax = w.amax(-1)
    iw = imp if imp is not None else torch.ones(w.shape[-1], dtype=w.dtype, device=w.device)
    best_a, best_b = (wmax - wmin) / nmax, wmin
    if store is not None:
        best_a, best_b = store(best_a, best_b)
    best_e = torch.full_like(best_a, float("inf"))
    for p in _SHRINK:
        for refit in (False, True):
            lo, hi = wmin * p, wmax * p
            a = (hi - lo) / nmax
            b = lo
            if refit:  # least squares of w ~ a q + b on the codes of the shrunk range
                q = torch.clamp(torch.round((w - b[..., None]) / _safe(a)[..., None]), 0, nmax)
                sw, sq, sx = iw.sum(-1), (iw * q).sum(-1), (iw * w).sum(-1)
                sqq, sqx = (iw * q * q).sum(-1), (iw * q * w).sum(-1)
                det = sw * sqq - sq * sq
                ok = det > 0
                a2 = torch.where(ok, (sw * sqx - sq * sx) / torch.where(ok, det, torch.ones_like(det)), a)
                b2 = torch.where(ok, (sqq * sx - sq * sqx) / torch.where(ok, det, torch.ones_like(det)), b)
                if min_le_zero:
                    pos = b2 > 0  # the format cannot add: b = 0 and a refitted alone
                    a0 = sqx / torch.where(sqq > 0, sqq, torch.ones_like(sqq))
                    a2, b2 = torch.where(pos, a0, a2), torch.where(pos, torch.zeros_like(b2), b2)
                a, b = torch.where(a2 > 0, a2, a), torch.where(a2 > 0, b2, b)
            if store is not None:
                a, b = store(a, b)
            q = torch.clamp(torch.round((w - b[..., None]) / _safe(a)[..., None]), 0, nmax)
            e = _werr(w, a[..., None] * q + b[..., None], imp)
            better = e < best_e
            best_e = torch.where(better, e, best_e)
            best_a = torch.where(better, a, best_a)
            best_b = torch.where(better, b, best_b)
    return best_a, best_b


def _bytes16(x: torch.Tensor) -> np.ndarray:
    """(..., ) fp32 holding fp16 values -> (..., 2) uint8, little-endian fp16."""
    return x.to(torch.float16).numpy().view(np.uint8).reshape(*x.shape, 2)


class GGUFType:
    """One GGUF block type. Subclasses set the class attributes and the four methods."""

    name: ClassVar[str]
    block: ClassVar[int]  # columns per block (super-block for K-quants)
    sub: ClassVar[int]  # columns sharing one scale
    type_size: ClassVar[int]  # bytes per block
    code_bits: ClassVar[int]
    symmetric: ClassVar[bool]  # code `zero_code` dequantizes to exactly 0 (a pruned weight stays 0)
    zero_code: ClassVar[int] = 0

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block

    @property
    def qtype(self):
        import gguf

        return gguf.GGMLQuantizationType[self.name]

    def fit(self, w: torch.Tensor, imp: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def step(self, p: dict, sub: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, offset) with value ~ scale * code + offset for sub-blocks ``sub`` (n,): (rows, n)
        each, used only to find the nearest code."""
        raise NotImplementedError

    def dequantize(self, p: dict, c: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pack(self, p: dict, c: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def codes(self, p: dict, w: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Nearest codes (rows, n) of the values ``w`` (rows, n) at block columns ``cols`` (n,)."""
        a, b = self.step(p, cols // self.sub)
        c = torch.clamp(torch.round((w - b) / _safe(a)), 0, 2**self.code_bits - 1)
        return c

    def quantize_block(self, w: torch.Tensor, imp: torch.Tensor | None = None):
        """(params, codes, values) of a whole block w (rows, block), rounded to nearest."""
        p = self.fit(w, imp)
        cols = torch.arange(self.block, device=w.device)
        c = self.codes(p, w, cols)
        return p, c, self.dequantize(p, c, cols)


# ----- 32-element blocks -------------------------------------------------------------------

class _Sym32(GGUFType):
    block = sub = 32
    symmetric = True
    lo: ClassVar[int]
    hi: ClassVar[int]

    @property
    def zero_code(self):
        return -self.lo

    def fit(self, w, imp=None):
        return {"d": _search_sym(w, imp, self.lo, self.hi, store=fp16, both_ends=self.hi != -self.lo)[:, None]}

    def step(self, p, sub):
        return p["d"].expand(-1, len(sub)), (p["d"] * self.lo).expand(-1, len(sub))

    def dequantize(self, p, c, cols):
        return p["d"] * (c - float(-self.lo))


class Q8_0(_Sym32):
    name, type_size, code_bits, lo, hi = "Q8_0", 34, 8, -127, 127

    def codes(self, p, w, cols):  # codes stored as c = q + 128, q in [-127, 127]
        return torch.clamp(torch.round(w / _safe(p["d"])), -127, 127) + 128

    def dequantize(self, p, c, cols):
        return (c - 128.0) * p["d"]

    @property
    def zero_code(self):
        return 128

    def pack(self, p, c):
        q = (c.to(torch.int16) - 128).to(torch.int8).numpy().view(np.uint8)
        return np.concatenate([_bytes16(p["d"][:, 0]), q], -1)


class Q4_0(_Sym32):
    name, type_size, code_bits, lo, hi = "Q4_0", 18, 4, -8, 7

    def pack(self, p, c):
        c = c.to(torch.uint8).numpy()
        return np.concatenate([_bytes16(p["d"][:, 0]), c[:, :16] | (c[:, 16:] << 4)], -1)


class Q5_0(_Sym32):
    name, type_size, code_bits, lo, hi = "Q5_0", 22, 5, -16, 15

    def pack(self, p, c):
        c = c.to(torch.uint8).numpy()
        qh = np.packbits(c >> 4, axis=-1, bitorder="little")
        qs = (c[:, :16] & 15) | ((c[:, 16:] & 15) << 4)
        return np.concatenate([_bytes16(p["d"][:, 0]), qh, qs], -1)


class _Asym32(GGUFType):
    block = sub = 32
    symmetric = False

    def fit(self, w, imp=None):
        a, b = _search_asym(w, imp, 2**self.code_bits - 1, False, store=lambda a, b: (fp16(a), fp16(b)))
        return {"d": a[:, None], "m": b[:, None]}

    def step(self, p, sub):
        return p["d"].expand(-1, len(sub)), p["m"].expand(-1, len(sub))

    def dequantize(self, p, c, cols):
        return (p["d"] * c) + p["m"]


class Q4_1(_Asym32):
    name, type_size, code_bits = "Q4_1", 20, 4

    def pack(self, p, c):
        c = c.to(torch.uint8).numpy()
        return np.concatenate([_bytes16(p["d"][:, 0]), _bytes16(p["m"][:, 0]), c[:, :16] | (c[:, 16:] << 4)], -1)


class Q5_1(_Asym32):
    name, type_size, code_bits = "Q5_1", 24, 5

    def pack(self, p, c):
        c = c.to(torch.uint8).numpy()
        qh = np.packbits(c >> 4, axis=-1, bitorder="little")
        qs = (c[:, :16] & 15) | ((c[:, 16:] & 15) << 4)
        return np.concatenate([_bytes16(p["d"][:, 0]), _bytes16(p["m"][:, 0]), qh, qs], -1)


# ----- K-quants: super-blocks of 256 --------------------------------------------------------

def _subs(w: torch.Tensor, sub: int) -> torch.Tensor:
    return w.reshape(w.shape[0], -1, sub)


def _sub_imp(imp, sub):
    return None if imp is None else imp.reshape(-1, sub)


class _KMin(GGUFType):
    """value = d sc_j q - dmin m_j (Q2_K, Q4_K, Q5_K): unsigned sub-block scales and mins of
    ``scale_bits`` against fp16 d, dmin."""

    block = QK_K
    symmetric = False
    scale_bits: ClassVar[int]

    def fit(self, w, imp=None):
        a, b = _search_asym(_subs(w, self.sub), _sub_imp(imp, self.sub), 2**self.code_bits - 1, True)
        m = (-b).clamp(min=0)  # (rows, nsub), >= 0
        smax = 2**self.scale_bits - 1
        d = fp16(a.amax(-1) / smax)  # (rows,)
        dmin = fp16(m.amax(-1) / smax)
        sc = torch.clamp(torch.round(a / _safe(d)[:, None]), 0, smax)
        mn = torch.clamp(torch.round(m / _safe(dmin)[:, None]), 0, smax)
        # a sub-block whose scale rounds to 0 keeps the smallest non-zero one (its codes then all matter)
        sc = torch.where((sc == 0) & (a > 0) & (d[:, None] > 0), torch.ones_like(sc), sc)
        return {"d": d[:, None], "dmin": dmin[:, None], "sc": sc, "mn": mn}

    def _dl(self, p, sub):
        return p["d"] * p["sc"][:, sub], p["dmin"] * p["mn"][:, sub]

    def step(self, p, sub):
        dl, ml = self._dl(p, sub)
        return dl, -ml

    def dequantize(self, p, c, cols):
        dl, ml = self._dl(p, cols // self.sub)
        return dl * c - ml


class Q2_K(_KMin):
    name, sub, type_size, code_bits, scale_bits = "Q2_K", 16, 84, 2, 4

    def pack(self, p, c):
        c = c.to(torch.uint8).numpy().reshape(-1, 2, 4, 32)  # f = h*128 + t*32 + l
        qs = (c << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]).sum(2, dtype=np.uint8).reshape(-1, 64)
        scales = (p["sc"].to(torch.uint8) | (p["mn"].to(torch.uint8) << 4)).numpy()
        return np.concatenate([scales, qs, _bytes16(p["d"][:, 0]), _bytes16(p["dmin"][:, 0])], -1)


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins -> the 12 bytes of Q4_K / Q5_K."""
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return out


class Q4_K(_KMin):
    name, sub, type_size, code_bits, scale_bits = "Q4_K", 32, 144, 4, 6

    def pack(self, p, c):
        c = c.to(torch.uint8).numpy().reshape(-1, 4, 2, 32)  # sub-block j = 2 chunk + nibble
        qs = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(-1, 128)
        sc, mn = p["sc"].to(torch.uint8).numpy(), p["mn"].to(torch.uint8).numpy()
        return np.concatenate([_bytes16(p["d"][:, 0]), _bytes16(p["dmin"][:, 0]), _pack_k_scales(sc, mn), qs], -1)


class Q5_K(_KMin):
    name, sub, type_size, code_bits, scale_bits = "Q5_K", 32, 176, 5, 6

    def pack(self, p, c):
        c = c.to(torch.uint8).numpy()
        lo = (c & 15).reshape(-1, 4, 2, 32)
        qs = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(-1, 128)
        hi = (c >> 4).reshape(-1, 8, 32)  # bit t of byte l = element t*32 + l
        qh = (hi << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1, dtype=np.uint8)
        sc, mn = p["sc"].to(torch.uint8).numpy(), p["mn"].to(torch.uint8).numpy()
        return np.concatenate([_bytes16(p["d"][:, 0]), _bytes16(p["dmin"][:, 0]), _pack_k_scales(sc, mn), qh, qs],
                              -1)


class _KSym(GGUFType):
    """value = d sc_j q, q signed (Q3_K: [-4, 3], 6-bit signed scales; Q6_K: [-32, 31], int8 scales)."""

    block = QK_K
    sub = 16
    symmetric = True
    qlo: ClassVar[int]
    qhi: ClassVar[int]
    slo: ClassVar[int]
    shi: ClassVar[int]

    @property
    def zero_code(self):
        return -self.qlo

    def fit(self, w, imp=None):
        a = _search_sym(_subs(w, self.sub), _sub_imp(imp, self.sub), self.qlo, self.qhi)  # (rows, nsub) signed
        idx = a.abs().argmax(-1, keepdim=True)
        amax = torch.gather(a, -1, idx).squeeze(-1)
        d = fp16(amax / self.slo)  # maps the largest scale to slo (negative d when it is positive)
        sc = torch.clamp(torch.round(a / _safe(d)[:, None]), self.slo, self.shi)
        return {"d": d[:, None], "sc": sc}

    def step(self, p, sub):
        dl = p["d"] * p["sc"][:, sub]
        return dl, dl * self.qlo

    def dequantize(self, p, c, cols):
        return (p["d"] * p["sc"][:, cols // self.sub]) * (c - float(-self.qlo))


class Q3_K(_KSym):
    name, type_size, code_bits, qlo, qhi, slo, shi = "Q3_K", 110, 3, -4, 3, -32, 31

    def pack(self, p, c):
        c = c.to(torch.uint8).numpy()
        hm = (c >> 2).reshape(-1, 8, 32)
        hmask = (hm << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1, dtype=np.uint8)
        lo = (c & 3).reshape(-1, 2, 4, 32)
        qs = (lo << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]).sum(2, dtype=np.uint8).reshape(-1, 64)
        s = (p["sc"] + 32).to(torch.uint8).numpy()  # (rows, 16) in [0, 63]
        scales = np.zeros((s.shape[0], 12), dtype=np.uint8)
        scales[:, :8] = (s[:, :8] & 15) | ((s[:, 8:] & 15) << 4)
        hs = (s >> 4).reshape(-1, 4, 4)  # scale j = t*4 + i: bits 2t of byte 8 + i
        scales[:, 8:] = (hs << (2 * np.arange(4, dtype=np.uint8))[None, :, None]).sum(1, dtype=np.uint8)
        return np.concatenate([hmask, qs, scales, _bytes16(p["d"][:, 0])], -1)


class Q6_K(_KSym):
    name, type_size, code_bits, qlo, qhi, slo, shi = "Q6_K", 210, 6, -32, 31, -128, 127

    def pack(self, p, c):
        c = c.to(torch.uint8).numpy()
        lo = (c & 15).reshape(-1, 2, 2, 64)  # f = h*128 + s*64 + b -> ql[h*64 + b], nibble s
        ql = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(-1, 128)
        hi = (c >> 4).reshape(-1, 2, 4, 32)  # f = h*128 + t*32 + l -> qh[h*32 + l], bits 2t
        qh = (hi << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]).sum(2, dtype=np.uint8).reshape(-1, 64)
        sc = p["sc"].to(torch.int8).numpy().view(np.uint8)
        return np.concatenate([ql, qh, sc, _bytes16(p["d"][:, 0])], -1)


TYPES: dict[str, GGUFType] = {t.name: t() for t in (Q8_0, Q5_0, Q5_1, Q4_0, Q4_1, Q6_K, Q5_K, Q4_K, Q3_K, Q2_K)}


def gguf_type(name: str) -> GGUFType:
    t = TYPES.get(str(name).upper())
    if t is None:
        raise RecipeError(f"unknown GGUF block type {name!r}; known: {', '.join(TYPES)}")
    return t


# ----- whole matrices ----------------------------------------------------------------------

@dataclass
class Encoded:
    """A matrix (rows, in) in one GGUF type: its values and its block bytes."""

    type: GGUFType
    values: torch.Tensor  # (rows, in) fp32, exactly what the bytes dequantize to
    data: torch.Tensor  # (rows, in / block * type_size) uint8


def check_width(t: GGUFType, in_features: int, what: str = "a layer") -> None:
    if in_features % t.block:
        raise RecipeError(f"{what}: {in_features} input columns is not a multiple of {t.block}, the block of "
                          f"GGUF {t.name}")


def encode_rtn(W: torch.Tensor, t: GGUFType, imp: torch.Tensor | None = None) -> Encoded:
    """Round-to-nearest of W (rows, in) into ``t``, block by block (imp: (in,) importance or None)."""
    check_width(t, W.shape[1])
    grid = BlockGrid(t, W.shape[0], W.shape[1], imp)
    vals = grid.round_all(W)
    return Encoded(t, vals, grid.data())


class BlockGrid:
    """A GGUF type inside the OBS sweep, for one matrix (rows, in): ``fit_block`` fits block
    ``gi`` on the current (error-compensated) weights when the sweep reaches it; ``columns``
    rounds columns of that block to the nearest code, records the codes, and returns their
    exact values (a pruned entry, keep == False, gets the type's exact zero)."""

    def __init__(self, t: GGUFType, rows: int, in_features: int, importance: torch.Tensor | None = None):
        check_width(t, in_features)
        self.type = t
        self.block = t.block
        self.rows, self.k = rows, in_features
        self.importance = None if importance is None else importance.detach().to(torch.float32)
        self.params: list[dict | None] = [None] * (in_features // t.block)
        self.code: torch.Tensor | None = None  # (rows, in) uint8, made on the weights' device

    def fit_block(self, gi: int, w: torch.Tensor) -> None:
        imp = None
        if self.importance is not None:
            imp = self.importance[gi * self.block:(gi + 1) * self.block].to(w.device)
        self.params[gi] = self.type.fit(w.to(torch.float32), imp)

    def columns(self, gi: int, cols: torch.Tensor, w: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        p = self.params[gi]
        cols = cols.to(w.device)
        c = self.type.codes(p, w, cols)
        if keep is not None:
            c = torch.where(keep, c, torch.full_like(c, float(self.type.zero_code)))
        if self.code is None:
            self.code = torch.zeros(self.rows, self.k, dtype=torch.uint8, device=w.device)
        self.code[:, gi * self.block + cols] = c.to(torch.uint8)
        return self.type.dequantize(p, c, cols)

    def round_all(self, W: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest of the whole matrix W (rows, in), block by block; -> its values."""
        W = W.detach().to(torch.float32)
        vals = torch.empty_like(W)
        for gi in range(self.k // self.block):
            sl = slice(gi * self.block, (gi + 1) * self.block)
            self.fit_block(gi, W[:, sl])
            vals[:, sl] = self.columns(gi, torch.arange(self.block, device=W.device), W[:, sl])
        return vals

    def data(self) -> torch.Tensor:
        """(rows, nblocks * type_size) uint8: the bytes llama.cpp reads."""
        t = self.type
        parts = []
        code = self.code.cpu() if self.code is not None else None
        for gi, p in enumerate(self.params):
            if p is None or code is None:
                raise RecipeError(f"GGUF block {gi} was never fitted")
            pc = {k: v.detach().cpu() for k, v in p.items()}
            parts.append(t.pack(pc, code[:, gi * t.block:(gi + 1) * t.block]))
        return torch.from_numpy(np.ascontiguousarray(np.concatenate(parts, -1)))


def dequantize_data(data: torch.Tensor, t: GGUFType, in_features: int) -> torch.Tensor:
    """The values (rows, in) of block bytes, by the ``gguf`` package's own numpy dequantization."""
    from gguf.quants import dequantize

    arr = data.numpy().reshape(data.shape[0], in_features // t.block * t.type_size)
    return torch.from_numpy(dequantize(arr, t.qtype).reshape(data.shape[0], in_features).copy())


def storage_bits(t: GGUFType, rows: int, in_features: int) -> dict[str, int]:
    """What a matrix costs in ``t``: the codes, and everything else of each block as scales."""
    total = rows * (in_features // t.block) * t.type_size * 8
    codes = rows * in_features * t.code_bits
    return {"values": codes, "scales": total - codes}


# ----- llama-quantize's per-tensor type choice ------------------------------------------------

# llama.cpp ftype -> the type of every tensor it does not single out
FTYPES = {"Q8_0": "Q8_0", "Q6_K": "Q6_K", "Q5_1": "Q5_1", "Q5_0": "Q5_0", "Q5_K_M": "Q5_K", "Q5_K_S": "Q5_K",
          "Q4_1": "Q4_1", "Q4_0": "Q4_0", "Q4_K_M": "Q4_K", "Q4_K_S": "Q4_K", "Q3_K_L": "Q3_K", "Q3_K_M": "Q3_K",
          "Q3_K_S": "Q3_K", "Q2_K": "Q2_K"}
# a K-quant that does not fit a row (its width is not a multiple of 256) falls back to a 32-block type
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
# Hugging Face Linear name -> llama.cpp's tensor category
CATEGORIES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def check_ftype(ftype: str) -> str:
    f = str(ftype).upper()
    if f not in FTYPES:
        raise RecipeError(f"unknown llama.cpp file type {ftype!r}; known: {', '.join(FTYPES)}")
    return f


def category_of(name: str) -> str:
    """llama.cpp's category of a Linear named as in Hugging Face (``...mlp.down_proj`` -> ffn_down)."""
    return CATEGORIES.get(name.rsplit(".", 1)[-1], "other")


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def llama_type(ftype: str, category: str, ncols: int, layer: int | None = None, n_layers: int | None = None,
               n_gqa: int = 1, has_imatrix: bool = False, pure: bool = False) -> str:
    """The block type llama-quantize (llama.cpp b11434, src/llama-quant.cpp) gives a tensor of
    ``category`` with rows of ``ncols`` in file type ``ftype``, for a dense (not mixture-of-
    experts) model of another architecture than Falcon, below 70B: its mixture rules (unless
    ``pure``), then its fallback for rows that a K-quant's 256-blocks do not fit. ``category``
    "output" is the output head, or the token embedding when it is tied to the head."""
    ftype = check_ftype(ftype)
    t = FTYPES[ftype]
    known = layer is not None and n_layers is not None
    if category == "output" and not pure:  # llama-quantize --pure skips every rule, this one included
        t = "Q8_0" if ncols % TYPES[t].block or t == "Q8_0" else "Q6_K"
    elif not pure and category == "attn_v":
        if ftype == "Q2_K":
            t = "Q4_K" if n_gqa >= 4 else "Q3_K"
        elif ftype == "Q3_K_M" and known:
            t = "Q5_K" if layer < 2 else "Q4_K"
        elif ftype == "Q3_K_L":
            t = "Q5_K"
        elif ftype in ("Q4_K_M", "Q5_K_M") and known and _more_bits(layer, n_layers):
            t = "Q6_K"
        elif ftype == "Q4_K_S" and known and layer < 4:
            t = "Q5_K"
    elif not pure and category == "ffn_down" and known:
        if ftype == "Q2_K":
            t = "Q3_K"
        elif ftype == "Q3_K_M":
            t = "Q5_K" if layer < n_layers // 16 else "Q4_K"
        elif ftype == "Q3_K_L":
            t = "Q5_K"
        elif ftype in ("Q4_K_M", "Q5_K_M") and _more_bits(layer, n_layers):
            t = "Q6_K"
        elif ftype == "Q4_K_S" and layer < n_layers // 8:
            t = "Q5_K"
        elif ftype in ("Q4_0", "Q5_0") and has_imatrix and layer < n_layers // 8:
            t = "Q4_1" if ftype == "Q4_0" else "Q5_1"
    elif not pure and category == "ffn_down" and ftype == "Q2_K":
        t = "Q3_K"
    elif not pure and category == "attn_output":
        t = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(ftype, t)
    if ncols % TYPES[t].block:
        t = FALLBACK.get(t, t)
    if ncols % TYPES[t].block:
        raise RecipeError(f"rows of {ncols} columns fit no GGUF block type (llama.cpp would keep the tensor in F16)")
    return t
