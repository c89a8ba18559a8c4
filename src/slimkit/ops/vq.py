"""Vector quantization of a weight residual, ReALLM style, and the LQ alternation around it.

A matrix X (out, in), optionally with its columns permuted (``X[:, perm]``), is flattened row
by row and cut into blocks of ``block`` consecutive values (zero-padded at the end). Each block
has an AbsMax scale, double-quantized: an 8-bit code per block and one fp32 maximum per
``scale_group`` blocks, ``s_hat = q8 * smax / 255``. The block, divided by ``s_hat``, is cut
into vectors of ``d`` consecutive values; one k-means codebook of ``2^code_bits`` fp16
centroids per matrix; every vector is stored as the index of its nearest centroid.

Storage (what ``encode`` returns and the native state file holds, bit for bit): codes packed
at ``code_bits`` each, the fp16 codebook, uint8 block scales, fp32 group maxima, and the
permutation packed at ceil(log2 in) bits per column.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import RecipeError, require_positive_ints

SCALE_BITS = 8
FP16, FP32 = 16, 32


@dataclass(frozen=True)
class VQConfig:
    d: int = 2  # values per vector
    code_bits: int = 4  # log2 of the codebook size
    block: int = 64  # values per AbsMax scale
    scale_group: int = 256  # block scales per fp32 maximum (double quantization)

    def __post_init__(self):
        require_positive_ints(self, ("d", "code_bits", "block", "scale_group"))
        if self.code_bits > 16:
            raise RecipeError(f"code_bits must be at most 16, got {self.code_bits}")
        if self.block % self.d:
            raise RecipeError(f"block ({self.block}) must be a multiple of the vector length d ({self.d})")

    @property
    def K(self) -> int:
        return 2**self.code_bits

    def describe(self) -> str:
        return f"VQ d{self.d} k{self.K} b{self.block}"

    def bits(self, out_features: int, in_features: int, permute: bool) -> dict[str, int]:
        """Stored bits by part, exactly the sizes ``encode`` produces (bytes rounded up)."""
        padded = -(-out_features * in_features // self.block) * self.block
        nblocks = padded // self.block
        return {
            "codes": packed_bytes(padded // self.d, self.code_bits) * 8,
            "codebook": self.K * self.d * FP16,
            "scales": nblocks * SCALE_BITS + -(-nblocks // self.scale_group) * FP32,
            "perm": packed_bytes(in_features, index_bits(in_features)) * 8 if permute else 0,
        }


def index_bits(n: int) -> int:
    return max(1, math.ceil(math.log2(n)))


def packed_bytes(n: int, nbits: int) -> int:
    return -(-n * nbits // 8)


def pack_bits(values: torch.Tensor, nbits: int) -> torch.Tensor:
    """(n,) non-negative integers < 2^nbits -> uint8 bit stream of ceil(n nbits / 8) bytes (LSB first)."""
    v = values.reshape(-1).to(torch.int64)
    bits = ((v[:, None] >> torch.arange(nbits, device=v.device)) & 1).to(torch.uint8).reshape(-1)  # (n * nbits,)
    bits = torch.cat([bits, bits.new_zeros(-bits.numel() % 8)]).view(-1, 8)
    return (bits.to(torch.int32) << torch.arange(8, dtype=torch.int32, device=v.device)).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, nbits: int, n: int) -> torch.Tensor:
    bits = ((packed.to(torch.int64)[:, None] >> torch.arange(8, device=packed.device)) & 1).reshape(-1)[: n * nbits]
    return (bits.view(n, nbits) << torch.arange(nbits, device=packed.device)).sum(1)  # (n,) int64


def greedy_permutation(X: torch.Tensor) -> torch.Tensor:
    """Column order that walks from column 0 to the nearest unvisited column each time,
    so that similar columns sit side by side (and share vectors). X (out, in) -> (in,) int64."""
    C = X.T.contiguous()  # (in, out)
    sq = C.square().sum(1)
    dist = sq[:, None] + sq[None, :] - 2 * C @ C.T  # (in, in) squared distances
    n = C.shape[0]
    # the walk stays on X's device: the current column is a (1,) tensor, never read back per step
    used = torch.zeros(n, dtype=torch.bool, device=C.device)
    order = torch.zeros(n, dtype=torch.int64, device=C.device)
    cur = order[:1].clone()  # (1,) column 0
    used[0] = True
    for i in range(1, n):
        row = dist.index_select(0, cur).masked_fill_(used, float("inf"))  # (1, n)
        cur = row.argmin(1)  # (1,)
        order[i:i + 1] = cur
        used.index_fill_(0, cur, True)
    return order


def assign(V: torch.Tensor, C: torch.Tensor, w: torch.Tensor | None = None, max_elems: int = 1 << 22) -> torch.Tensor:
    """Index of the nearest centroid for each vector: argmin_k sum_j w_j (V_j - C_kj)^2.
    V (n, d), C (K, d), w (n, d) or None (Euclidean) -> (n,) int64."""
    if w is None:
        lhs, rhs = torch.cat([V, torch.ones_like(V[:, :1])], 1), torch.cat([-2 * C, C.square().sum(1, keepdim=True)], 1)
    else:  # sum_j w_j C_kj^2 - 2 w_j V_j C_kj  (|V|^2_w is constant per row)
        lhs, rhs = torch.cat([w * V, w], 1), torch.cat([-2 * C, C.square()], 1)
    out = torch.empty(V.shape[0], dtype=torch.int64, device=V.device)
    chunk = max(1, max_elems // C.shape[0])
    for s in range(0, V.shape[0], chunk):
        out[s:s + chunk] = (lhs[s:s + chunk] @ rhs.T).argmin(1)  # (c, K) -> (c,)
    return out


def kmeans(V: torch.Tensor, K: int, w: torch.Tensor | None = None, iters: int = 15, seed: int = 0,
           sample: int = 32768, init: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted Lloyd k-means on a seeded subsample of V (n, d) -> centroids (K, d).
    Initial centroids: ``init`` (warm start) or K vectors of the subsample drawn with the seed;
    a cluster left empty keeps its centroid."""
    g = torch.Generator().manual_seed(seed)  # draws on the CPU (reproducible), indices moved to V's device
    n, d = V.shape
    if n > sample:
        idx = torch.randperm(n, generator=g)[:sample].to(V.device)
        V, w = V[idx], (None if w is None else w[idx])
    w = torch.ones_like(V) if w is None else w
    if init is not None:
        C = init.clone()
    else:
        pick = torch.randperm(V.shape[0], generator=g)
        C = V[pick[torch.arange(K) % V.shape[0]].to(V.device)].clone()  # (K, d)
    wV = w * V
    for _ in range(iters):
        codes = assign(V, C, w)
        if V.device.type == "cpu":
            num = torch.stack([torch.bincount(codes, wV[:, j], minlength=K) for j in range(d)], 1)  # (K, d)
            den = torch.stack([torch.bincount(codes, w[:, j], minlength=K) for j in range(d)], 1)
        else:  # CUDA's bincount reads max(codes) back to the host every call; scatter_add_ does not
            idx = codes[:, None].expand(-1, d)
            num = wV.new_zeros(K, d).scatter_add_(0, idx, wV)
            den = w.new_zeros(K, d).scatter_add_(0, idx, w)
        C = torch.where(den > 0, num / den.clamp_min(1e-30), C)
    return C


@dataclass
class VQCode:
    """One matrix's stored VQ state (exactly what is persisted) and its decoded value."""

    config: VQConfig
    shape: tuple[int, int]
    codes: torch.Tensor  # uint8, packed code_bits per vector
    codebook: torch.Tensor  # (K, d) fp16
    scale_q: torch.Tensor  # (nblocks,) uint8
    scale_max: torch.Tensor  # (ngroups,) fp32
    perm: torch.Tensor | None  # uint8, packed index_bits(in) per column

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {"vq_codes": self.codes, "vq_codebook": self.codebook, "vq_scale_q": self.scale_q,
             "vq_scale_max": self.scale_max}
        if self.perm is not None:
            t["vq_perm"] = self.perm
        return t

    def decode(self) -> torch.Tensor:
        return decode(self)


def block_scales(x: torch.Tensor, cfg: VQConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AbsMax per block, double-quantized. x (nblocks, block) -> s_hat (nblocks,), q8 uint8, smax fp32."""
    s = x.abs().amax(1)  # (nblocks,)
    G = cfg.scale_group
    sp = torch.cat([s, s.new_zeros(-s.numel() % G)]).view(-1, G)  # (ngroups, G)
    smax = sp.amax(1)  # (ngroups,)
    step = (smax / 255).clamp_min(1e-30)
    q8 = (sp / step[:, None]).round().clamp(1, 255)
    s_hat = (q8 * (smax / 255)[:, None]).reshape(-1)[: s.numel()]
    return s_hat, q8.reshape(-1)[: s.numel()].to(torch.uint8), smax.float()


def _dequant_scales(q8: torch.Tensor, smax: torch.Tensor, G: int) -> torch.Tensor:
    q = q8.to(torch.float32)
    return q * (smax / 255).repeat_interleave(G)[: q.numel()]


def _blocks(X: torch.Tensor, cfg: VQConfig) -> torch.Tensor:
    x = X.reshape(-1)
    return torch.cat([x, x.new_zeros(-x.numel() % cfg.block)]).view(-1, cfg.block)  # (nblocks, block)


class VectorQuantizer:
    """Encodes residuals of one matrix; the codebook is warm-started from the previous call so that
    successive LQ iterations refine rather than restart it. ``col_weight`` (in,) weights the error
    of each input column (e.g. the activation norms); ``perm`` (in,) fixes the column order."""

    def __init__(self, cfg: VQConfig, shape: tuple[int, int], col_weight: torch.Tensor | None = None,
                 perm: torch.Tensor | None = None, iters: int = 15, sample: int = 65536, seed: int = 0,
                 device: torch.device | str | None = None):
        self.cfg, self.shape, self.perm = cfg, shape, perm
        self.iters, self.sample, self.seed = iters, sample, seed
        out, k = shape
        if device is None:
            device = col_weight.device if col_weight is not None else perm.device if perm is not None else None
        cw = torch.ones(k, device=device) if col_weight is None else col_weight.float().to(device)
        if perm is not None:
            cw = cw[perm]
        # per-value weight, padded with zeros, in block layout
        self.value_weight = _blocks(cw.expand(out, k), cfg)  # (nblocks, block)
        self.codebook: torch.Tensor | None = None

    def encode(self, X: torch.Tensor, iters: int | None = None) -> tuple[VQCode, torch.Tensor]:
        """X (out, in) -> (stored code, decoded X_hat (out, in))."""
        cfg = self.cfg
        Xp = X if self.perm is None else X[:, self.perm]
        xb = _blocks(Xp, cfg)  # (nblocks, block)
        s_hat, q8, smax = block_scales(xb, cfg)
        safe = torch.where(s_hat > 0, s_hat, torch.ones_like(s_hat))
        V = (xb / safe[:, None]).reshape(-1, cfg.d)  # (nvec, d) normalized vectors
        if self.value_weight.device != xb.device:
            self.value_weight = self.value_weight.to(xb.device)
        w = (self.value_weight * s_hat.square()[:, None]).reshape(-1, cfg.d)  # true-error weights
        C = kmeans(V, cfg.K, w, iters=self.iters if iters is None else iters, seed=self.seed,
                   sample=self.sample, init=self.codebook)
        C = C.half().float()  # stored in fp16
        self.codebook = C
        codes = assign(V, C, w)
        perm = None if self.perm is None else pack_bits(self.perm, index_bits(self.shape[1]))
        code = VQCode(cfg, self.shape, pack_bits(codes, cfg.code_bits), C.half(), q8, smax, perm)
        Xh = (C[codes].view(-1, cfg.block) * s_hat[:, None]).reshape(-1)[: X.numel()].view(self.shape)
        if self.perm is not None:
            Xh = Xh[:, torch.argsort(self.perm)]
        return code, Xh


def decode(code: VQCode) -> torch.Tensor:
    """The (out, in) matrix a stored VQ code represents (used to check persistence and by readers)."""
    cfg, (out, k) = code.config, code.shape
    nblocks = code.scale_q.numel()
    codes = unpack_bits(code.codes, cfg.code_bits, nblocks * cfg.block // cfg.d)
    s_hat = _dequant_scales(code.scale_q, code.scale_max, cfg.scale_group)
    X = (code.codebook.float()[codes].view(nblocks, cfg.block) * s_hat[:, None]).reshape(-1)[: out * k].view(out, k)
    if code.perm is not None:
        X = X[:, torch.argsort(unpack_bits(code.perm, index_bits(k), k))]
    return X


def lowrank(M: torch.Tensor, rank: int, seed: int = 0, niter: int = 2, oversample: int = 8):
    """Randomized SVD (seeded): M (out, in) ~= A B with A = U sqrt(S) (out, r), B = sqrt(S) V^T (r, in)."""
    out, k = M.shape
    q = min(rank + oversample, out, k)
    g = torch.Generator().manual_seed(seed)
    Y = M @ torch.randn(k, q, generator=g).to(M.device)  # (out, q); drawn on the CPU for reproducibility
    for _ in range(niter):
        Y = torch.linalg.qr(Y).Q
        Y = M @ (M.T @ Y)
    Qb = torch.linalg.qr(Y).Q  # (out, q)
    U, S, Vh = torch.linalg.svd(Qb.T @ M, full_matrices=False)
    sq = S[:rank].sqrt()
    return (Qb @ U[:, :rank]) * sq, sq[:, None] * Vh[:rank]


@dataclass
class LQResult:
    A: torch.Tensor  # (out, r) fp16-exact
    B: torch.Tensor  # (r, in) fp16-exact
    Q: torch.Tensor  # (out, in) decoded residual
    code: object  # what the quantizer returned for Q
    error: float  # ||(W - A B - Q) D||_F / ||W D||_F
    history: list[float]  # error of every accepted iteration (non-increasing)
    rejected: float | None  # the error that stopped the loop, if any


def lq_alternate(W: torch.Tensor, rank: int, quantize: Callable[[torch.Tensor], tuple[object, torch.Tensor]],
                 D: torch.Tensor | None = None, iters: int = 10, seed: int = 0, tol: float = 1e-4) -> LQResult:
    """LQ-LoRA style: Q = 0; repeat (A, B) = rank-r SVD of (W - Q) D (then B D^-1), Q = quantize(W - A B),
    stop when the weighted Frobenius error rises (keeping the previous iterate) or improves by less than
    ``tol`` (relative). D (in,) column weights, e.g. sqrt of the activation norms; None = plain."""
    out, k = W.shape
    Dv = torch.ones(k, device=W.device) if D is None else D
    ref = (W * Dv).norm().clamp_min(1e-30)
    Q = torch.zeros_like(W)
    best: LQResult | None = None
    rejected = None
    for t in range(iters):
        if rank > 0:
            A, B = lowrank((W - Q) * Dv, rank, seed=seed + t)
            A, B = A.half().float(), (B / Dv).half().float()
        else:
            A, B = W.new_zeros(out, 0), W.new_zeros(0, k)
        code, Q = quantize(W - A @ B)
        err = (((W - A @ B - Q) * Dv).norm() / ref).item()
        if best is not None and err >= best.error:
            rejected = err
            break
        prev = best
        best = LQResult(A, B, Q, code, err, (best.history if best else []) + [err], None)
        if rank == 0 or (prev is not None and prev.error - err < tol * prev.error):
            break
    best.rejected = rejected
    return best


def estimate_error(X: torch.Tensor, cfg: VQConfig, col_weight: torch.Tensor | None = None,
                   perm: torch.Tensor | None = None, iters: int = 5, sample: int = 4096, seed: int = 0) -> float:
    """Weighted squared error sum_ij w_j (X - VQ(X))_ij^2 of VQ on X (out, in), estimated cheaply on a
    seeded subset of rows holding about 2 x ``sample`` vectors: the codebook is fit on the vectors of
    half of those rows and scored on the other half, and the error is scaled up to the whole matrix."""
    out, k = X.shape
    g = torch.Generator().manual_seed(seed + 1)
    nrows = min(out, -(-2 * sample * cfg.d // k))
    rows = torch.randperm(out, generator=g)[:nrows].to(X.device)  # drawn on the CPU for reproducibility
    fit_rows, test_rows = rows[: max(1, nrows // 2)], rows[max(1, nrows // 2):]
    if test_rows.numel() == 0:
        test_rows = fit_rows

    def vectors(r):
        Xs = X[r] if perm is None else X[r][:, perm]
        vq = VectorQuantizer(cfg, tuple(Xs.shape), None if col_weight is None else col_weight[perm if perm is not None else slice(None)],
                             device=X.device)
        xb = _blocks(Xs, cfg)
        s_hat = block_scales(xb, cfg)[0]
        safe = torch.where(s_hat > 0, s_hat, torch.ones_like(s_hat))
        return (xb / safe[:, None]).reshape(-1, cfg.d), (vq.value_weight * s_hat.square()[:, None]).reshape(-1, cfg.d)

    V, w = vectors(fit_rows)
    C = kmeans(V, cfg.K, w, iters=iters, seed=seed, sample=sample).half().float()
    Vt, wt = vectors(test_rows)
    err = (wt * (Vt - C[assign(Vt, C, wt)]).square()).sum().item()
    return err * out / test_rows.numel()
