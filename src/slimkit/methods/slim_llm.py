"""SliM-LLM (Huang et al., arXiv 2405.14917): salience-driven mixed-precision group quantization,
and SliM-LLM+ (learned clipping on the same bit map, trained on the block output MSE).

Per Linear: salience delta = W^2 / diag(Hinv)^2; the column groups are ranked by salience and
SBA moves the top k one bit up and the bottom k one bit down (the average stays exactly
``bits``), k chosen by the KL of the layer's output softmax on calibration tokens; then the
GPTQ sweep quantizes each group at its own width with SQC grids (1-bit groups binarized).

Persisted per Linear (slimkit_state.safetensors): ``group_bits`` (G,) uint8, ``codes`` (out, in)
uint8 at each group's width, ``scale`` (out, G) and ``zero`` (out, G) float32 (binarized groups
have a fractional zero); value = (codes - zero) * scale for every group.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.func import functional_call
from tqdm.auto import tqdm

from ..errors import RecipeError
from ..ops.bits import weight_bits
from ..ops.obs import obs_sweep
from ..ops.quant import QuantSpec, group_slices
from ..ops.salience import (Allocation, MixedGrid, binarize_params, grid_fake_quantize, lwc_fake_quantize,
                            mixed_codes, mixed_storage, sba_search, to_groups)
from .base import HESSIAN, INPUT_SAMPLE, BlockContext, LinearState, LinearStats, Stage, register
from .gptq import SweepFields

log = logging.getLogger(__name__)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@register
@dataclass
class SliMLLM(SweepFields, Stage):
    """SBA bit map + SQC grids inside the GPTQ sweep (no act-order)."""

    name = "slim_llm"
    needs = frozenset({HESSIAN, INPUT_SAMPLE})
    quantizes = True
    examples = ({"bits": 2, "group_size": 32}, {"bits": 3, "group_size": 48})
    bits: int = 2  # average bits per weight; groups get bits - 1, bits, bits + 1
    group_size: int = 128
    salient_weight: float = 1.0  # SQC's lambda on salient weights (|z-score of delta| > 2)
    clip_span: float = 0.1  # SQC tries t in [1 - span, 1 + span]
    clip_steps: int = 101
    kl_tokens: int = 4096  # calibration tokens scoring the SBA candidates

    def record_bytes(self, name: str, out_features: int, in_features: int, position=None) -> dict[str, int]:
        """uint8 codes, fp32 scale and zero point per (row, group), each group's width (uint8)."""
        groups = -(-in_features // self.group_size)
        return {"codes": out_features * in_features, "scale": 4 * out_features * groups,
                "zero": 4 * out_features * groups, "group_bits": groups}

    def __post_init__(self):
        if not _int(self.bits) or not 2 <= self.bits <= 7:
            raise RecipeError(f"bits (the average) must be an integer from 2 to 7, got {self.bits!r}")
        if not _int(self.group_size) or self.group_size < 2:
            raise RecipeError(f"group_size must be an integer >= 2 (SliM-LLM allocates bits per group), "
                              f"got {self.group_size!r}")
        if not isinstance(self.salient_weight, (int, float)) or self.salient_weight <= 0:
            raise RecipeError(f"salient_weight must be a positive number, got {self.salient_weight!r}")
        if not isinstance(self.clip_span, (int, float)) or not 0 <= self.clip_span < 1:
            raise RecipeError(f"clip_span must be in [0, 1), got {self.clip_span!r}")
        if not _int(self.clip_steps) or self.clip_steps < 1:
            raise RecipeError(f"clip_steps must be a positive integer, got {self.clip_steps!r}")
        if not _int(self.kl_tokens) or self.kl_tokens < 1:
            raise RecipeError(f"kl_tokens must be a positive integer, got {self.kl_tokens!r}")
        self.check_sweep()

    def allocate(self, W: torch.Tensor, d: torch.Tensor, stats: LinearStats) -> Allocation:
        return sba_search(W, d, stats.sample[: self.kl_tokens], self.bits, self.group_size)

    def apply(self, state: LinearState, stats: LinearStats) -> LinearState:
        inv = stats.inverse(self.percdamp, False, state.name)
        W = state.weight if state.mask is None else state.weight * state.mask
        W = W.clone()
        W[:, inv.dead] = 0
        d = torch.diag(inv.Hinv)  # (in,)
        alloc = self.allocate(W, d, stats)
        grid = MixedGrid(alloc.bits, d, self.group_size, self.salient_weight, self.clip_span, self.clip_steps)
        res = obs_sweep(W, inv, quant=QuantSpec(int(alloc.bits.max()), self.group_size), mask=state.mask,
                        blocksize=self.blocksize, grid=grid, record_inputs=self.records_inputs())
        finish(state, res.W, res.scale, res.zero, alloc, self.group_size)
        state.notes["damp"] = inv.damp
        self.after_sweep(state, res.inputs, W)
        return state

    def records_inputs(self) -> bool:
        return False

    def after_sweep(self, state: LinearState, inputs: torch.Tensor | None, W: torch.Tensor) -> None:
        """Hook for SliM-LLM+."""


def finish(state: LinearState, Wq: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
           alloc: Allocation, group_size: int) -> None:
    """Write a mixed-width result into ``state``: weight, grid, bit map, codes, storage, notes."""
    out, k = Wq.shape
    if state.mask is not None:
        Wq = Wq * state.mask
    bits = alloc.bits
    state.weight, state.scale, state.zero = Wq, scale, zero
    state.quant = QuantSpec(int(bits.max()), group_size)  # the layout; codes of every group fit in bits.max()
    state.tensors["group_bits"] = bits.to(torch.uint8)
    state.tensors["codes"] = mixed_codes(Wq, scale, zero, bits, group_size).to(torch.uint8)
    state.tensors["zero"] = zero.to(torch.float32).clone()
    kept = None
    mask_bits = 0
    if state.mask is not None:
        kept = torch.stack([state.mask[:, sl].sum() for sl in group_slices(k, group_size)])
        nm = state.sparsity.m if (state.sparsity and state.sparsity.structured) else 0
        mask_bits = weight_bits(out, k, kept=int(state.mask.sum()), nm_m=nm)["mask"]
    state.storage = mixed_storage(bits, out, k, group_size, kept) | {"mask": mask_bits}
    widths = [sl.stop - sl.start for sl in group_slices(k, group_size)]
    bits_list = bits.tolist()  # one host copy of the (G,) bit map
    avg = float(sum(b * w for b, w in zip(bits_list, widths))) / k
    counts = " ".join(f"{b}b:{bits_list.count(b)}" for b in sorted(set(bits_list)))
    state.notes["grid"] = f"mixed W{avg:.2f} g{group_size} asym ({counts})"
    state.notes["sba_k"] = alloc.k
    state.notes["sba_kl"] = alloc.kl[alloc.k]


@dataclass
class _Pending:
    """What SliM-LLM+ keeps of a Linear between ``apply`` and ``refine_block``."""

    W: torch.Tensor  # (out, in) the weights the clipping applies to
    bits: torch.Tensor  # (G,)
    base_max: torch.Tensor  # (out, G) range the sigmoid clipping scales
    base_min: torch.Tensor
    fixed: torch.Tensor  # (out, in) values of binarized groups (kept fixed)
    fixed_scale: torch.Tensor  # (out, G) their grids (entries of other groups unused)
    fixed_zero: torch.Tensor
    alloc: Allocation

    def __post_init__(self):  # binarized groups get a harmless range: their thetas never matter
        one = (self.bits == 1)[None, :]
        self.base_max = torch.where(one, torch.ones_like(self.base_max), self.base_max)
        self.base_min = torch.where(one, -torch.ones_like(self.base_min), self.base_min)


@register
@dataclass
class SliMLLMPlus(SliMLLM):
    """SliM-LLM+: the SliM-LLM bit map, then per-row per-group learnable clipping sigmoid(theta)
    (theta init 4) trained with AdamW on the block output MSE (OmniQuant-style LWC).

    ``start: gptq`` (default, CPU-sized) clips the weights the GPTQ sweep rounded, with the
    range normalised so that theta = theta_init reproduces the SliM-LLM result (up to float rounding);
    ``start: original`` is the paper's LWC on the original weights' min-max range (no GPTQ), which
    needs far more steps than the CPU defaults to beat GPTQ. Binarized groups stay fixed.
    Trained on the first ``train_samples`` calibration sequences, ``batch`` per step, ``epochs``
    passes; the trained clipping is kept only if it lowers the block output MSE on them."""

    name = "slim_llm_plus"
    examples = ({"bits": 2, "group_size": 32}, {"bits": 2, "group_size": 48, "start": "original"})
    start: str = "gptq"
    lr: float = 1e-2
    theta_init: float = 4.0
    weight_decay: float = 0.0
    epochs: int = 5
    train_samples: int = 8  # calibration sequences trained on (the first ones)
    batch: int = 2  # sequences per AdamW step

    def __post_init__(self):
        super().__post_init__()
        if self.start not in ("gptq", "original"):
            raise RecipeError(f"start must be 'gptq' or 'original', got {self.start!r}")
        for key in ("epochs", "train_samples", "batch"):
            v = getattr(self, key)
            if not _int(v) or v < (0 if key == "epochs" else 1):
                raise RecipeError(f"{key} must be a {'non-negative' if key == 'epochs' else 'positive'} "
                                  f"integer, got {v!r}")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise RecipeError(f"lr must be a positive number, got {self.lr!r}")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise RecipeError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not isinstance(self.theta_init, (int, float)):
            raise RecipeError(f"theta_init must be a number, got {self.theta_init!r}")
        self._pending: dict[str, _Pending] = {}

    def records_inputs(self) -> bool:
        return self.start == "gptq"

    def apply(self, state: LinearState, stats: LinearStats) -> LinearState:
        if self.start == "gptq":
            return super().apply(state, stats)
        inv = stats.inverse(self.percdamp, False, state.name)
        W = state.weight if state.mask is None else state.weight * state.mask
        W = W.clone()
        W[:, inv.dead] = 0
        alloc = self.allocate(W, torch.diag(inv.Hinv), stats)
        g = self.group_size
        Wg = to_groups(W, g)  # (out, G, g) zero padded: the range including 0 is unchanged
        fixed = torch.zeros_like(W)
        fs, fz = torch.ones_like(Wg[..., 0]), torch.zeros_like(Wg[..., 0])  # (out, G)
        bits_list = alloc.bits.tolist()  # one host copy, not one sync per group
        for gi, sl in enumerate(group_slices(W.shape[1], g)):
            if bits_list[gi] == 1:
                fs[:, gi], fz[:, gi] = binarize_params(W[:, sl])
                fixed[:, sl] = grid_fake_quantize(W[:, sl], fs[:, gi:gi + 1], fz[:, gi:gi + 1], 1)
        p = _Pending(W, alloc.bits, Wg.amax(-1).clamp(min=0), Wg.amin(-1).clamp(max=0), fixed, fs, fz, alloc)
        self._store(state, p)
        self._pending[state.name] = p
        return state

    def after_sweep(self, state: LinearState, inputs: torch.Tensor | None, W: torch.Tensor) -> None:
        bits = state.tensors["group_bits"].to(torch.int64)
        maxq = (2**bits - 1).to(torch.float32)[None, :]  # (1, G)
        s0 = torch.sigmoid(torch.tensor(self.theta_init, device=state.scale.device))
        base_max, base_min = (maxq - state.zero) * state.scale / s0, -state.zero * state.scale / s0
        k = W.shape[1]
        one = (bits == 1).repeat_interleave(self.group_size)[:k]  # (in,) columns of binarized groups
        fixed = torch.where(one[None, :], state.weight, torch.zeros_like(state.weight))
        alloc = Allocation(bits, state.notes["sba_k"], {state.notes["sba_k"]: state.notes["sba_kl"]})
        self._pending[state.name] = _Pending(inputs, bits, base_max, base_min, fixed, state.scale.clone(),
                                             state.zero.clone(), alloc)

    def _theta(self, p: _Pending) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.full_like(p.base_max, float(self.theta_init))
        return t.clone().requires_grad_(True), t.clone().requires_grad_(True)

    def _quantize(self, p: _Pending, up, low, mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, k = p.W.shape
        maxq = (2 ** p.bits - 1).clamp(min=1).to(torch.float32)
        vals, scale, zero = lwc_fake_quantize(to_groups(p.W, self.group_size), up, low, p.base_max, p.base_min, maxq)
        Wq = vals.reshape(out, -1)[:, :k]
        one = (p.bits == 1).repeat_interleave(self.group_size)[:k]
        Wq = torch.where(one[None, :], p.fixed, Wq)
        if mask is not None:
            Wq = Wq * mask
        return Wq, scale, zero

    def _store(self, state: LinearState, p: _Pending, up=None, low=None) -> None:
        """Write the clipped result for thetas (init when None) into ``state``."""
        if up is None:
            up, low = self._theta(p)
        with torch.no_grad():
            Wq, scale, zero = self._quantize(p, up, low, state.mask)
            one = (p.bits == 1)[None, :]
            scale = torch.where(one, p.fixed_scale, scale)
            zero = torch.where(one, p.fixed_zero, zero)
        finish(state, Wq, scale, zero, p.alloc, self.group_size)

    def refine_block(self, ctx: BlockContext) -> None:
        pend = {n: self._pending.pop(n) for n in list(ctx.states) if n in self._pending}
        if not pend or self.epochs == 0:
            return
        rel = {id(m): n for n, m in ctx.block.named_modules()}
        wname = {n: f"{rel[id(ctx.linears[n])]}.weight" for n in pend}
        thetas = {n: self._theta(p) for n, p in pend.items()}
        params = [t for pair in thetas.values() for t in pair]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        steps = _minibatches(ctx, self.train_samples, self.batch)
        frozen = [p for p in ctx.block.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)

        def block_loss(x, kw, y):
            weights = {wname[n]: self._quantize(pend[n], *thetas[n], ctx.states[n].mask)[0] for n in pend}
            out = functional_call(ctx.block, weights, (x,), kw)
            out = out[0] if isinstance(out, (tuple, list)) else out
            return torch.nn.functional.mse_loss(out, y)

        def total_loss():
            with torch.no_grad():  # one host sync for all minibatches
                return sum(torch.stack([block_loss(*s) for s in steps]).tolist()) / len(steps)

        try:
            before = total_loss()
            bar = tqdm(total=self.epochs * len(steps), desc=f"slim-llm+ block {ctx.index}", unit="step",
                       leave=False, disable=not log.isEnabledFor(logging.INFO))
            with torch.enable_grad():
                for _ in range(self.epochs):
                    for s in steps:
                        opt.zero_grad(set_to_none=True)
                        loss = block_loss(*s)
                        loss.backward()
                        opt.step()
                        bar.update()
                        if not bar.disable:  # reading the loss back syncs: only for a visible bar
                            bar.set_postfix(mse=f"{loss.item():.3g}")
            bar.close()
            after = total_loss()
        finally:
            for p in frozen:
                p.requires_grad_(True)
        keep = after < before
        log.info("slim-llm+ block %d: block output MSE %.4g -> %.4g (%s)", ctx.index, before, after,
                 "kept" if keep else "reverted")
        for n, p in pend.items():
            st = ctx.states[n]
            if keep:  # else the state still holds the initial clipping's result
                up, low = thetas[n]
                self._store(st, p, up.detach(), low.detach())
            st.notes["lwc_mse"] = [before, after]
            if keep:
                st.notes["grid"] += " +LWC"
            ctx.write(n)


def _slice_batch(v, lo: int, hi: int, n: int):
    """Slice the batch dimension (size n) of tensors in a block's keyword arguments."""
    if torch.is_tensor(v):
        return v[lo:hi] if v.dim() and v.shape[0] == n and n > 1 else v
    if isinstance(v, tuple):
        return tuple(_slice_batch(x, lo, hi, n) for x in v)
    if isinstance(v, list):
        return [_slice_batch(x, lo, hi, n) for x in v]
    return v


def _minibatches(ctx: BlockContext, samples: int, batch: int) -> list[tuple]:
    """(inputs, kwargs, targets) of the first ``samples`` sequences, ``batch`` at a time, each
    minibatch inside one engine batch (whose keyword arguments it shares)."""
    N = ctx.inputs.shape[0]
    out = []
    for b, kw in enumerate(ctx.kwargs_list):
        b0, b1 = b * ctx.batch_size, min((b + 1) * ctx.batch_size, N)
        for lo in range(b0, b1, batch):
            if lo >= samples:
                return out
            hi = min(lo + batch, b1, samples)
            kw_s = {k: _slice_batch(v, lo - b0, hi - b0, b1 - b0) for k, v in kw.items()}
            out.append((ctx.inputs[lo:hi], kw_s, ctx.targets[lo:hi]))
    return out
