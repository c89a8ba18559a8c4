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

from ..ops.gguf import TYPES, category_of, encode_rtn, llama_type
from ..pack.source import LayerRecord, PackError, SlimkitFolder
from .gguf_meta import check_supported, new_writer, tensor_plan

log = logging.getLogger(__name__)

GGUF_FILE = "model.gguf"


def _file_type(ftype: str):
    import gguf

    return gguf.LlamaFileType[f"MOSTLY_{ftype}"]


def _file_settings(records: list[LayerRecord], src) -> tuple[str, bool]:
    settings = {(r.meta["gguf"]["ftype"], bool(r.meta["gguf"].get("pure", False)))
                for r in records if r.form.name == "gguf"}
    if not settings:
        raise PackError(f"{str(src)!r} holds no GGUF-encoded layers; compress with a GGUF recipe "
                        "(e.g. --recipe gptq-gguf-q4_k_m) to export --format gguf")
    if len(settings) > 1:
        raise PackError(f"{str(src)!r} mixes llama.cpp file types {sorted(settings)}; a GGUF file has one")
    return settings.pop()


def write_gguf(src: str | Path, out: Path) -> dict:
    """Write ``out/model.gguf``; -> a summary {file, ftype, tensors by type}."""
    folder = SlimkitFolder(src)
    config = folder.config
    records = {r.name: r for r in folder.records()}
    for r in records.values():  # what the layers hold, then the family and the tokenizer: before any work
        r.require_form(("gguf", "dense"), "a GGUF file",
                       "compress with a GGUF recipe (e.g. gptq-gguf-q4_k_m) to write GGUF without re-rounding")
        if r.has_adapters:
            raise PackError(f"{r.name} has low-rank adapters, which a GGUF model file cannot hold; "
                            "use --format peft")
    ftype, pure = _file_settings(list(records.values()), src)
    check_supported(config, folder.dir)
    tensors = folder.model_tensors
    plan = tensor_plan(config, tensors.keys())
    n_layers = int(config.get("num_hidden_layers") or 0) or None
    heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
    n_gqa = heads // kv if isinstance(heads, int) and isinstance(kv, int) and kv else 1
    tied = "lm_head.weight" not in tensors or bool(config.get("tie_word_embeddings"))

    path = out / GGUF_FILE
    writer = new_writer(path, config, folder.dir)
    writer.add_file_type(int(_file_type(ftype)))
    counts: dict[str, int] = {}
    for p in plan:
        name = p.hf_name[:-len(".weight")] if p.hf_name.endswith(".weight") else p.hf_name
        rec = records.get(name) if p.hf_name.endswith(".weight") else None
        if rec is not None and rec.form.name == "gguf":
            t = TYPES[rec.meta["gguf"]["type"]]
            data = rec.tensors["gguf_blocks"]
            if p.transform is not None:
                if p.row_permutation is None:
                    raise PackError(f"{p.hf_name}: its GGUF layout changes its values, not only its row order, "
                                    "which already quantized blocks cannot follow")
                data = data[p.row_permutation]
            writer.add_tensor(p.gguf_name, np.ascontiguousarray(data.numpy()), raw_dtype=t.qtype)
            counts[t.name] = counts.get(t.name, 0) + 1
            continue
        x = tensors[p.hf_name]
        if p.transform is not None:  # in the stored dtype, as the converter computes it (gemma's norm + 1)
            x = p.transform(x)
        x = x.to(torch.float32)
        if x.dim() < 2 or p.category in ("norm", "other") and x.dim() != 2:
            writer.add_tensor(p.gguf_name, np.ascontiguousarray(x.numpy()))
            counts["F32"] = counts.get("F32", 0) + 1
            continue
        category = p.category
        if category == "token_embd" and tied:
            category = "output"  # a tied embedding is quantized as the output head is
        if rec is not None:
            category = category_of(rec.name)
        tname = llama_type(ftype, category, x.shape[-1], p.layer, n_layers, n_gqa, has_imatrix=False, pure=pure)
        enc = encode_rtn(x.reshape(-1, x.shape[-1]), TYPES[tname])
        writer.add_tensor(p.gguf_name, np.ascontiguousarray(enc.data.numpy()), raw_dtype=TYPES[tname].qtype)
        counts[tname] = counts.get(tname, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    log.info("gguf: %s (%s), tensors by type: %s", path, ftype, counts)
    return {"file": str(path), "ftype": ftype, "types": counts}
