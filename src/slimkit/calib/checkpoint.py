"""Per-block checkpoints of a compression run, so that a crashed or killed run resumes.

After block ``i`` is compressed the engine commits, inside ``<dir>``:

- ``block_<i>.safetensors``: the compressed block's parameters, plus the caller's payload for
  that block (e.g. the grids and masks that ``slimkit_state.safetensors`` will hold); a streamed
  model's block is in the output's shard already and is not copied, and a payload that is a file
  already (the output's record shard) is ``payload_<i>.safetensors``, a hard link to it (a copy
  where the file system has no links), digest-checked on resume like the others;
- ``inputs_<i>.safetensors``: the inputs of block ``i + 1`` (the outputs of the compressed
  block ``i``) and the torch RNG state;
- ``progress.json``: the commit point, written last by an atomic rename: the number of finished
  blocks, the per-layer and per-block reports and timings so far.

A kill at any moment leaves either the previous commit or the new one, never a mix: files of
an uncommitted block are ignored and overwritten. ``fingerprint.json`` names what the run
depends on (model files, by content: see files_digest; recipe, calibration tokens, batch size,
versions); resuming against a different fingerprint is refused, naming the fields that differ.
``progress.json`` carries a digest of itself and of the committed block and input files: a
checkpoint edited, truncated or missing a file is refused ("cannot resume: ...") before any work.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import NoReturn

import torch
from safetensors.torch import load_file, save_file

from ..errors import NumericalError, ResumeError, SlimkitError, first_line

log = logging.getLogger(__name__)

PROGRESS = "progress.json"
FINGERPRINT = "fingerprint.json"
PAYLOAD = "payload::"


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


SAMPLE_BYTES = 1 << 16  # file_digest reads SAMPLES chunks of this size (1 MiB a file, whatever its size)
SAMPLES = 16
SAFETENSORS_HEADER_MAX = 100 << 20  # the safetensors library's own limit on a header


def file_digest(path: str | os.PathLike) -> str:
    """A content fingerprint of one file, cheap for any size: sha256 of its size and, for a file
    up to SAMPLES * SAMPLE_BYTES bytes, its whole content; for a larger one, its safetensors header
    (the 8-byte length and the JSON: every tensor's name, dtype, shape and offsets) when it is
    one, and SAMPLES chunks of SAMPLE_BYTES at evenly spread offsets, the first and the last
    included (GGUF, .bin and other files: the chunks only)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(f"{size}\n".encode())
        if size <= SAMPLES * SAMPLE_BYTES:
            h.update(f.read())
            return h.hexdigest()
        head = f.read(8)
        n = int.from_bytes(head, "little")
        if str(path).endswith(".safetensors") and n <= min(SAFETENSORS_HEADER_MAX, size - 8):
            h.update(head + f.read(n))
        for i in range(SAMPLES):
            f.seek(i * (size - SAMPLE_BYTES) // (SAMPLES - 1))
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def files_digest(location: str | os.PathLike) -> str:
    """The files a model was read from: names, sizes, modification times and content (file_digest:
    a file replaced by another of the same size, its time restored, changes it)."""
    p = Path(location)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(p) if p.is_dir() else f.name}\0{st.st_size}\0{st.st_mtime_ns}\0"
                 f"{file_digest(f)}\n".encode())
    return h.hexdigest() if files else str(location)


def _progress_digest(progress: dict) -> str:
    body = {k: v for k, v in progress.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _link(src: Path, dst: Path) -> None:
    """``dst`` the same file as ``src`` (a hard link: no second copy on disk), or a copy where the
    file system has no hard links."""
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def atomic_write(path: Path, write) -> None:
    """``write(tmp)`` a file beside ``path``, then rename it into place: ``path`` is never half
    written, and a hard link to the file it replaces keeps the old content."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


class Checkpoint:
    """Reads and commits the per-block progress of one run in ``directory``."""

    def __init__(self, directory: str | os.PathLike, fingerprint: dict):
        self.dir = Path(directory)
        self.fingerprint = fingerprint
        self.progress: dict = {"done": 0, "layers": [], "blocks": [], "timings": {}}
        self.opened = False

    # ---- opening --------------------------------------------------------------------------
    def open(self, resume: bool) -> int:
        """Start afresh (``resume`` False or nothing to resume) or check the fingerprint and load
        the progress. Returns the number of finished blocks."""
        fp_path = self.dir / FINGERPRINT
        if resume and fp_path.is_file():
            try:
                old = json.loads(fp_path.read_text())
                progress = json.loads((self.dir / PROGRESS).read_text()) if (self.dir / PROGRESS).is_file() else None
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                self._refuse(f"a checkpoint file is unreadable ({first_line(e)})")
            if not isinstance(old, dict):
                self._refuse(f"{FINGERPRINT} is damaged (not a JSON object)")
            differ = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
            if differ:
                raise SlimkitError(f"--resume: the checkpoint in {str(self.dir)!r} belongs to a different run "
                                   f"(differs in: {', '.join(differ)}); delete it or rerun that command")
            if progress is not None:
                self._check_progress(progress)
                self.progress = progress
            self.opened = True
            log.info("resuming after block %d (checkpoint %s)", self.done - 1, self.dir)
            return self.done
        if resume:
            log.info("--resume: no checkpoint in %s, starting from the first block", self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        for f in self.dir.iterdir():
            f.unlink()
        atomic_write(self.dir / FINGERPRINT, lambda p: p.write_text(json.dumps(self.fingerprint, indent=1)))
        self.opened = True
        return 0

    def _refuse(self, what: str) -> NoReturn:
        raise ResumeError(f"cannot resume: {what} (checkpoint {str(self.dir)!r}); delete "
                           f"{str(self.dir.parent)!r} to start afresh") from None

    def _check_progress(self, progress) -> None:
        """Refuse a progress.json that is not as commit wrote it (its digest: any edit, whatever it
        touches), or whose committed files are missing, truncated or changed (their digests)."""
        if not isinstance(progress, dict) or "digest" not in progress:
            self._refuse(f"{PROGRESS} is damaged (no digest)")
        if progress["digest"] != _progress_digest(progress):
            self._refuse(f"{PROGRESS} was edited or is damaged (its digest does not match its content)")
        done, files = progress["done"], progress["files"]  # as commit wrote them: the digest fits
        need = [f"block_{i}.safetensors" for i in range(done)] + ([f"inputs_{done - 1}.safetensors"] if done else []) \
            + [f"payload_{i}.safetensors" for i in range(done) if f"payload_{i}.safetensors" in files]
        for name in need:
            path = self.dir / name
            if not path.is_file():
                self._refuse(f"checkpoint file {name} is missing")
            if name not in files or file_digest(path) != files[name]:
                self._refuse(f"checkpoint file {name} was changed or truncated since it was written")

    def keep_message(self, exc: BaseException) -> str | None:
        """After a failure: None to remove the folder (nothing committed, or NaN/Inf, which a rerun
        would meet again; bad input is refused before the first commit), "" to keep it silently
        (another run's progress, or a damaged checkpoint: refused, the error says what to do), or a
        hint to keep it for --resume (a kill, Ctrl-C, a crash, a failure after the last block)."""
        if not (self.dir / PROGRESS).is_file():
            return None
        if not self.opened:
            return ""
        if isinstance(exc, NumericalError):  # NaN/Inf: resuming would meet it again
            return None
        if isinstance(exc, ResumeError):  # a damaged checkpoint: kept for the user, whom the error tells what to do
            return ""
        return f"progress kept in {self.dir.parent}: rerun the same command with --resume to continue"

    @property
    def done(self) -> int:
        return int(self.progress["done"])

    # ---- committing -----------------------------------------------------------------------
    def commit(self, index: int, block: torch.nn.Module | None, next_inputs: torch.Tensor, *, layers: list[dict],
               block_report: dict, timings: dict, payload: dict[str, torch.Tensor] | Path | None = None,
               payload_meta: dict | None = None, dense_inputs: torch.Tensor | None = None) -> None:
        """``payload``: tensors to keep with the block, or the safetensors file that holds them
        already (a streamed run's record shard in the output), which is linked here, not copied.
        ``dense_inputs``: the dense model's inputs of block ``index + 1`` (dense-target calibration)."""
        assert index == self.done, (index, self.done)
        # a block written elsewhere already (a streamed model's output shard) is not copied here
        tensors = {k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()} if block is not None else {}
        linked = f"payload_{index}.safetensors" if isinstance(payload, Path) else None
        if linked:
            _link(payload, self.dir / linked)
        for k, v in (payload if not linked and payload else {}).items():
            tensors[PAYLOAD + k] = v.detach().cpu().contiguous()
        save_file(tensors, str(self.dir / f"block_{index}.safetensors"))
        state = {"inputs": next_inputs.detach().cpu().contiguous(), "rng": torch.get_rng_state()}
        if next_inputs.device.type == "cuda":  # the compute device's generator too
            state["cuda_rng"] = torch.cuda.get_rng_state(next_inputs.device)
        if dense_inputs is not None:
            state["dense_inputs"] = dense_inputs.detach().cpu().contiguous()
        save_file(state, str(self.dir / f"inputs_{index}.safetensors"))
        self.progress["done"] = index + 1
        self.progress["layers"].extend(layers)
        self.progress["blocks"].append(block_report)
        self.progress["timings"] = dict(timings)
        self.progress.setdefault("payload_meta", []).append(payload_meta or {})
        files = self.progress.setdefault("files", {})
        files.pop(f"inputs_{index - 1}.safetensors", None)
        for name in (f"block_{index}.safetensors", f"inputs_{index}.safetensors", *([linked] if linked else [])):
            files[name] = file_digest(self.dir / name)
        self.progress["digest"] = _progress_digest(self.progress)
        atomic_write(self.dir / PROGRESS, lambda p: p.write_text(json.dumps(self.progress)))
        stale = self.dir / f"inputs_{index - 1}.safetensors"  # superseded by the commit above
        if stale.exists():
            stale.unlink()

    # ---- restoring ------------------------------------------------------------------------
    def restore_block(self, index: int, block: torch.nn.Module | None) -> tuple[dict[str, torch.Tensor], dict]:
        """Load block ``index``'s compressed parameters into ``block`` (None: it was not kept
        here); return its payload."""
        tensors = self._load(self.dir / f"block_{index}.safetensors")
        payload = {k[len(PAYLOAD):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(PAYLOAD)]}
        if f"payload_{index}.safetensors" in self.progress.get("files", {}):  # linked, not copied
            payload = self._load(self.dir / f"payload_{index}.safetensors")
        meta = self.progress.get("payload_meta", [{}] * self.done)[index]
        if block is None:
            return payload, meta
        missing, unexpected = block.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            self._refuse(f"block {index} of the checkpoint does not fit the model "
                         f"(missing {missing[:2]}, unexpected {unexpected[:2]})")
        return payload, self.progress.get("payload_meta", [{}] * self.done)[index]

    def restore_inputs(self, device: torch.device | None = None) -> torch.Tensor:
        """The inputs of the first unfinished block; also restores the RNG state (of the CPU, and
        of ``device`` when it is the CUDA device the run was checkpointed on)."""
        tensors = self._load(self.dir / f"inputs_{self.done - 1}.safetensors")
        if "rng" not in tensors or "inputs" not in tensors:
            self._refuse(f"checkpoint file inputs_{self.done - 1}.safetensors lacks the inputs or the RNG state")
        torch.set_rng_state(tensors["rng"])
        if "cuda_rng" in tensors and device is not None and device.type == "cuda":
            torch.cuda.set_rng_state(tensors["cuda_rng"], device)
        return tensors["inputs"]

    def restore_dense_inputs(self) -> torch.Tensor:
        """The dense model's inputs of the first unfinished block (dense-target calibration)."""
        tensors = self._load(self.dir / f"inputs_{self.done - 1}.safetensors")
        if "dense_inputs" not in tensors:
            self._refuse(f"checkpoint file inputs_{self.done - 1}.safetensors lacks the dense model's inputs")
        return tensors["dense_inputs"]

    def _load(self, path: Path) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(path))
        except Exception as e:  # a truncated file: the run cannot continue from here
            self._refuse(f"checkpoint file {path.name} is unreadable ({first_line(e)})")

    def remove(self) -> None:
        if self.dir.is_dir():
            if (self.dir / PROGRESS).exists():
                (self.dir / PROGRESS).unlink()  # first: a kill in the middle leaves no commit to trust
            for f in self.dir.iterdir():
                f.unlink()
            self.dir.rmdir()
