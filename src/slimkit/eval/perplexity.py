"""Perplexity over non-overlapping windows, and KL divergence to a reference (dense) model.

KL is KL(p_ref || p_model) of the next-token distributions, averaged over every
predicted token. The reference's log-probabilities can be cached on disk (a
float32 .npy memory map keyed by the windows and the reference's location), so
that a benchmark evaluating many compressed variants runs the dense model once.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    ppl: float
    nll: float  # mean negative log-likelihood, nats/token
    tokens: int  # predicted tokens
    windows: int
    seqlen: int
    kl: float | None = None  # mean KL(reference || model), nats/token
    ref_ppl: float | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # (B, S-1, V)
    return F.log_softmax(logits, dim=-1)


def _input_device(model) -> torch.device:
    """Where the model reads its token ids (its embedding's device)."""
    try:
        return model.get_input_embeddings().weight.device
    except AttributeError:
        return torch.device("cpu")


class ReferenceCache:
    """Dense log-probabilities of the eval windows, computed once and memory-mapped."""

    def __init__(self, directory: str | Path, key: str):
        self.path = Path(directory) / f"ref-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"
        self.arr = None

    def ready(self) -> bool:
        return self.path.is_file()

    def open(self, shape) -> None:
        if self.ready():
            self.arr = np.load(self.path, mmap_mode="r")
            if tuple(self.arr.shape) != tuple(shape):
                raise RuntimeError(f"reference cache {self.path} has shape {self.arr.shape}, expected {shape}")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = self.path.with_suffix(f".tmp{os.getpid()}.npy")
            self.arr = np.lib.format.open_memmap(self._tmp, mode="w+", dtype=np.float32, shape=tuple(shape))

    def close(self, complete: bool) -> None:
        if self.arr is not None and not self.ready():
            self.arr.flush()
            del self.arr
            if complete:
                os.replace(self._tmp, self.path)
            else:
                os.unlink(self._tmp)
        self.arr = None


def windows_key(windows: torch.Tensor, reference_id: str) -> str:
    return reference_id + ":" + hashlib.sha256(windows.numpy().tobytes()).hexdigest()


def evaluate(model, windows: torch.Tensor, reference=None, *, cache: ReferenceCache | None = None,
             batch_size: int = 1, progress: bool = True, desc: str = "eval", placement=None) -> EvalResult:
    """Perplexity of ``model`` on ``windows`` (n, S); KL to ``reference`` (a model) when given.
    With ``cache``, the reference's log-probs are read from it (or written to it on first use),
    and ``reference`` may be None once the cache is ready. ``placement`` (calib.device.Placement)
    says where and in which dtype the models compute (default: where they are)."""
    if placement is not None:
        from ..calib.device import placed

        with placed(placement, model, reference):
            return evaluate(model, windows, reference, cache=cache, batch_size=batch_size,
                            progress=progress, desc=desc)
    n, S = windows.shape
    V = None
    nll_sum = ref_nll_sum = kl_sum = 0.0
    count = 0
    use_ref = reference is not None or (cache is not None and cache.ready())
    opened = False
    complete = False
    try:
        for s in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress):
            ids = windows[s:s + batch_size].to(_input_device(model))
            lp = _logprobs(model, ids)  # (B, S-1, V)
            V = lp.shape[-1]
            tgt = ids[:, 1:]
            nll_sum += -lp.gather(-1, tgt[..., None]).sum().item()
            count += tgt.numel()
            if use_ref:
                if cache is not None and not opened:
                    cache.open((n, S - 1, V))
                    opened = True
                if cache is not None and cache.ready():
                    ref = torch.from_numpy(np.array(cache.arr[s:s + batch_size])).to(lp.device)  # a copy: read-only memmap
                else:
                    ref = _logprobs(reference, ids.to(_input_device(reference))).to(lp.device)
                    if cache is not None:
                        cache.arr[s:s + batch_size] = ref.cpu().numpy()
                ref_nll_sum += -ref.gather(-1, tgt[..., None]).sum().item()
                kl_sum += (ref.exp() * (ref - lp)).sum().item()
        complete = True
    finally:
        if cache is not None and opened:
            cache.close(complete)
    nll = nll_sum / count
    res = EvalResult(ppl=math.exp(nll), nll=nll, tokens=count, windows=n, seqlen=S)
    if use_ref:
        res.kl = kl_sum / count
        res.ref_ppl = math.exp(ref_nll_sum / count)
    return res
