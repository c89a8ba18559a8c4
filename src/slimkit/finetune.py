"""Adapter fine-tuning after compression: train only the low-rank adapters (L, R) of the
compressed Linears on calibration text with the causal-LM loss; base weights stay frozen.
Quantized adapters are trained through a straight-through estimator (the forward uses the
AbsMax-quantized adapters, the gradient passes to the float copies), and stored quantized.

CPU-sized: a bounded number of steps over 512-token sequences, AdamW with linear warm-up
and linear decay (the paper uses AdaFactor, whose benefit is optimizer memory, irrelevant
for adapters of this size).
"""
from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import NumericalError, RecipeError, require_positive_ints
from .ops.lowrank import absmax_quantize

log = logging.getLogger(__name__)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    """A finite int or float (not a bool, not NaN or infinite)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _hint(v) -> str:
    """Why a number in exponent notation without a dot came out of YAML as a string."""
    if isinstance(v, str) and re.fullmatch(r"[-+]?\d+[eE][-+]?\d+", v.strip()):
        return f" (YAML reads {v} without a dot as a string: write e.g. 1.0e-4)"
    return ""


@dataclass
class FinetuneConfig:
    steps: int = 64
    batch_size: int = 2
    lr: float = 1e-4
    warmup: int = 5
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self):
        """Every field checked here, at recipe load, not when training starts after compression:
        integers are not bools, numbers are finite."""
        require_positive_ints(self, ("steps", "batch_size"), prefix="finetune.")
        if not _is_int(self.warmup) or self.warmup < 0:
            raise RecipeError(f"finetune.warmup must be a non-negative integer, got {self.warmup!r}")
        for key in ("steps", "batch_size", "warmup"):
            if getattr(self, key) >= 2**31:
                raise RecipeError(f"finetune.{key} must be below 2**31, got {getattr(self, key)!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**64:
            raise RecipeError(f"finetune.seed must be a non-negative integer (below 2**64), got {self.seed!r}")
        if not (_is_number(self.lr) and 0 < self.lr < 1):
            raise RecipeError(f"finetune.lr must be a number in (0, 1), got {self.lr!r}{_hint(self.lr)}")
        if not (_is_number(self.weight_decay) and self.weight_decay >= 0):
            raise RecipeError(f"finetune.weight_decay must be a finite number >= 0, got {self.weight_decay!r}"
                              f"{_hint(self.weight_decay)}")

    @classmethod
    def from_dict(cls, d) -> "FinetuneConfig":
        if not isinstance(d, dict):
            raise RecipeError(f"finetune must be a mapping, got {d!r}")
        allowed = set(cls.__dataclass_fields__)
        for k in d:
            if k not in allowed:
                raise RecipeError(f"unknown finetune key {k!r}; allowed: {', '.join(sorted(allowed))}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


class _STEAbsMax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, M, bits, group):
        return absmax_quantize(M, bits, group)[0]

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class AdapterLinear(nn.Module):
    """y = x W^T (+ b) + (x Q(L)) Q(R) with W, b frozen and L, R trained."""

    def __init__(self, base: nn.Linear, weight: torch.Tensor, L: torch.Tensor, R: torch.Tensor,
                 bits: int | None, group: int):
        super().__init__()
        # the frozen base computes like the Linear it replaces (its device and dtype); the
        # adapters train in fp32 on that device
        like = base.weight
        self.register_buffer("weight", weight.detach().to(like.device, like.dtype, copy=True))
        self.register_buffer("bias", None if base.bias is None else base.bias.detach().clone())
        self.L = nn.Parameter(L.detach().to(like.device, torch.float32, copy=True))
        self.R = nn.Parameter(R.detach().to(like.device, torch.float32, copy=True))
        self.bits, self.group = bits, group
        self.in_features, self.out_features = base.in_features, base.out_features

    def adapters(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.bits is None:
            return self.L, self.R
        return _STEAbsMax.apply(self.L, self.bits, self.group), _STEAbsMax.apply(self.R, self.bits, self.group)

    def forward(self, x):
        L, R = self.adapters()
        y = (x if x.dtype == L.dtype else x.to(L.dtype)) @ L @ R
        return F.linear(x, self.weight, self.bias) + y.to(x.dtype)

    def merged(self) -> nn.Linear:
        L, R = (t.detach() for t in self.adapters())
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        lin.weight.data.copy_(self.weight.float() + (L @ R).T)
        if self.bias is not None:
            lin.bias.data.copy_(self.bias)
        lin.requires_grad_(False)
        return lin


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def finetune_adapters(model: nn.Module, adapters: dict[str, dict], ids: torch.Tensor, cfg: FinetuneConfig,
                      progress: bool = True, placement=None) -> dict:
    """Train the adapters of ``adapters`` (name -> {weight, L, R, bits, group}) on token windows
    ``ids`` (N, S). Merges the result back into plain Linears; returns the loss curve and the
    trained (quantized) adapters per layer (on the CPU).

    With a ``placement`` that moves blocks (calib.device.Placement), the whole model moves to
    the compute device in the compute dtype for the training (backward needs every block) and
    back to its storage afterwards; on a CPU that is a temporary fp32 copy of a bf16 model."""
    if not adapters:
        raise RecipeError("finetune needs low-rank adapters (slim_lora, or reallm with a rank above 0), and no layer has any")
    if placement is not None and placement.offloads:
        home = placement.onload(model)
        try:
            return finetune_adapters(model, adapters, ids, cfg, progress=progress)
        finally:
            placement.offload(model, home)
    wrapped = {}
    for name, a in adapters.items():
        base = model.get_submodule(name)
        wrapped[name] = AdapterLinear(base, a["weight"], a["L"], a["R"], a["bits"], a["group"])
        _set_module(model, name, wrapped[name])
    params = [p for m in wrapped.values() for p in (m.L, m.R)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(step):
        if step < cfg.warmup:
            return (step + 1) / (cfg.warmup + 1)
        return max(0.0, (cfg.steps - step) / max(1, cfg.steps - cfg.warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(ids.shape[0], generator=g)
    curve = []
    model.train()
    t0 = time.perf_counter()
    try:
        bar = tqdm(range(cfg.steps), desc="finetune adapters", unit="step", disable=not progress)
        for step in bar:
            pick = torch.arange(step * cfg.batch_size, (step + 1) * cfg.batch_size) % ids.shape[0]
            batch = ids[order[pick]].to(model.get_input_embeddings().weight.device)
            with torch.enable_grad():
                logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
                if not math.isfinite(loss.item()):
                    raise NumericalError(f"adapter fine-tuning diverged at step {step} (loss {loss.item()})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            sched.step()
            curve.append(round(loss.item(), 5))
            bar.set_postfix(loss=f"{loss.item():.3f}")
    finally:
        model.eval()
        trained = {}
        for name, m in wrapped.items():
            L, R = (t.detach().cpu().clone() for t in m.adapters())
            trained[name] = {"L": L, "R": R}
            _set_module(model, name, m.merged())
    return {"loss": curve, "seconds": time.perf_counter() - t0, "config": cfg.to_dict(), "adapters": trained}
