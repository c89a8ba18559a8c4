"""`slimkit info`: what a folder stores, bits per weight by part, size on disk vs fp16."""
from __future__ import annotations

import math
from pathlib import Path

from safetensors import safe_open

from ..pack.native import MANIFEST_FILE, TENSORS_FILE, read_manifest
from ..pack.source import PackError, first_line, read_meta
from ..state_io import META_FILE

PARTS = ("weights", "mask", "scales", "zeros", "adapters", "metadata")


def _shapes(path: Path) -> dict[str, list[int]]:
    try:
        with safe_open(str(path), "pt") as h:
            return {k: h.get_slice(k).get_shape() for k in h.keys()}
    except Exception as e:
        raise PackError(f"{str(path)!r} is corrupt: {first_line(e)}") from None


def disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def folder_info(directory: str | Path) -> dict:
    """Sizes and bit accounting of a native packed folder, a slimkit compress output, or any HF /
    exported folder (sizes only)."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise PackError(f"{str(d)!r} is not a folder")
    info: dict = {"folder": str(d), "disk_bytes": disk_bytes(d)}
    if (d / MANIFEST_FILE).is_file():
        m = read_manifest(d)
        shapes = _shapes(d / TENSORS_FILE)
        parts = dict.fromkeys(PARTS, 0)
        params = 0
        enc = {}
        for e in m["layers"].values():
            params += e["shape"][0] * e["shape"][1]
            for k, v in e["parts"].items():
                parts[k] = parts.get(k, 0) + v
            label = e["meta"].get("grid", "?") + (f" + {e['meta']['sparsity']}" if e["meta"].get("sparsity") else "") \
                + (" + adapters" if "adapters" in e else "")
            enc[label] = enc.get(label, 0) + 1
        dense_params = sum(math.prod(shapes[k]) for k in m["dense"] if k in shapes)
        dense_bytes = sum(math.prod(shapes[k]) * _itemsize(d, k) for k in m["dense"] if k in shapes)
        info.update(kind="slimkit native (packed)", version=m["version"], layers=len(m["layers"]), layer_kinds=enc,
                    compressed_params=params, other_params=dense_params,
                    bits_per_weight={k: v / params for k, v in parts.items() if v} if params else {},
                    compressed_bytes=sum(parts.values()) / 8, other_bytes=dense_bytes,
                    fp16_compressed_bytes=params * 2, fp16_total_bytes=(params + dense_params) * 2)
        info["bits_per_weight"]["total"] = sum(parts.values()) / params if params else 0.0
    elif (d / META_FILE).is_file():
        meta = read_meta(d)  # validated: one PackError naming the file and the problem
        parts: dict[str, int] = {}
        params = 0
        for lm in meta["layers"].values():
            params += lm["shape"][0] * lm["shape"][1]
            for k, v in lm.get("bits", {}).items():
                parts[k] = parts.get(k, 0) + v
        info.update(kind="slimkit fake-quantized (dense fp32 weights + state)", layers=len(meta["layers"]),
                    compressed_params=params,
                    nominal_bits_per_weight={k: v / params for k, v in parts.items() if v} if params else {},
                    fp16_compressed_bytes=params * 2,
                    packs_as="gguf" if any("gguf" in lm for lm in meta["layers"].values()) else "native")
    elif sorted(d.glob("*.gguf")):
        info.update(kind="GGUF (llama.cpp)", gguf=[_gguf_info(f) for f in sorted(d.glob("*.gguf"))])
    else:
        total = 0
        for f in d.rglob("*.safetensors"):
            total += sum(math.prod(s) for s in _shapes(f).values())
        kind = "PEFT adapters + base" if (d / "adapter" / "adapter_config.json").is_file() else "Hugging Face folder"
        cfg = d / "config.json"
        if cfg.is_file() and "quantization_config" in cfg.read_text():
            kind = "compressed-tensors" if "compressed-tensors" in cfg.read_text() else "quantized HF folder"
        info.update(kind=kind, stored_elements=total)
    return info


def _gguf_info(path: Path) -> dict:
    import gguf

    try:
        r = gguf.GGUFReader(str(path))
        ft = r.fields.get("general.file_type")
        types: dict[str, int] = {}
        for t in r.tensors:
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        elements = sum(int(t.n_elements) for t in r.tensors)
    except Exception as e:  # the reader raises assorted errors on truncated or foreign files
        raise PackError(f"{str(path)!r} is not a readable GGUF file: {first_line(e)}") from None
    file_type = ft.contents() if ft is not None else None
    name = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else "?"
    return {"file": path.name, "file_type": name, "tensors": len(r.tensors), "elements": elements, "types": types,
            "bits_per_weight": path.stat().st_size * 8 / elements if elements else 0.0}


def _itemsize(d: Path, key: str) -> int:
    with safe_open(str(d / TENSORS_FILE), "pt") as h:
        dt = h.get_slice(key).get_dtype()
    return {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U8": 1, "I8": 1, "BOOL": 1}.get(dt, 4)


def info_rows(info: dict) -> list[tuple[str, str]]:
    mib = lambda b: f"{b / 2**20:.2f} MiB"  # noqa: E731
    rows = [("folder", info["folder"]), ("kind", info["kind"]), ("size on disk", mib(info["disk_bytes"]))]
    if "fp16_total_bytes" in info:
        rows += [("fp16 original (whole model)", mib(info["fp16_total_bytes"])),
                 ("  ratio", f"{info['disk_bytes'] / info['fp16_total_bytes']:.3f}x"),
                 ("compressed Linears", f"{info['layers']} ({info['compressed_params']:,} weights)"),
                 ("  stored", mib(info["compressed_bytes"])),
                 ("  fp16 of the same layers", mib(info["fp16_compressed_bytes"])),
                 ("  ratio", f"{info['compressed_bytes'] / info['fp16_compressed_bytes']:.3f}x"),
                 ("other tensors", f"{info['other_params']:,} values, {mib(info['other_bytes'])}")]
        rows += [(f"bits/weight {k}", f"{v:.3f}") for k, v in info["bits_per_weight"].items()]
        rows += [(f"layers: {k}", str(v)) for k, v in info["layer_kinds"].items()]
    elif "nominal_bits_per_weight" in info:
        rows += [("compressed Linears", f"{info['layers']} ({info['compressed_params']:,} weights)")]
        rows += [(f"nominal bits/weight {k}", f"{v:.3f}") for k, v in info["nominal_bits_per_weight"].items()]
        rows += [("note", "weights are stored fake-quantized in fp32; "
                          f"`slimkit export --format {info.get('packs_as', 'native')}` packs them")]
    elif "gguf" in info:
        for g in info["gguf"]:
            rows += [("file", f"{g['file']} ({g['file_type']})"),
                     ("  weights", f"{g['elements']:,} in {g['tensors']} tensors"),
                     ("  bits/weight", f"{g['bits_per_weight']:.3f}")]
            rows += [(f"  tensors {k}", str(v)) for k, v in sorted(g["types"].items())]
    else:
        rows += [("stored values", f"{info['stored_elements']:,}")]
    return rows
