"""One .gguf file that llama.cpp loads, from a folder compressed with a GGUF recipe
(``rtn_gguf`` / ``gptq_gguf``).

The Linears slimkit compressed are written block for block from the bytes it chose
(``gguf_blocks``: no re-rounding; llama.cpp's row permutation of q/k for the llama family is a
permutation of whole rows, so of whole rows of blocks). Everything else is what llama-quantize
would make of llama.cpp's own conversion: architecture metadata and tokenizer as its converter
writes them (export.gguf_meta), 1-D tensors in F32, and the 2-D tensors slimkit did not
compress (the token embedding, an untied output head, Linears a recipe ignored) rounded to
nearest into the type llama-quantize gives them in the same file type.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..errors import RecipeError
from ..ops.gguf import TYPES, category_of, dequantize_data, encode_rtn, llama_type
from ..pack.source import LayerRecord, PackError, SlimkitFolder
from .gguf_meta import check_supported, new_writer, tensor_plan

log = logging.getLogger(__name__)

GGUF_FILE = "model.gguf"


def _file_type(ftype: str):
    import gguf

    return gguf.LlamaFileType[f"MOSTLY_{ftype}"]


def _file_settings(records: list[LayerRecord], src) -> tuple[str, bool, bool]:
    settings = {(r.meta["gguf"]["ftype"], bool(r.meta["gguf"].get("pure", False)),
                 bool(r.meta["gguf"].get("imatrix", False))) for r in records if r.form.name == "gguf"}
    if not settings:
        raise PackError(f"{str(src)!r} holds no GGUF-encoded layers; compress with a GGUF recipe "
                        "(e.g. --recipe gptq-gguf-q4_k_m) to export --format gguf")
    if len(settings) > 1:
        raise PackError(f"{str(src)!r} mixes llama.cpp file types {sorted(settings)}; a GGUF file has one")
    return settings.pop()


def _check_blocks(rec: LayerRecord) -> None:
    """The recorded blocks must be the model's weight (rounded to the checkpoint's dtype): a
    folder edited after compression, or blocks another stage overwrote, are refused."""
    t = TYPES[rec.meta["gguf"]["type"]]
    values = dequantize_data(rec.tensors["gguf_blocks"], t, rec.shape[1])
    if not torch.equal(values.to(rec.effective.dtype), rec.effective):
        raise PackError(f"{rec.name}: its recorded GGUF {t.name} blocks do not reproduce the model's weight")


def write_gguf(src: str | Path, out: Path) -> dict:
    """Write ``out/model.gguf``; -> a summary {file, ftype, tensors by type}. Every check (what
    the layers hold, family, tokenizer, a type for every tensor) runs before the file is opened."""
    folder = SlimkitFolder(src)
    config = folder.config
    records = {r.name: r for r in folder.records()}
    for r in records.values():
        r.require_form(("gguf", "dense"), "a GGUF file",
                       "compress with a GGUF recipe (e.g. gptq-gguf-q4_k_m) to write GGUF without re-rounding")
        if r.has_adapters:
            raise PackError(f"{r.name} has low-rank adapters, which a GGUF model file cannot hold; "
                            "use --format peft")
        if r.form.name == "gguf":
            _check_blocks(r)
    ftype, pure, imatrix = _file_settings(list(records.values()), src)
    check_supported(config, folder.dir)
    tensors = folder.model_tensors
    plan = tensor_plan(config, tensors.keys())
    n_layers = int(config.get("num_hidden_layers") or 0) or None
    heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
    n_gqa = heads // kv if isinstance(heads, int) and isinstance(kv, int) and kv else 1
    tied = not any(p.category == "output" for p in plan)  # llama.cpp: no output.weight in the file

    jobs = []  # (plan, record or None, block type name or None (F32/F16 as is))
    for p in plan:
        name = p.hf_name[:-len(".weight")] if p.hf_name.endswith(".weight") else p.hf_name
        rec = records.get(name) if p.hf_name.endswith(".weight") else None
        if rec is not None and rec.form.name == "gguf":
            if p.transform is not None and p.row_permutation is None:
                raise PackError(f"{p.hf_name}: its GGUF layout changes its values, not only its row order, "
                                "which already quantized blocks cannot follow")
            jobs.append((p, rec, rec.meta["gguf"]["type"]))
            continue
        shape = tensors[p.hf_name].shape
        if len(shape) != 2 or p.category in ("norm", "other") and rec is None:
            jobs.append((p, None, None))
            continue
        category = "output" if p.category == "token_embd" and tied else p.category
        if rec is not None:
            category = category_of(rec.name)
        try:
            jobs.append((p, None, llama_type(ftype, category, shape[-1], p.layer, n_layers, n_gqa,
                                             has_imatrix=imatrix, pure=pure)))
        except RecipeError:  # rows no block type fits: llama-quantize keeps such a tensor in F16
            jobs.append((p, None, "F16"))

    path = out / GGUF_FILE
    writer = new_writer(path, config, folder.dir)
    writer.add_file_type(int(_file_type(ftype)))
    counts: dict[str, int] = {}
    for p, rec, tname in jobs:
        if rec is not None:
            data = rec.tensors["gguf_blocks"]
            if p.row_permutation is not None:
                data = data[p.row_permutation]
            writer.add_tensor(p.gguf_name, np.ascontiguousarray(data.numpy()), raw_dtype=TYPES[tname].qtype)
        else:
            x = tensors[p.hf_name]
            if p.transform is not None:  # in the stored dtype, as the converter computes it (gemma's norm + 1)
                x = p.transform(x)
            x = x.to(torch.float32)
            if tname is None:
                tname = "F32"
                writer.add_tensor(p.gguf_name, np.ascontiguousarray(x.numpy()))
            elif tname == "F16":
                writer.add_tensor(p.gguf_name, np.ascontiguousarray(x.to(torch.float16).numpy()))
            else:
                enc = encode_rtn(x.reshape(-1, x.shape[-1]), TYPES[tname])
                writer.add_tensor(p.gguf_name, np.ascontiguousarray(enc.data.numpy()), raw_dtype=TYPES[tname].qtype)
        counts[tname] = counts.get(tname, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    log.info("gguf: %s (%s), tensors by type: %s", path, ftype, counts)
    return {"file": str(path), "ftype": ftype, "types": counts}
