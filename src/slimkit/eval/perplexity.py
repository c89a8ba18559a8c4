"""Perplexity over non-overlapping windows, and KL divergence to a reference (dense) model.

KL is KL(p || q), p the reference's next-token distribution and q the model's, summed over the
vocabulary and averaged over every predicted token. It is computed exactly, in one of two ways:

- **head moment** (used whenever the model's logits are its output head applied to its last
  hidden state, z = W h + b, with nothing after it; true of every family slimkit compresses
  except those with logit soft-capping or scaling). Then

      sum_i p_i log q_i = h . (W^T p) + p . b - logsumexp(z),

  so the reference needs per predicted token only m = W^T p (the hidden size d, not the
  vocabulary V), one constant and log p(target) for its own perplexity: d + 2 numbers instead
  of V (``DenseReference`` says how the constant is formed so that fp32 rounding does not
  cancel the KL away). The reference pass runs first with the reference model
  alone (``dense_reference``); the model's pass then reads that summary. The two models are never
  in memory together, and the memory is a few (batch x seqlen x V) buffers whatever the number of
  tokens. ``W`` and ``b`` are the *evaluated* model's head (in slimkit's output the head is the
  dense one, untouched), so the identity is exact: only floating-point rounding differs from the
  full sum (below 1e-4 relative, tested). The summary can be kept on disk (``ReferenceCache``),
  about d/V of the full log-probabilities.
- **paired** (any other model): both models run on each batch and the KL is summed over the
  vocabulary; both are in memory for the duration.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import SlimkitError

log = logging.getLogger(__name__)

HEAD_MOMENT = "head moment: sum p log p - h.(W^T p) - p.b + logsumexp(W h + b), dense and compressed never in memory together"
PAIRED = "paired: both models on each batch, summed over the vocabulary"
ROUNDING = "exact identity: floating-point rounding only (tested below 1e-4 relative of the full-vocabulary sum)"
_VOCAB_CHUNK = 8192  # vocabulary entries per step of the fp64 / widened sums


@dataclass
class EvalResult:
    ppl: float
    nll: float  # mean negative log-likelihood, nats/token
    tokens: int  # predicted tokens
    windows: int
    seqlen: int
    kl: float | None = None  # mean KL(reference || model), nats/token
    ref_ppl: float | None = None
    kl_method: str | None = None
    kl_error_bound: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _input_device(model) -> torch.device:
    """Where the model reads its token ids (its embedding's device)."""
    try:
        return model.get_input_embeddings().weight.device
    except AttributeError:
        return torch.device("cpu")


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # (B, S-1, V)


def _logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(_logits(model, ids), dim=-1)


# ---- the evaluated model's head ----------------------------------------------------------------

@dataclass
class LinearHead:
    """The output head of a model whose logits are exactly ``weight @ h + bias``."""
    weight: torch.Tensor  # (V, d), as the model holds it
    bias: torch.Tensor | None

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden(self) -> int:
        return self.weight.shape[1]

    def digest(self) -> str:
        """Of the values in fp32 (exact for bf16/fp16), so that a head onloaded in another compute
        dtype has the digest of its stored form."""
        h = hashlib.sha256()
        for t in (self.weight, self.bias):
            if t is not None:
                t = t.detach()
                h.update(f"{tuple(t.shape)}".encode())
                for s in range(0, t.shape[0], _VOCAB_CHUNK):
                    h.update(t[s:s + _VOCAB_CHUNK].float().contiguous().cpu().numpy().tobytes())
        return h.hexdigest()

    def detached(self) -> "LinearHead":
        """A copy that does not keep the model alive (for evaluating a model loaded later)."""
        return LinearHead(self.weight.detach().clone(), None if self.bias is None else self.bias.detach().clone())


class _HeadTap:
    """Records the input and output of a model's output head during a forward."""

    def __init__(self, head: nn.Module):
        self.h = self.z = None
        self._handle = head.register_forward_hook(self._hook)

    def _hook(self, mod, args, out):
        self.h, self.z = args[0], out

    def remove(self) -> None:
        self._handle.remove()
        self.h = self.z = None


def linear_head(model, placement=None) -> LinearHead | None:
    """The model's head when its logits are exactly that nn.Linear applied to the last hidden
    state (checked on a two-token forward on ``placement``: soft-capping, logit scales or a
    quantized head give None)."""
    if placement is not None:
        from ..calib.device import placed

        with placed(placement, model):
            return linear_head(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.weight.device.type == "meta":
        return None
    tap = _HeadTap(head)
    try:
        with torch.no_grad():
            vocab = head.weight.shape[0]  # tokens other than 0 (often padding, with a zero embedding)
            ids = torch.tensor([[1 % vocab, 2 % vocab, 3 % vocab]], device=_input_device(model))
            logits = model(input_ids=ids, use_cache=False).logits
        ok = tap.z is not None and logits.shape == tap.z.shape and torch.equal(logits, tap.z)
    finally:
        tap.remove()
    return LinearHead(head.weight, head.bias) if ok else None


# ---- the reference summary ---------------------------------------------------------------------

@dataclass
class DenseReference:
    """Per predicted token of the evaluation windows (flattened, window by window), what the
    head-moment KL of a model with output head ``head`` (by digest) needs of the reference's
    distribution p: KL = const - h . moment + logsumexp(z), h and z the model's head input and
    logits. Two forms of the same identity:

    - centred (the reference's logits are the same head applied to its own last hidden state
      h_d: slimkit's compressed model against its dense input): moment = W^T p in fp32 and
      const = h_d . moment - logsumexp(z_d) in fp64, so that const - h . moment is computed as
      (h_d - h) . moment and the fp32 rounding of the moment is multiplied by a small vector;
    - general (any reference): moment = W^T p and const = sum_i p_i log p_i - p . b, both
      accumulated and kept in fp64 (h . moment nearly cancels logsumexp(z))."""
    target_lp: torch.Tensor  # (T,) float64: log p(next token)
    const: torch.Tensor  # (T,) float64
    moment: torch.Tensor  # (T, d): W^T p (fp32 centred, fp64 general)
    head_digest: str
    vocab: int
    form: str  # "centred" | "general"
    key: str = ""
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.target_lp.numel()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.target_lp, self.const, self.moment))

    def with_head_map(self, M: torch.Tensor, head_digest: str) -> "DenseReference":
        """The same reference for a model whose head is W M (a rotation fused into the head and the
        stream before it, methods.rotate): the moment W^T p becomes M^T W^T p, kept in fp64 so that the
        product adds no rounding to the identity; the constant is unchanged."""
        M = M.to(self.moment.device, torch.float64)
        moment = torch.empty(self.moment.shape, dtype=torch.float64, device=self.moment.device)
        for s in range(0, moment.shape[0], _VOCAB_CHUNK):
            moment[s:s + _VOCAB_CHUNK] = self.moment[s:s + _VOCAB_CHUNK].double() @ M
        return dataclasses.replace(self, moment=moment, head_digest=head_digest)


def _general_products(p: torch.Tensor, lp: torch.Tensor, head: LinearHead) -> tuple[torch.Tensor, torch.Tensor]:
    """For probabilities p and log-probabilities lp (.., V) in fp32: W^T p (.., d) and
    sum_i p_i log p_i - p . b (..), accumulated in fp64 a chunk of the vocabulary at a time."""
    w, b = head.weight, head.bias
    m = torch.zeros(*p.shape[:-1], w.shape[1], dtype=torch.float64, device=p.device)
    const = torch.zeros(p.shape[:-1], dtype=torch.float64, device=p.device)
    for s in range(0, w.shape[0], _VOCAB_CHUNK):
        pc = p[..., s:s + _VOCAB_CHUNK].double()
        m += pc @ w[s:s + _VOCAB_CHUNK].double()
        const += _rowdot(pc, lp[..., s:s + _VOCAB_CHUNK].double())
        if b is not None:
            const -= pc @ b[s:s + _VOCAB_CHUNK].double()
    return m, const


def _moment32(p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """W^T p in fp32 (never multiplied in a narrower dtype: fp32 rows a chunk at a time)."""
    if w.dtype == torch.float32:
        return p @ w
    m = torch.zeros(*p.shape[:-1], w.shape[1], dtype=torch.float32, device=p.device)
    for s in range(0, w.shape[0], _VOCAB_CHUNK):
        m += p[..., s:s + _VOCAB_CHUNK] @ w[s:s + _VOCAB_CHUNK].float()
    return m


def _lse64(z: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim of fp32 logits, summed in fp64 a chunk of the vocabulary at a time."""
    top = z.amax(-1, keepdim=True).double()
    acc = torch.zeros(z.shape[:-1], dtype=torch.float64, device=z.device)
    for s in range(0, z.shape[-1], _VOCAB_CHUNK):
        acc += (z[..., s:s + _VOCAB_CHUNK].double() - top).exp_().sum(-1)
    return acc.log_() + top[..., 0]


def _logits32(h: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """The head's logits for inputs ``h`` (.., d) in fp32, a chunk of the vocabulary at a time: what
    the head-moment identity needs when the model computes (and rounds) its logits in bf16/fp16."""
    w, b = head.weight, head.bias
    h = h.float()
    out = torch.empty(*h.shape[:-1], w.shape[0], dtype=torch.float32, device=h.device)
    for s in range(0, w.shape[0], _VOCAB_CHUNK):
        out[..., s:s + _VOCAB_CHUNK] = F.linear(h, w[s:s + _VOCAB_CHUNK].float(),
                                                None if b is None else b[s:s + _VOCAB_CHUNK].float())
    return out


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum over the last dim of a * b, without a temporary of a's size."""
    return (a.unsqueeze(-2) @ b.unsqueeze(-1))[..., 0, 0]


def dense_reference(reference, windows: torch.Tensor, head: LinearHead, *, batch_size: int = 1,
                    progress: bool = True, placement=None, key: str = "") -> DenseReference:
    """Run ``reference`` (a model) over ``windows`` and summarise its next-token distributions for
    the head-moment KL of a model whose output head is ``head``."""
    import time

    if placement is not None:
        from ..calib.device import placed

        with placed(placement, reference):
            return dense_reference(reference, windows, head, batch_size=batch_size, progress=progress, key=key)
    t0 = time.perf_counter()
    own = linear_head(reference)
    centred = own is not None and own.vocab == head.vocab and own.digest() == head.digest()
    n, S = windows.shape
    T = n * (S - 1)
    tlp = torch.empty(T, dtype=torch.float64)
    const = torch.empty(T, dtype=torch.float64)
    moment = torch.empty(T, head.hidden, dtype=torch.float32 if centred else torch.float64)
    on_device = None  # the head where the reference's log-probabilities are, moved once
    tap = _HeadTap(reference.get_output_embeddings()) if centred else None
    try:
        for s in tqdm(range(0, n, batch_size), desc="eval (dense reference)", unit="batch", disable=not progress):
            ids = windows[s:s + batch_size].to(_input_device(reference))
            z = _logits(reference, ids)  # (B, S-1, V)
            if centred and tap.z.dtype != torch.float32:  # computed narrower: the exact fp32 logits of h
                z = _logits32(tap.h[:, :-1], reference.get_output_embeddings())
            if z.shape[-1] != head.vocab:
                raise SlimkitError(f"the reference has a vocabulary of {z.shape[-1]} tokens and the model "
                                   f"{head.vocab}: KL needs the same vocabulary")
            tgt = ids[:, 1:]
            a, b = s * (S - 1), (s + ids.shape[0]) * (S - 1)
            lse = _lse64(z)
            tlp[a:b] = (z.gather(-1, tgt[..., None])[..., 0].double() - lse).reshape(-1).cpu()
            lp = z.sub_(lse.float()[..., None])  # in place: log p
            p = lp.exp()
            if on_device is None:
                on_device = head if head.weight.device == p.device else \
                    LinearHead(head.weight.to(p.device), None if head.bias is None else head.bias.to(p.device))
            if centred:
                m = _moment32(p, on_device.weight)
                c = _rowdot(tap.h[:, :-1].double(), m.double()) - lse
            else:
                m, c = _general_products(p, lp, on_device)
            moment[a:b] = m.reshape(-1, head.hidden).cpu()
            const[a:b] = c.reshape(-1).cpu()
            del z, lp, p, m
    finally:
        if tap is not None:
            tap.remove()
    return DenseReference(tlp, const, moment, head.digest(), head.vocab, "centred" if centred else "general",
                          key=key, seconds=time.perf_counter() - t0)


class ReferenceCache:
    """A dense reference kept on disk in ``directory``, one versioned safetensors file per key
    (the windows and the reference model), checked on reading: a truncated, foreign or
    mismatched file is refused with one line."""

    FORMAT = "slimkit-dense-reference"
    VERSION = "2"

    def __init__(self, directory: str | Path, key: str):
        self.directory = Path(directory)
        self.key = key
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        self.path = self.directory / f"ref-{digest}.v{self.VERSION}.safetensors"

    def check_location(self) -> None:
        if self.directory.exists() and not self.directory.is_dir():
            raise SlimkitError(f"--reference-cache {str(self.directory)!r} is a file, not a folder")

    def ready(self) -> bool:
        return self.path.is_file()

    def load(self, head: LinearHead, tokens: int) -> DenseReference:
        from safetensors import safe_open

        bad = f"reference cache {str(self.path)!r}"
        try:
            with safe_open(str(self.path), "pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != self.FORMAT or meta.get("version") != self.VERSION:
                    raise SlimkitError(f"{bad} is not a slimkit dense reference of version {self.VERSION}: delete it")
                t = {k: f.get_tensor(k) for k in ("target_lp", "const", "moment")}
        except SlimkitError:
            raise
        except Exception as e:  # safetensors' own errors: truncated or not a safetensors file
            raise SlimkitError(f"{bad} is unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'truncated?'}): "
                               "delete it") from None
        if meta.get("key") != self.key:
            raise SlimkitError(f"{bad} belongs to other windows or another reference model: delete it")
        if meta.get("head") != head.digest():
            raise SlimkitError(f"{bad} was made for a model with another output head: delete it")
        shapes = {k: tuple(v.shape) for k, v in t.items()}
        want = {"target_lp": (tokens,), "const": (tokens,), "moment": (tokens, head.hidden)}
        if shapes != want:
            raise SlimkitError(f"{bad} holds {shapes}, expected {want}: delete it")
        return DenseReference(t["target_lp"], t["const"], t["moment"], meta["head"], int(meta["vocab"]),
                              meta.get("form", "general"), key=self.key, meta={"cache": str(self.path)})

    def save(self, ref: DenseReference) -> None:
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        try:
            save_file({"target_lp": ref.target_lp, "const": ref.const, "moment": ref.moment.contiguous()}, str(tmp),
                      metadata={"format": self.FORMAT, "version": self.VERSION, "key": self.key,
                                "head": ref.head_digest, "vocab": str(ref.vocab), "form": ref.form})
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)


def windows_key(windows: torch.Tensor, reference_id: str) -> str:
    return reference_id + ":" + hashlib.sha256(windows.numpy().tobytes()).hexdigest()


def reference_summary(reference_loader, windows: torch.Tensor, head: LinearHead, *, cache: ReferenceCache | None = None,
                      progress: bool = True, placement=None) -> DenseReference:
    """The dense reference for ``head`` from ``cache`` when it holds it, else computed with the
    model ``reference_loader()`` returns (and written to ``cache``)."""
    T = windows.shape[0] * (windows.shape[1] - 1)
    if cache is not None:
        cache.check_location()
        if cache.ready():
            ref = cache.load(head, T)
            log.info("dense reference read from %s", cache.path)
            return ref
    reference = reference_loader()
    ref = dense_reference(reference, windows, head, progress=progress, placement=placement,
                          key=cache.key if cache else "")
    if cache is not None:
        cache.save(ref)
        ref.meta["cache"] = str(cache.path)
    return ref


# ---- evaluation --------------------------------------------------------------------------------

def evaluate(model, windows: torch.Tensor, reference=None, *, batch_size: int = 1, progress: bool = True,
             desc: str = "eval", placement=None) -> EvalResult:
    """Perplexity of ``model`` on ``windows`` (n, S), and KL to ``reference`` when given: a model
    (paired) or a ``DenseReference`` (head moment; the model's head must be the one it was made
    for). ``placement`` (calib.device.Placement) says where and in which dtype the models compute
    (default: where they are)."""
    if placement is not None:
        from ..calib.device import placed

        models = (model,) if isinstance(reference, DenseReference) else (model, reference)
        with placed(placement, *models):
            return evaluate(model, windows, reference, batch_size=batch_size, progress=progress, desc=desc)
    n, S = windows.shape
    summary = reference if isinstance(reference, DenseReference) else None
    tap = None
    if summary is not None:
        head = linear_head(model)
        if head is None or head.digest() != summary.head_digest:
            raise SlimkitError("the dense reference was made for another output head than this model's")
        if summary.tokens != n * (S - 1):
            raise SlimkitError(f"the dense reference covers {summary.tokens} tokens, the windows {n * (S - 1)}")
        tap = _HeadTap(model.get_output_embeddings())
    nll_sum = ref_nll_sum = kl_sum = 0.0
    count = 0
    try:
        for s in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress):
            ids = windows[s:s + batch_size].to(_input_device(model))
            tgt = ids[:, 1:]
            if summary is None:
                lp = _logprobs(model, ids)  # (B, S-1, V)
                nll_sum += -lp.gather(-1, tgt[..., None]).sum().item()
                if reference is not None:
                    ref = _logprobs(reference, ids.to(_input_device(reference))).to(lp.device)
                    if ref.shape != lp.shape:
                        raise SlimkitError(f"the reference has a vocabulary of {ref.shape[-1]} tokens and the "
                                           f"model {lp.shape[-1]}: KL needs the same vocabulary")
                    ref_nll_sum += -ref.gather(-1, tgt[..., None]).sum().item()
                    kl_sum += (ref.exp() * (ref - lp)).sum().item()
            else:
                z = _logits(model, ids)  # (B, S-1, V)
                if tap.z.dtype != torch.float32:  # computed narrower: the exact fp32 logits of its input
                    z = _logits32(tap.h[:, :-1], model.get_output_embeddings())
                lse = _lse64(z)
                nll_sum += (lse - z.gather(-1, tgt[..., None])[..., 0].double()).sum().item()
                del z
                h = tap.h[:, :-1].double()  # (B, S-1, d): the head's input
                a, b = s * (S - 1), (s + ids.shape[0]) * (S - 1)
                m = summary.moment[a:b].to(h.device, torch.float64).reshape(h.shape)
                const = summary.const[a:b].to(h.device).reshape(lse.shape)
                kl_sum += (const - _rowdot(h, m) + lse).sum().item()
                ref_nll_sum += -summary.target_lp[a:b].sum().item()
            count += tgt.numel()
    finally:
        if tap is not None:
            tap.remove()
    nll = nll_sum / count
    res = EvalResult(ppl=math.exp(nll), nll=nll, tokens=count, windows=n, seqlen=S)
    if reference is not None:
        res.kl = max(kl_sum / count, 0.0)  # >= 0; a model against itself can round to -1e-8
        res.ref_ppl = math.exp(ref_nll_sum / count)
        res.kl_method = HEAD_MOMENT if summary is not None else PAIRED
        res.kl_error_bound = ROUNDING
    return res
