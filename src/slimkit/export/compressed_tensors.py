"""compressed-tensors ``pack-quantized`` checkpoints (transformers + compressed-tensors, vLLM).

Our unsigned codes c with dequantization (c - z) s are compressed-tensors' signed codes
q = c - 2^(b-1) with zero point zp = z - 2^(b-1): (q - zp) s = (c - z) s. Stored unsigned,
u = q + 2^(b-1) = c, packed along the input dimension into int32 words, least significant first;
asymmetric zero points packed the same way along the output dimension. Only 4 and 8 bits
(portable across versions), groups that divide the input width, or per channel.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..pack.native import COPY_FILES
from ..pack.source import LayerRecord, PackError, SlimkitFolder

log = logging.getLogger(__name__)

CT_VERSION = "0.20.0"  # the compressed-tensors version the layout was checked against


def pack_int32(u: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) unsigned codes -> (rows, ceil(cols*bits/32)) int32, packed along dim 1."""
    per = 32 // bits
    rows, cols = u.shape
    pad = -cols % per
    v = torch.cat([u.to(torch.int64), u.new_zeros(rows, pad, dtype=torch.int64)], 1).view(rows, -1, per)
    words = (v << (torch.arange(per) * bits)).sum(-1)  # (rows, words) in [0, 2^32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def scheme_of(rec: LayerRecord) -> tuple:
    """(bits, strategy, group_size, symmetric) or a PackError saying why the format cannot hold it."""
    N, K = rec.shape
    q = rec.quant
    rec.require_form(("uniform", "dense"), "compressed-tensors",
                     "use --format gguf" if rec.form.name == "gguf" else "use --format native")
    if rec.has_adapters:
        raise PackError(f"{rec.name} has low-rank adapters, which compressed-tensors cannot hold; "
                        f"use --format peft (adapters + base) or --format native")
    if q is None:
        return None  # an unquantized (e.g. pruned-only) layer stays dense
    extras = rec.extras
    if extras:
        raise PackError(f"{rec.name} carries {', '.join(extras)} (mixed bits or a method's own grid), which "
                        f"compressed-tensors cannot hold; use --format native")
    if q["bits"] not in (4, 8):
        raise PackError(f"{rec.name} is {q['bits']}-bit; compressed-tensors pack-quantized is portable only at "
                        f"4 and 8 bits; use --format native")
    g = q.get("group_size")
    if g is not None and g < K and K % g:
        raise PackError(f"{rec.name}: group size {g} does not divide the input width {K} (a ragged last group); "
                        f"compressed-tensors needs equal groups; use --format native")
    if not rec.exact():
        raise PackError(f"{rec.name}: the recorded codes do not reproduce the model's weight")
    strategy = "channel" if g is None or g >= K else "group"
    sym = bool(q.get("symmetric")) and bool((rec.tensors["zero"].float() == 2 ** (q["bits"] - 1)).all())
    return (q["bits"], strategy, g if strategy == "group" else None, sym)


def write_compressed_tensors(src: str | Path, out: Path) -> dict:
    folder = SlimkitFolder(src)
    tensors = dict(folder.dense_tensors())
    groups: dict[tuple, list[str]] = {}
    dense_linears = []
    dtype = next((v.dtype for v in tensors.values() if v.is_floating_point()), torch.float32)
    modules = linear_modules(folder.dir)
    for rec in folder.records():
        if rec.name not in modules:
            raise PackError(f"{rec.name} is not a Linear module of the model (e.g. an expert of fused mixture-of-"
                            "experts tensors), which compressed-tensors cannot hold; use --format native")
        scheme = scheme_of(rec)
        if scheme is None:
            tensors[rec.name + ".weight"] = rec.effective
            dense_linears.append(rec.name)
            continue
        bits, strategy, g, sym = scheme
        c = rec.tensors["codes"]
        tensors[rec.name + ".weight_packed"] = pack_int32(c, bits)
        tensors[rec.name + ".weight_scale"] = rec.tensors["scale"].to(dtype).contiguous()
        tensors[rec.name + ".weight_shape"] = torch.tensor(list(rec.shape), dtype=torch.int64)
        if not sym:
            z = rec.tensors["zero"].to(torch.int64)  # unsigned zero = signed zp + 2^(b-1)
            tensors[rec.name + ".weight_zero_point"] = pack_int32(z.T.contiguous(), bits).T.contiguous()
        groups.setdefault(scheme, []).append(rec.name)
    if not groups:
        raise PackError(f"{str(src)!r} has no quantized Linear to export as compressed-tensors")
    config_groups = {}
    for i, ((bits, strategy, g, sym), names) in enumerate(sorted(groups.items(), key=lambda kv: -len(kv[1]))):
        config_groups[f"group_{i}"] = {
            "targets": ["Linear"] if len(groups) == 1 else [f"re:^{n.replace('.', '[.]')}$" for n in names],
            "input_activations": None, "output_activations": None,
            "weights": {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": strategy,
                        "group_size": g, "dynamic": False, "actorder": None},
        }
    compressed = {n for names in groups.values() for n in names}
    # every Linear the model has that was not quantized (the head, ignored or pruned-only layers)
    ignore = sorted(modules - compressed)
    qconfig = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
               "config_groups": config_groups, "ignore": ignore, "kv_cache_scheme": None,
               "sparsity_config": {}, "transform_config": {}, "version": CT_VERSION}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = dict(folder.config)
    config["quantization_config"] = qconfig
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for f in COPY_FILES:
        if f not in ("config.json", "report.json", "report.md") and (folder.dir / f).is_file():
            shutil.copy2(folder.dir / f, out / f)
    log.info("compressed-tensors: %d quantized Linears in %d config group(s), %d dense Linears",
             len(compressed), len(groups), len(dense_linears))
    return qconfig


def linear_modules(folder: str | Path) -> set[str]:
    """Names of the model's nn.Linear modules, from its config (built on the meta device: no
    memory, no weights): what compressed-tensors' ``targets: [Linear]`` will match."""
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
