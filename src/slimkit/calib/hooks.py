"""Forward hooks as context managers: capture block inputs, collect statistics, probe errors."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .. import dist
from ..methods.base import LinearStats
from ..ops.reduce import sum_squares
from .device import to_device


class _StopForward(Exception):
    """Raised by the capture hook to end a forward pass once block 0's inputs are caught."""


@contextlib.contextmanager
def hooks(handles):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def capture_block_inputs(model: nn.Module, block: nn.Module, ids: torch.Tensor, batch_size: int):
    """Run the model on ``ids`` (N, S) only up to ``block``; return its hidden-state inputs
    (N, S, H) and the keyword arguments the model passed it, one dict per batch."""
    inputs, per_block = capture_inputs(model, [block], ids, batch_size)
    return inputs, per_block[0]


def _block_kwargs(args, kwargs):
    kwargs = dict(kwargs)
    h = args[0] if args else kwargs.pop("hidden_states")
    for k in ("past_key_values", "past_key_value", "layer_past"):
        kwargs.pop(k, None)
    kwargs["use_cache"] = False
    return h, kwargs


def capture_inputs(model: nn.Module, blocks: list[nn.Module], ids: torch.Tensor, batch_size: int):
    """The hidden-state inputs (N, S, H) of ``blocks[0]`` and, for EVERY block i, the keyword
    arguments the model itself passes block i (its own attention mask: sliding-window layers get
    theirs; its own position embeddings), one dict per batch: ``kwargs[i][b]``.

    Each block runs as a pass-through recorder while the model runs (it returns its input
    unchanged, so no block computes anything), and the forward stops after the last block. The
    recorder returns what the model expects of a block: a tensor, or, for models that read
    ``outputs[0]``, a 1-tuple; a block that receives a hidden state of another shape than block 0
    reveals the wrong guess, and the capture is redone with the other one."""
    for tuple_out in (False, True):
        hidden: list[torch.Tensor] = []
        kwargs: list[list[dict]] = [[] for _ in blocks]
        wrong = False

        def recorder(i):
            def forward(*args, **kw):
                nonlocal wrong
                h, kw = _block_kwargs(args, kw)
                if i == 0:
                    hidden.append(h.detach())
                elif h.shape != hidden[-1].shape:
                    wrong = True
                    raise _StopForward
                kwargs[i].append(kw)
                if i == len(blocks) - 1:
                    raise _StopForward
                return (h,) if tuple_out else h
            return forward

        saved = [b.__dict__.get("forward") for b in blocks]
        hooks_saved = [(b._forward_hooks, b._forward_pre_hooks) for b in blocks]  # no block computes:
        try:                                                                      # no hook sees a call
            for i, b in enumerate(blocks):
                b.forward = recorder(i)
                b._forward_hooks, b._forward_pre_hooks = type(b._forward_hooks)(), type(b._forward_pre_hooks)()
            with torch.no_grad():
                for s in range(0, ids.shape[0], batch_size):
                    try:
                        model(input_ids=ids[s:s + batch_size], use_cache=False)
                    except _StopForward:
                        pass
                    if wrong:
                        break
        finally:
            for b, f, (fh, fph) in zip(blocks, saved, hooks_saved):
                b._forward_hooks, b._forward_pre_hooks = fh, fph
                if f is None:
                    del b.forward
                else:
                    b.forward = f
        if not wrong:
            missing = [i for i, k in enumerate(kwargs) if len(k) != len(hidden)]
            if missing:
                raise RuntimeError(f"the model did not call decoder block {missing[0]} on every batch")
            return torch.cat(hidden), kwargs
    raise RuntimeError("the decoder blocks receive hidden states of different shapes")


def run_block(block: nn.Module, inputs: torch.Tensor, kwargs_list: list[dict], batch_size: int,
              out: torch.Tensor | None = None, on_batch=None, device: torch.device | None = None,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """Block outputs (N, S, H) for inputs (N, S, H), batch by batch. With ``device``, each batch
    (and its keyword arguments) is moved there, in ``dtype``, before the block runs, and the
    outputs are copied back into ``out`` wherever it lives (activations offloaded to the CPU)."""
    out = torch.empty_like(inputs) if out is None else out
    with torch.no_grad():
        for b, kw in enumerate(kwargs_list):
            sl = slice(b * batch_size, (b + 1) * batch_size)
            if on_batch is not None:
                on_batch(b)
            x = inputs[sl]
            if device is not None:
                x = x.to(device, dtype or x.dtype, non_blocking=True)
                kw = to_device(kw, device, dtype)
            y = block(x, **kw)
            out[sl] = y[0] if isinstance(y, (tuple, list)) else y
    return out


class StatsCollector:
    """Accumulates per-Linear input statistics during one forward of a block.

    Linears fed the very same tensor object (q/k/v, gate/up) share one LinearStats:
    the grouping is read off the first batch, and only the first Linear of a group
    accumulates, so each statistic is computed once. The tensors seen in a batch are
    held until the next batch so that a freed buffer reused at the same address can
    never be mistaken for a shared input.
    """

    def __init__(self, linears: dict[str, nn.Linear], want_hessian: bool, sample_rows: int = 0,
                 optional: set[int] = frozenset(), min_tokens: int = 0, want_cross: bool = False):
        self.linears = linears
        self.want_cross = want_cross  # pair each input with the dense model's (``dense``, set per batch)
        self.dense: dict[str, torch.Tensor] = {}
        self.optional = optional  # ids of Linears that may see few or no tokens (experts)
        self.min_tokens = min_tokens
        self.starved: dict[str, int] = {}  # optional Linears below min_tokens -> tokens seen
        self.want_hessian = want_hessian
        self.sample_rows = sample_rows
        self.stats: dict[str, LinearStats] = {}
        self.leader: dict[str, bool] = {}
        self._seen: dict[int, tuple[torch.Tensor, LinearStats]] = {}

    def new_batch(self, b: int) -> None:
        self._seen = {}

    def _hook(self, name: str):
        def fn(module, args, output):
            x = args[0]
            if name not in self.stats:
                entry = self._seen.get(id(x))
                if entry is None or entry[0] is not x:
                    entry = (x, LinearStats(module.in_features, self.want_hessian, self.sample_rows,
                                            want_cross=self.want_cross))
                    self._seen[id(x)] = entry
                    self.leader[name] = True
                else:
                    self.leader[name] = False
                self.stats[name] = entry[1]
            if self.leader[name]:
                self.stats[name].add(x.detach(), dense=self.dense.get(name) if self.want_cross else None)
        return fn

    def attach(self):
        return hooks([m.register_forward_hook(self._hook(n)) for n, m in self.linears.items()])

    def finalize(self) -> dict[str, LinearStats]:
        """The statistics of every Linear; an optional Linear (an expert) that saw fewer than
        ``min_tokens`` tokens is left out and listed in ``starved`` instead."""
        missing = [n for n in self.linears if n not in self.stats and id(self.linears[n]) not in self.optional]
        if missing:
            raise RuntimeError(f"no calibration input reached {missing[0]}")
        for n in self.linears:
            if id(self.linears[n]) in self.optional:
                seen = self.stats[n].ntokens if n in self.stats else 0
                if seen < self.min_tokens:
                    self.starved[n] = seen
                    self.stats.pop(n, None)
        for n in self.linears:  # the same order on every worker: the collectives pair up
            if n in self.stats and self.leader[n]:
                self.stats[n].all_reduce()
        for n, s in self.stats.items():
            s.finalize(n)
        return self.stats


class InputRecorder:
    """Keeps the input each Linear saw in the last forward (by name)."""

    def __init__(self, linears: dict[str, nn.Linear]):
        self.linears = linears
        self.inputs: dict[str, torch.Tensor] = {}

    def _hook(self, name: str):
        def fn(module, args, output):
            self.inputs[name] = args[0].detach()
        return fn

    def attach(self):
        return hooks([m.register_forward_hook(self._hook(n)) for n, m in self.linears.items()])


def run_block_paired(block: nn.Module, inputs: torch.Tensor, dense_inputs: torch.Tensor, kwargs_list: list[dict],
                     batch_size: int, out: torch.Tensor, dense_out: torch.Tensor, collector: StatsCollector,
                     device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
    """The statistics forward of dense-target calibration, batch by batch: the block first runs on
    the dense model's inputs (``dense_out`` gets the dense model's next inputs, and every Linear's
    input is recorded), then on the compressed model's inputs with the ``collector`` attached,
    which pairs each Linear's input with the dense one of the same tokens."""
    recorder = InputRecorder(collector.linears)
    for b in range(len(kwargs_list)):
        sl = slice(b * batch_size, (b + 1) * batch_size)
        with recorder.attach():
            run_block(block, dense_inputs[sl], kwargs_list[b:b + 1], batch_size, out=dense_out[sl],
                      device=device, dtype=dtype)
        collector.dense = recorder.inputs
        with collector.attach():
            run_block(block, inputs[sl], kwargs_list[b:b + 1], batch_size, out=out[sl],
                      on_batch=lambda _, b=b: collector.new_batch(b), device=device, dtype=dtype)
        collector.dense = recorder.inputs = {}


class ErrorProbe:
    """Relative output error of each compressed Linear against its original weight, on the
    inputs it actually sees in the compressed model (the first ``max_batches`` batches).
    The sums stay on the compute device until ``relative`` (one host sync per block)."""

    def __init__(self, linears: dict[str, nn.Linear], originals: dict[str, torch.Tensor], max_batches: int):
        self.linears, self.originals, self.max_batches = linears, originals, max_batches
        self.err: dict[str, torch.Tensor | float] = {n: 0.0 for n in linears}
        self.ref: dict[str, torch.Tensor | float] = {n: 0.0 for n in linears}
        self.batch = 0

    def new_batch(self, b: int) -> None:
        self.batch = b

    def _hook(self, name: str):
        def fn(module, args, output):
            if self.batch >= self.max_batches:
                return
            x = args[0]
            w = self.originals[name]
            y = F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype), module.bias)
            self.err[name] += sum_squares(output - y)
            self.ref[name] += sum_squares(y)
        return fn

    def attach(self):
        return hooks([m.register_forward_hook(self._hook(n)) for n, m in self.linears.items()])

    def relative(self) -> dict[str, float]:
        names = list(self.linears)
        sums = torch.tensor([[float(self.err[n]) for n in names], [float(self.ref[n]) for n in names]],
                            dtype=torch.float64)
        sums = dist.all_reduce_sum(sums)
        return {n: (e / r) ** 0.5 if r > 0 else 0.0 for n, e, r in zip(names, sums[0].tolist(), sums[1].tolist())}
