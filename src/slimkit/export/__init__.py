"""Exports of a slimkit folder: compressed-tensors, PEFT adapters + base, the native packed format, GGUF."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..api import atomic_dir, check_output_dir
from ..calib.device import resolve_device
from ..pack.native import write_native
from ..pack.source import PackError
from .compressed_tensors import write_compressed_tensors
from .info import folder_info
from .peft import write_peft

log = logging.getLogger(__name__)

FORMATS = ("compressed-tensors", "peft", "native", "gguf")


def export(src: str | Path, fmt: str, out: str | Path, *, dense_dtype: str = "auto",
           device: str | torch.device = "cpu") -> Path:
    """Write ``src`` (a slimkit compress output) as ``fmt`` into the new folder ``out``; nothing is
    left behind on failure (built beside ``out`` and renamed at the end).

    ``device`` (``cpu``, ``auto``, ``cuda``, ``cuda:N``) is validated (asking for CUDA where torch
    sees none is a one-line SlimkitError) but every format is written on the CPU whatever it
    says: exporting is I/O bound (read the folder, re-encode codes and masks with elementwise
    integer work, bit-pack, write), and the native format's exactness checks (that a layer's
    codes and adapters reproduce its stored weight bit for bit) would only risk failing under a
    device's different summation order, so nothing is worth moving."""
    resolve_device(device)
    if fmt not in FORMATS:
        raise PackError(f"unknown export format {fmt!r}; known: {', '.join(FORMATS)}")
    src = Path(src).expanduser()
    if not src.is_dir():
        raise PackError(f"{str(src)!r} is not a folder")
    out_path = check_output_dir(out, str(src))
    with atomic_dir(out_path) as tmp:
        if fmt == "compressed-tensors":
            write_compressed_tensors(src, tmp)
        elif fmt == "peft":
            write_peft(src, tmp)
        elif fmt == "gguf":
            from .gguf import write_gguf  # the gguf package is imported only when asked for

            write_gguf(src, tmp)
        else:
            write_native(src, tmp, dense_dtype=dense_dtype)
    log.info("wrote %s (%s)", out_path, fmt)
    return out_path


__all__ = ["FORMATS", "export", "folder_info"]
