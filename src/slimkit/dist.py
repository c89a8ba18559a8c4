"""Calibration split across workers with torch.distributed (launched by ``torchrun``).

Every worker loads the model and the same calibration windows, keeps a contiguous share of
them (worker r of w takes windows [r n / w, (r + 1) n / w)), runs its share through each block
and all-reduces the statistics (sums of squared activations, Hessian sums, token counts) before
the stages run, so every worker compresses from the statistics of the whole calibration set.
Worker 0's compressed weights are broadcast so all workers feed the next block the same model.
Only worker 0 writes the output and evaluates. Backend: gloo on CPU, nccl when CUDA is there.
"""
from __future__ import annotations

import atexit
import datetime
import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def launched() -> bool:
    """True under torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup() -> None:
    """Join the process group torchrun describes (idempotent; nothing to do in a single process)."""
    if not launched() or dist.is_initialized():
        return
    # the engine computes on the CPU: gloo carries CPU tensors; nccl joins for CUDA tensors when present
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    # compression of a block can take long on one worker while the others wait in a collective
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=6))
    # leave the group before the interpreter exits: a gloo group torn down by exit aborts the
    # process ("terminate called without an active exception", SIGABRT) now and then
    atexit.register(_leave)
    log.info("worker %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def shard(n: int) -> slice:
    """This worker's contiguous share of ``n`` calibration windows."""
    r, w = rank(), world_size()
    return slice(r * n // w, (r + 1) * n // w)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over workers (identity in a single process)."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    if active():
        dist.broadcast(t, src=src)
    return t


def gather_rows(t: torch.Tensor, limit: int) -> torch.Tensor:
    """The rows of every worker's ``t`` in worker order, the first ``limit`` of them."""
    if not active():
        return t[:limit]
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, t)
    return torch.cat(parts)[:limit]


def any_true(flag: bool) -> bool:
    """True on every worker if ``flag`` is true on any (so that all raise together)."""
    return bool(all_reduce_sum(torch.tensor([float(flag)]))[0] > 0)


def barrier() -> None:
    if active():
        dist.barrier()
