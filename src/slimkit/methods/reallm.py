"""ReALLM (Leconte et al., arXiv 2405.13155): W = L R (fp16 low rank) + a vector-quantized residual.

Per Linear: choose (rank, vector length d, codebook size, AbsMax block) from a small candidate
set so that everything stored (codes, codebook, double-quantized scales, permutation, fp16
factors) fits ``bits`` bits/weight, by the VQ error measured cheaply on the residual of each
rank; then run the LQ alternation with the chosen configuration. Optionally a small neural
decoder replaces the VQ where it is more accurate at no more bits, and the low-rank parts are
fine-tuned on block output MSE once a block is done. Every Linear meets the budget on its own,
so the whole model does.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..errors import RecipeError, is_number, require_positive_ints
from ..ops.decoder import DecoderConfig, fit_decoder, latent_dim
from ..ops.vq import VQConfig, VectorQuantizer, estimate_error, greedy_permutation, lowrank, lq_alternate
from .base import ACT_NORM, BlockContext, LinearState, LinearStats, Stage, register

log = logging.getLogger(__name__)


def _int_tuple(name: str, v, lo: int) -> tuple[int, ...]:
    vals = (v,) if isinstance(v, int) else v
    if (not isinstance(vals, (list, tuple)) or not vals
            or any(not isinstance(x, int) or isinstance(x, bool) or x < lo for x in vals)):
        raise RecipeError(f"{name} must be a non-empty list of integers >= {lo}, got {v!r}")
    return tuple(sorted(set(vals)))


@register
@dataclass
class ReALLM(Stage):
    name = "reallm"
    uniform_grid = False  # vector-quantized residual: no per-group integer grid
    accepts_mask = False  # the dense low-rank part would undo a mask
    needs = frozenset({ACT_NORM})
    makes_adapters = True  # the low-rank part (rank > 0)
    quantizes = True  # vector quantization: no uniform grid (state.quant stays None), no mask support
    examples = (
        {"bits": 3.0},
        {"bits": 2.5, "ranks": [0, 4], "vector_dims": [2], "block_sizes": [32], "act_weighted": False,
         "permute": False, "iters": 3},
    )

    bits: float = 3.0  # budget in stored bits per weight, everything counted
    ranks: list = field(default_factory=lambda: [0, 8])  # candidate ranks of the fp16 low-rank part
    vector_dims: list = field(default_factory=lambda: [2, 3, 4])  # candidate vector lengths d
    block_sizes: list = field(default_factory=lambda: [32, 48, 64, 96])  # candidate AbsMax blocks (multiples of d)
    max_code_bits: int = 8  # codebooks of at most 2^this centroids
    scale_group: int = 256  # block scales per fp32 maximum (double quantization)
    permute: bool = True  # greedy column permutation, stored
    act_weighted: bool = True  # weight errors by sqrt of the Wanda statistic (columns)
    iters: int = 3  # LQ alternation steps at most
    kmeans_iters: int = 10  # Lloyd steps of the first codebook (later steps are warm-started, a third)
    kmeans_sample: int = 32768  # vectors the codebook is fit on
    seed: int = 0
    decoder: bool = False  # try the neural decoder on the final residual
    decoder_tile: int = 8
    decoder_latent_bits: int = 4
    decoder_hidden: int = 64
    decoder_steps: int = 300
    decoder_seconds: float = 30.0
    finetune: bool = False  # tune L, R on block output MSE after each block
    ft_steps: int = 20
    ft_lr: float = 1e-4
    ft_sequences: int = 2  # calibration sequences per Adam step

    def __post_init__(self):
        if not is_number(self.bits) or not 0.5 <= self.bits <= 16:
            raise RecipeError(f"bits must be a number of bits/weight in [0.5, 16], got {self.bits!r}")
        self.ranks = list(_int_tuple("ranks", self.ranks, 0))
        self.vector_dims = list(_int_tuple("vector_dims", self.vector_dims, 1))
        self.block_sizes = list(_int_tuple("block_sizes", self.block_sizes, 1))
        require_positive_ints(self, ("max_code_bits", "scale_group", "iters", "kmeans_iters", "kmeans_sample",
                                     "ft_steps", "ft_sequences"))
        if self.max_code_bits > 12:
            raise RecipeError(f"max_code_bits must be at most 12 (4096 centroids), got {self.max_code_bits}")
        if not any(b % d == 0 for b in self.block_sizes for d in self.vector_dims):
            raise RecipeError(f"no block size in {self.block_sizes} is a multiple of a vector length in "
                              f"{self.vector_dims}")
        if not (isinstance(self.ft_lr, (int, float)) and 0 < self.ft_lr < 1):
            raise RecipeError(f"ft_lr must be in (0, 1), got {self.ft_lr!r}")
        self.decoder_config()

    def decoder_config(self) -> DecoderConfig:
        return DecoderConfig(self.decoder_tile, self.decoder_latent_bits, self.decoder_hidden, self.decoder_steps,
                             float(self.decoder_seconds), seed=self.seed)

    # -- budget ---------------------------------------------------------------------------------
    def record_bytes(self, name: str, out_features: int, in_features: int, position=None) -> dict[str, int]:
        """The code (VQ or decoder) and the low-rank part fit ``bits`` per weight counted with the
        low-rank part in fp16; the record keeps that part in fp32 (at most twice the budget), and
        the fp32 base weight beside it when a rank above 0 may be chosen."""
        code = 2 * -(-int(self.bits * out_features * in_features) // 8) + 64
        return {"code": code} | ({"weight": 4 * out_features * in_features} if max(self.ranks) > 0 else {})

    def candidates(self, out: int, k: int) -> list[tuple[int, VQConfig, int]]:
        """(rank, VQ config, stored bits) that fit the budget: for every (rank, d), the largest codebook
        that fits with some candidate block, with the smallest such block (finer scales). Codebooks
        larger than a quarter of the vectors are not considered."""
        budget = self.bits * out * k
        found = []
        for r in self.ranks:
            if r > min(out, k):
                continue
            lr_bits = r * (out + k) * 16
            for d in self.vector_dims:
                best = None
                for block in self.block_sizes:
                    if block % d:
                        continue
                    for cb in range(1, self.max_code_bits + 1):
                        cfg = VQConfig(d, cb, block, self.scale_group)
                        total = sum(cfg.bits(out, k, self.permute).values()) + lr_bits
                        if total <= budget and cfg.K * 4 <= out * k // d and (
                                best is None or (cb, -block) > (best[1].code_bits, -best[1].block)):
                            best = (r, cfg, total)
                if best is not None:
                    found.append(best)
        return found

    def check_layer(self, name: str, out_features: int, in_features: int) -> None:
        if not self.candidates(out_features, in_features):
            raise RecipeError(f"reallm: no candidate configuration fits {self.bits} bits/weight on {name} "
                              f"({out_features}x{in_features}); raise bits or add smaller ranks/blocks")

    # -- one Linear ---------------------------------------------------------------------------
    def apply(self, state: LinearState, stats: LinearStats | None) -> LinearState:
        if state.mask is not None or state.quant is not None or state.L is not None:
            raise RecipeError(f"{state.name}: reallm compresses the dense weight; put it first and alone")
        W = state.weight  # (out, in)
        out, k = W.shape
        cands = self.candidates(out, k)
        if not cands:
            self.check_layer(state.name, out, k)
        D = None
        if self.act_weighted and stats is not None:
            a = stats.act_norm
            D = (a / a.mean().clamp_min(1e-30)).clamp_min(1e-4).sqrt()  # (in,)
        Dv = torch.ones(k, device=W.device) if D is None else D
        colw = Dv.square()

        # choose the configuration: residual of each rank, cheap held-out VQ error of each config
        per_rank = {}
        for r in sorted({c[0] for c in cands}):
            if r:
                A, B = lowrank(W * Dv, r, seed=self.seed)
                Res = W - A @ (B / Dv)
            else:
                Res = W
            perm = greedy_permutation(Res * Dv) if self.permute else None
            per_rank[r] = (Res, perm)
        scored = []
        for r, cfg, total in cands:
            Res, perm = per_rank[r]
            scored.append((estimate_error(Res, cfg, colw, perm, seed=self.seed), r, cfg, total))
        err, rank, cfg, total = min(scored, key=lambda s: (s[0], s[3]))
        perm = per_rank[rank][1]
        log.debug("%s: %d candidates, chose r%d %s (%.3f bits/weight, estimated error %.4g)", state.name,
                  len(cands), rank, cfg.describe(), total / (out * k), err)

        vq = VectorQuantizer(cfg, (out, k), colw, perm, iters=self.kmeans_iters, sample=self.kmeans_sample,
                             seed=self.seed)

        def quantize(X):
            first = vq.codebook is None
            return vq.encode(X, iters=None if first else max(1, self.kmeans_iters // 3))

        res = lq_alternate(W, rank, quantize, D, iters=self.iters, seed=self.seed)
        code = res.code
        storage = cfg.bits(out, k, self.permute)
        tensors = code.tensors()
        grid, used_decoder = f"{cfg.describe()} r{rank}", False
        Q = res.Q
        if self.decoder:
            Q, storage, tensors, grid, used_decoder = self._try_decoder(state.name, W - res.A @ res.B, Dv, Q,
                                                                        storage, tensors, grid)
        state.weight = Q
        state.storage = storage
        state.tensors = tensors
        if rank:
            state.L, state.R = res.B.T.contiguous(), res.A.T.contiguous()  # y += (x L) R = x (A B)^T
        state.notes["grid"] = grid
        if not used_decoder:  # the persisted code alone gives the base weight (native export reads this)
            state.notes["vq"] = {"d": cfg.d, "code_bits": cfg.code_bits, "block": cfg.block,
                                 "scale_group": cfg.scale_group}
        state.notes["reallm"] = {"rank": rank, "d": cfg.d, "K": cfg.K, "block": cfg.block,
                                 "scale_group": cfg.scale_group,
                                 "permute": self.permute, "candidates": len(cands),
                                 "lq_errors": [round(e, 6) for e in res.history],
                                 "lq_rejected": res.rejected, "decoder": used_decoder}
        return state

    def _try_decoder(self, name, Res, Dv, Q, storage, tensors, grid):
        """Replace the VQ of the final residual by the neural decoder when it is more accurate at no
        more stored bits; log the comparison either way."""
        dcfg = self.decoder_config()
        budget = sum(storage.values())
        e = latent_dim(tuple(Res.shape), dcfg, budget)
        if e == 0:
            log.info("%s: decoder does not fit the VQ's %d bits; keeping VQ", name, budget)
            return Q, storage, tensors, grid, False
        fit = fit_decoder(Res, dcfg, e, Dv.square())
        err_vq = ((Res - Q) * Dv).norm().item()
        err_dec = ((Res - fit.X_hat) * Dv).norm().item()
        if err_dec < err_vq:
            log.info("%s: decoder (latent %d x %d bits) beats VQ: %.4g < %.4g", name, e, dcfg.latent_bits,
                     err_dec, err_vq)
            return fit.X_hat, fit.bits(), fit.tensors(), f"decoder t{dcfg.tile} e{e}", True
        log.info("%s: decoder (latent %d x %d bits, %d steps) loses to VQ at the same bits: %.4g >= %.4g; "
                 "keeping VQ", name, e, dcfg.latent_bits, fit.steps, err_dec, err_vq)
        return Q, storage, tensors, grid, False

    # -- fine-tuning of the low-rank parts -------------------------------------------------------
    def refine_block(self, ctx: BlockContext) -> None:
        if not self.finetune:
            return
        names = [n for n, s in ctx.states.items() if "reallm" in s.notes and s.L is not None]
        if not names:
            log.info("block %d: no low-rank parts to fine-tune", ctx.index)
            return
        before, after = finetune_lowrank(ctx, names, self.ft_steps, self.ft_lr, self.ft_sequences,
                                         seed=self.seed + ctx.index)
        log.info("block %d: low-rank fine-tuning, output MSE %.4g -> %.4g", ctx.index, before, after)


def _select(value, idx: torch.Tensor, batch: int):
    """Keep the sequences ``idx`` of a block keyword argument (tensors of >= 2 dims with the batch first)."""
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == batch:
        return value[idx.to(value.device)]
    if isinstance(value, (tuple, list)):
        return type(value)(_select(v, idx, batch) for v in value)
    return value


def finetune_lowrank(ctx: BlockContext, names: list[str], steps: int, lr: float, sequences: int,
                     seed: int = 0) -> tuple[float, float]:
    """Adam on the fp16 low-rank factors (L, R) of ``names`` only, minimising the block's output MSE
    against the dense block on random subsets of ``sequences`` calibration sequences. The base
    weights stay fixed. Keeps the tuned factors only if the MSE on a fixed subset went down.
    Returns (MSE before, MSE after) on that subset."""
    block, B = ctx.block, ctx.batch_size
    nb = len(ctx.kwargs_list)
    g = torch.Generator().manual_seed(seed)  # CPU draws (reproducible); indices follow the data's device

    def batch(b: int, idx: torch.Tensor):
        sl = slice(b * B, (b + 1) * B)
        x, y = ctx.inputs[sl], ctx.targets[sl]
        n = x.shape[0]
        kw = {k: _select(v, idx, n) for k, v in ctx.kwargs_list[b].items()} if n > 1 else ctx.kwargs_list[b]
        return x[idx.to(x.device)], y[idx.to(y.device)], kw

    def loss_of(x, y, kw):
        out = block(x, **kw)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return (out - y).square().mean()

    params = {}
    for n in names:
        st = ctx.states[n]
        ctx.linears[n].weight.data.copy_(st.weight)  # the base; the factors act through a hook
        params[n] = (st.L.clone().requires_grad_(True), st.R.clone().requires_grad_(True))

    def hook(n):
        def fn(module, args, output):
            L, R = params[n]
            return output + (args[0] @ L) @ R  # (.., in) @ (in, r) @ (r, out)
        return fn

    flags = [(p, p.requires_grad) for p in block.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    b_eval = int(torch.randint(nb, (1,), generator=g))
    n_eval = min(ctx.inputs.shape[0] - b_eval * B, B)
    eval_batch = batch(b_eval, torch.arange(min(sequences, n_eval)))
    opt = torch.optim.Adam([p for pair in params.values() for p in pair], lr=lr)
    handles = [ctx.linears[n].register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            before = loss_of(*eval_batch).item()
        with torch.enable_grad():
            for _ in range(steps):
                b = int(torch.randint(nb, (1,), generator=g))
                n = min(ctx.inputs.shape[0] - b * B, B)
                idx = torch.randperm(n, generator=g)[:sequences]
                loss = loss_of(*batch(b, idx))
                opt.zero_grad()
                loss.backward()
                opt.step()
        for L, R in params.values():  # what will be stored
            L.data, R.data = L.data.half().float(), R.data.half().float()
        with torch.no_grad():
            after = loss_of(*eval_batch).item()
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    if after < before:
        for n in names:
            ctx.states[n].L, ctx.states[n].R = (p.detach().clone() for p in params[n])
    for n in names:
        ctx.write(n)
    return before, min(before, after)
