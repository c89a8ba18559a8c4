"""Per-block checkpoints of a compression run, so that a crashed or killed run resumes.

After block ``i`` is compressed the engine commits, inside ``<dir>``:

- ``block_<i>.safetensors``: the compressed block's parameters, plus the caller's payload for
  that block (e.g. the grids and masks that ``slimkit_state.safetensors`` will hold);
- ``inputs_<i>.safetensors``: the inputs of block ``i + 1`` (the outputs of the compressed
  block ``i``) and the torch RNG state;
- ``progress.json``: the commit point, written last by an atomic rename: the number of finished
  blocks, the per-layer and per-block reports and timings so far.

A kill at any moment leaves either the previous commit or the new one, never a mix: files of
an uncommitted block are ignored and overwritten. ``fingerprint.json`` names what the run
depends on (model files, recipe, calibration tokens, batch size, versions); resuming against a
different fingerprint is refused, naming the fields that differ.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import NumericalError, SlimkitError, first_line

log = logging.getLogger(__name__)

PROGRESS = "progress.json"
FINGERPRINT = "fingerprint.json"
PAYLOAD = "payload::"


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def files_digest(location: str | os.PathLike) -> str:
    """Names, sizes and modification times of the files a model was read from (cheap, and it
    changes whenever a weight file is rewritten)."""
    p = Path(location)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(p) if p.is_dir() else f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest() if files else str(location)


def _atomic_write(path: Path, write) -> None:
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
            except (OSError, json.JSONDecodeError) as e:
                raise SlimkitError(f"--resume: the checkpoint in {str(self.dir)!r} is unreadable ({e})") from None
            differ = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
            if differ:
                raise SlimkitError(f"--resume: the checkpoint in {str(self.dir)!r} belongs to a different run "
                                   f"(differs in: {', '.join(differ)}); delete it or rerun that command")
            if progress is not None:
                self.progress = progress
            self.opened = True
            log.info("resuming after block %d (checkpoint %s)", self.done - 1, self.dir)
            return self.done
        if resume:
            log.info("--resume: no checkpoint in %s, starting from the first block", self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        for f in self.dir.iterdir():
            f.unlink()
        _atomic_write(self.dir / FINGERPRINT, lambda p: p.write_text(json.dumps(self.fingerprint, indent=1)))
        self.opened = True
        return 0

    def keep_message(self, exc: BaseException) -> str | None:
        """After a failure: None to remove the folder (nothing committed, or NaN/Inf, which a rerun
        would meet again; bad input is refused before the first commit), "" to keep it silently
        (another run's progress, refused), or a hint to keep it for --resume (a kill, Ctrl-C, a
        crash, an unreadable checkpoint file, a failure after the last block)."""
        if not (self.dir / PROGRESS).is_file():
            return None
        if not self.opened:
            return ""
        if isinstance(exc, NumericalError):  # NaN/Inf: resuming would meet it again
            return None
        return f"progress kept in {self.dir.parent}: rerun the same command with --resume to continue"

    @property
    def done(self) -> int:
        return int(self.progress["done"])

    # ---- committing -----------------------------------------------------------------------
    def commit(self, index: int, block: torch.nn.Module | None, next_inputs: torch.Tensor, *, layers: list[dict],
               block_report: dict, timings: dict, payload: dict[str, torch.Tensor] | None = None,
               payload_meta: dict | None = None) -> None:
        assert index == self.done, (index, self.done)
        # a block written elsewhere already (a streamed model's output shard) is not copied here
        tensors = {k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()} if block is not None else {}
        for k, v in (payload or {}).items():
            tensors[PAYLOAD + k] = v.detach().cpu().contiguous()
        save_file(tensors, str(self.dir / f"block_{index}.safetensors"))
        state = {"inputs": next_inputs.detach().cpu().contiguous(), "rng": torch.get_rng_state()}
        if next_inputs.device.type == "cuda":  # the compute device's generator too
            state["cuda_rng"] = torch.cuda.get_rng_state(next_inputs.device)
        save_file(state, str(self.dir / f"inputs_{index}.safetensors"))
        self.progress["done"] = index + 1
        self.progress["layers"].extend(layers)
        self.progress["blocks"].append(block_report)
        self.progress["timings"] = dict(timings)
        self.progress.setdefault("payload_meta", []).append(payload_meta or {})
        _atomic_write(self.dir / PROGRESS, lambda p: p.write_text(json.dumps(self.progress)))
        stale = self.dir / f"inputs_{index - 1}.safetensors"  # superseded by the commit above
        if stale.exists():
            stale.unlink()

    # ---- restoring ------------------------------------------------------------------------
    def restore_block(self, index: int, block: torch.nn.Module | None) -> tuple[dict[str, torch.Tensor], dict]:
        """Load block ``index``'s compressed parameters into ``block`` (None: it was not kept
        here); return its payload."""
        tensors = self._load(self.dir / f"block_{index}.safetensors")
        payload = {k[len(PAYLOAD):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(PAYLOAD)]}
        meta = self.progress.get("payload_meta", [{}] * self.done)[index]
        if block is None:
            return payload, meta
        missing, unexpected = block.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise SlimkitError(f"--resume: block {index} of the checkpoint does not fit the model "
                               f"(missing {missing[:2]}, unexpected {unexpected[:2]})")
        return payload, self.progress.get("payload_meta", [{}] * self.done)[index]

    def restore_inputs(self, device: torch.device | None = None) -> torch.Tensor:
        """The inputs of the first unfinished block; also restores the RNG state (of the CPU, and
        of ``device`` when it is the CUDA device the run was checkpointed on)."""
        tensors = self._load(self.dir / f"inputs_{self.done - 1}.safetensors")
        torch.set_rng_state(tensors["rng"])
        if "cuda_rng" in tensors and device is not None and device.type == "cuda":
            torch.cuda.set_rng_state(tensors["cuda_rng"], device)
        return tensors["inputs"]

    def _load(self, path: Path) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(path))
        except Exception as e:  # a truncated file: the run cannot continue from here
            raise SlimkitError(f"--resume: checkpoint file {str(path)!r} is unreadable ({first_line(e)})") from None

    def remove(self) -> None:
        if self.dir.is_dir():
            if (self.dir / PROGRESS).exists():
                (self.dir / PROGRESS).unlink()  # first: a kill in the middle leaves no commit to trust
            for f in self.dir.iterdir():
                f.unlink()
            self.dir.rmdir()
