"""The Optimal Brain Surgeon column sweep shared by GPTQ/OPTQ and SparseGPT.

Walk the columns of W (out, in) in blocks; for column i pick the new value q
(quantized, zero if pruned), error err = (w_i - q) / Hinv_ii, and push the error
onto the remaining columns of the block with Hinv[i, i:]; after a block, push the
block's errors onto all later columns with one matmul. Hinv is the upper
Cholesky factor of the damped inverse Hessian.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from ..errors import NumericalError, RecipeError
from .masks import Sparsity, nm_mask
from .quant import QuantSpec, fake_quantize, fit, fit_group, group_slices
from .reduce import all_finite

if TYPE_CHECKING:
    from .gguf import BlockGrid

log = logging.getLogger(__name__)


@dataclass
class InverseHessian:
    Hinv: torch.Tensor  # (in, in) upper Cholesky factor of (H + damp I)^-1, in sweep order
    perm: torch.Tensor | None  # sweep order (act-order) or None for natural order
    dead: torch.Tensor  # (in,) bool, inputs that never fired
    damp: float  # the damping actually used (relative to mean diag H)


def inverse_hessian(H: torch.Tensor, percdamp: float = 0.01, actorder: bool = False,
                    max_tries: int = 6, name: str = "") -> InverseHessian:
    """Dead inputs get H_jj = 1; damping percdamp * mean(diag H), multiplied by 10 on each
    Cholesky failure (logged) up to ``max_tries`` times.

    Works on a copy of H in fp32 on H's device and damps its diagonal in place (no identity
    matrix): at most three (K, K) fp32 matrices live at once (H, its Cholesky factor, the
    inverse). Only when the fp32 factorisation fails is it retried in fp64."""
    if not all_finite(H):
        raise NumericalError(f"the Hessian of {name or 'a layer'} has NaN/Inf entries")
    H = H.detach().to(torch.float32, copy=True)  # (K, K)
    diag = H.diagonal()
    dead = diag == 0
    diag[dead] = 1
    perm = None
    if actorder:
        perm = torch.argsort(diag, descending=True)
        H = H[perm][:, perm]
    d0 = H.diagonal().clone()  # (K,) undamped diagonal
    mean_diag = d0.mean().item()
    damp = percdamp
    for attempt in range(max_tries):
        for dtype in (torch.float32, torch.float64) if attempt == 0 else (torch.float64,):
            if H.dtype != dtype:
                H = H.to(dtype)
                d0 = d0.to(dtype)
            H.diagonal().copy_(d0 + damp * mean_diag)
            U = _upper_inverse_factor(H)
            if U is not None:
                if attempt:
                    log.warning("%s: Cholesky needed damping %.3g (asked %.3g)", name or "layer", damp, percdamp)
                elif dtype != torch.float32:
                    log.info("%s: Cholesky needed fp64", name or "layer")
                return InverseHessian(U.to(torch.float32), perm, dead, damp)
        damp = damp * 10 if damp > 0 else 1e-4
    raise NumericalError(f"Cholesky of the Hessian of {name or 'a layer'} failed even with damping {damp:g}")


def dense_target(W: torch.Tensor, cross: torch.Tensor, inv: InverseHessian, alpha: float = 1.0) -> torch.Tensor:
    """W + alpha W D H^-1, with D = (2/n) sum (x - x~)^T x~ and H = (2/n) sum x~^T x~ (GPTAQ's
    asymmetric calibration). With ``alpha`` 1 it is the weight whose outputs on the compressed
    model's inputs x~ best match the dense model's outputs W x on its own inputs x (least squares,
    damped as the sweep's H); since that fit's residual is orthogonal to every x~, a sweep that
    minimises tr((W' - Q) H (W' - Q)^T) from W' minimises the error against the dense outputs too.
    GPTAQ's reference code takes a quarter of the correction (alpha 0.25): the full one chases
    the upstream error with this layer alone and over-fits the calibration tokens."""
    W = W.to(torch.float32)
    G = alpha * (W @ cross.to(W.device, torch.float32))  # (out, in)
    U = inv.Hinv.to(W.device)  # (H + damp)^-1 = U^T U in sweep order
    if inv.perm is None:
        delta = (G @ U.T) @ U
    else:
        delta = torch.empty_like(G)
        delta[:, inv.perm] = (G[:, inv.perm] @ U.T) @ U
    delta[:, inv.dead.to(W.device)] = 0
    return W + delta


def _upper_inverse_factor(H: torch.Tensor) -> torch.Tensor | None:
    """Upper Cholesky factor of H^-1 (H damped, symmetric positive definite), or None when a
    factorisation fails or leaves non-finite values."""
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() != 0 or not all_finite(L):
        return None
    Hinv = torch.cholesky_inverse(L)
    del L
    U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    del Hinv
    if info.item() != 0 or not all_finite(U):
        return None
    return U


@dataclass
class SweepResult:
    W: torch.Tensor  # (out, in) new weights (quantized and/or pruned), natural column order
    keep: torch.Tensor | None  # (out, in) bool keep-mask, when anything was pruned
    scale: torch.Tensor | None  # (out, G) grid of every (row, group), when quantized
    zero: torch.Tensor | None
    inputs: torch.Tensor | None = None  # (out, in) each column as it was just before rounding (record_inputs)


class GroupGrid(Protocol):
    """A per-group quantizer for obs_sweep (e.g. mixed bit-widths): ``fit`` gets a group's
    columns (out, width) as the sweep reaches them, ``fake_quantize`` one column (out,)."""

    def fit(self, gi: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def fake_quantize(self, gi: int, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor: ...


def _block_size(blocksize: int, quant: QuantSpec | None, sparsity: Sparsity | None, k: int,
                group: int | None = None) -> int:
    """Blocks hold whole groups (``group``: a block grid's block) and whole N:M runs, so
    parameters fitted at a group start see every error already pushed onto that group."""
    unit = 1
    if group is not None:  # a block grid's blocks divide the width
        unit = group
    elif quant is not None and quant.group_size and quant.group_size < k:
        unit = quant.group_size
    if sparsity is not None and sparsity.structured:
        unit = unit * sparsity.m // math.gcd(unit, sparsity.m)
    return unit * max(1, blocksize // unit)


def obs_sweep(W: torch.Tensor, inv: InverseHessian, *, quant: QuantSpec | None = None,
              sparsity: Sparsity | None = None, mask: torch.Tensor | None = None,
              blocksize: int = 128, grid: GroupGrid | None = None, record_inputs: bool = False,
              block_grid: BlockGrid | None = None, importance: torch.Tensor | None = None) -> SweepResult:
    """Prune (``sparsity``, chosen inside the sweep as SparseGPT does), keep an existing ``mask``,
    and/or quantize (``quant``, groups fitted as the sweep reaches them; with act-order the
    groups are fitted up front on the natural column order) W (out, in). ``grid`` replaces the
    uniform grid of ``quant`` group by group (``quant`` then only gives the group layout);
    ``record_inputs`` returns every column as it was just before it was rounded. ``block_grid``
    (a GGUF block type, ops.gguf.BlockGrid) quantizes instead of ``quant``: it fits each block
    when the sweep reaches it (with act-order: every block up front, "static groups"), keeps its
    own parameters and codes, and leaves values that are exactly its format's. ``importance`` (in,),
    natural order: the columns' weights of a ``weighted_search`` grid fit."""
    if block_grid is not None:
        if quant is not None or grid is not None:
            raise RecipeError("a GGUF block grid replaces the uniform grid: give one or the other")
    if quant is None and sparsity is None and block_grid is None:
        raise RecipeError("an OBS sweep needs a quantizer, a sparsity target or both")
    if grid is not None and quant is None:
        raise RecipeError("a per-group grid needs a QuantSpec for its group layout")
    if quant is not None and quant.weighted_search and importance is None:
        raise RecipeError("weighted_search needs the input's second moments (calibration statistics)")
    if importance is not None:
        importance = importance.to(W.device, torch.float32)
    gw = quant.group_width(W.shape[1]) if quant is not None else None
    fit_one = grid.fit if grid is not None else (  # group gi starts at natural column gi * gw
        lambda gi, w: fit_group(w, quant, None if importance is None else importance[gi * gw:gi * gw + w.shape[1]]))
    fq = grid.fake_quantize if grid is not None else (lambda gi, w, s, z: fake_quantize(w, s, z, quant.bits))
    if sparsity is not None and mask is not None:
        raise RecipeError("a layer that is already pruned cannot be pruned again")
    W = W.detach().to(torch.float32).clone()
    out, k = W.shape
    W[:, inv.dead] = 0
    perm = inv.perm
    if perm is not None and sparsity is not None and sparsity.structured:
        raise RecipeError("act-order cannot be combined with N:M pruning (it would break the N:M runs)")
    keep = None
    if mask is not None:
        keep = mask.clone()
    elif sparsity is not None:
        keep = torch.ones_like(W, dtype=torch.bool)

    scale = zero = None
    col_group = None
    dynamic = False
    if quant is not None:
        G = quant.ngroups(k)
        g = quant.group_width(k)
        col_group = torch.arange(k) // g  # group of every natural column (host side: read per column)
        if (perm is not None or G == 1) and grid is None:
            scale, zero = fit(W * keep if keep is not None else W, quant, importance)
        elif perm is not None or G == 1:
            Wk = W * keep if keep is not None else W
            pairs = [grid.fit(gi, Wk[:, sl]) for gi, sl in enumerate(group_slices(k, quant.group_size))]
            scale, zero = torch.stack([p[0] for p in pairs], 1), torch.stack([p[1] for p in pairs], 1)
        else:
            dynamic = True
            scale = W.new_zeros(out, G)
            zero = W.new_zeros(out, G)
    static = block_grid is not None and perm is not None
    if static:  # act-order with static blocks: every block fitted up front, on the natural column order
        for gi in range(k // block_grid.block):
            sl = slice(gi * block_grid.block, (gi + 1) * block_grid.block)
            block_grid.fit_block(gi, W[:, sl] * keep[:, sl] if keep is not None else W[:, sl])
    perm_list = perm.tolist() if static else None  # the natural column of every sweep position
    if perm is not None:
        W = W[:, perm]
        if keep is not None:
            keep = keep[:, perm]
        col_group = col_group[perm.cpu()] if col_group is not None else None
    col_groups = col_group.tolist() if col_group is not None else None  # no host sync per column

    Hinv = inv.Hinv
    W_in = torch.zeros_like(W) if record_inputs else None
    bg = block_grid.block if block_grid is not None else None
    bs = _block_size(blocksize, quant, sparsity, k, bg)
    g = quant.group_width(k) if quant is not None else k
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        cnt = i2 - i1
        W1 = W[:, i1:i2].clone()  # (out, cnt)
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)  # (cnt,)
        keep1 = keep[:, i1:i2].clone() if keep is not None else None
        if sparsity is not None and not sparsity.structured:
            score = W1**2 / d1[None, :] ** 2  # (out, cnt)
            nprune = int(score.numel() * sparsity.ratio)
            if nprune:
                drop = torch.topk(score.flatten(), nprune, largest=False).indices
                keep1.view(-1)[drop] = False
        for j in range(cnt):
            col = i1 + j
            w = W1[:, j]
            if sparsity is not None and sparsity.structured and col % sparsity.m == 0:
                score = W1[:, j:j + sparsity.m] ** 2 / d1[None, j:j + sparsity.m] ** 2
                keep1[:, j:j + sparsity.m] = nm_mask(score, sparsity.n, sparsity.m)
            if quant is not None:
                gi = col_groups[col]
                if dynamic and col % g == 0:
                    blk = W1[:, j:j + g]
                    if keep1 is not None:
                        blk = blk * keep1[:, j:j + g]
                    scale[:, gi], zero[:, gi] = fit_one(gi, blk)
                q = fq(gi, w, scale[:, gi], zero[:, gi])
            elif block_grid is not None:
                bi, c = divmod(perm_list[col] if static else col, bg)
                if c == 0 and not static:
                    blk = W1[:, j:j + bg]
                    block_grid.fit_block(bi, blk * keep1[:, j:j + bg] if keep1 is not None else blk)
                q = block_grid.columns(bi, torch.tensor([c]), w[:, None],
                                       keep1[:, j:j + 1] if keep1 is not None else None)[:, 0]
            else:
                q = w.clone()
            if keep1 is not None:
                q = q * keep1[:, j]
            Q1[:, j] = q
            if W_in is not None:
                W_in[:, col] = w
            err = (w - q) / d1[j]
            W1[:, j:] -= err[:, None] * Hinv1[j, j:][None, :]
            Err1[:, j] = err
        W[:, i1:i2] = Q1
        if keep1 is not None:
            keep[:, i1:i2] = keep1
        if i2 < k:
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if perm is not None:
        inv_perm = torch.argsort(perm)
        W = W[:, inv_perm]
        if keep is not None:
            keep = keep[:, inv_perm]
        if W_in is not None:
            W_in = W_in[:, inv_perm]
    if not all_finite(W):
        raise NumericalError("the OBS sweep produced NaN/Inf weights")
    return SweepResult(W, keep, scale, zero, W_in)
