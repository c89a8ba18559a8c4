"""slimkit's native packed format: what the standard formats cannot hold, stored compactly and
reloaded bit for bit.

A folder with the model's config and tokenizer, ``slimkit_packed.safetensors`` and the manifest
``slimkit_packed.json`` (``format``, ``version``, per-file sha256, per-layer encodings). Per
compressed Linear ``P`` (b = a code width; several widths when SliM-LLM's ``group_bits`` is set):

- ``P.codes{b}``: the integer codes of the weights at width b as a b-bit stream (pack/bitpack.py),
  row-major, only the KEPT weights when a mask is stored (pruned codes equal the zero point).
- ``P.pos``: N:M masks as the position of each kept weight inside its block of M (2 bits for 2:4);
  ``P.bitmap``: other masks, one bit per weight.
- ``P.scale`` per (row, group), ``P.zero{b}`` zero points as b-bit codes (absent for symmetric grids;
  ``P.zero`` float when fractional), ``P.group_bits``, ``P.input_scale``.
- ``P.L.codes`` / ``P.L.scale`` (and R): AbsMax-quantized adapters as b-bit codes plus one scale per
  group of rows and column; float adapters as ``P.L`` / ``P.R``.
- ``P.values`` (kept fp values of a pruned, unquantized weight) or ``P.weight`` (a float base).
- ReALLM layers: ``P.x.vq_codes`` (packed codes), ``P.x.vq_codebook``, ``P.x.vq_scale_q`` /
  ``P.x.vq_scale_max`` (double-quantized block scales), ``P.x.vq_perm``; the base is their decoding
  (no dense weight), the low-rank parts are the adapters.
- every other tensor of the model (embeddings, norms, biases, lm_head) under its own name.

Float tensors are stored in the narrowest of fp16 / bf16 / fp32 that holds them exactly (the
manifest keeps the original dtype), unless ``dense_dtype`` asks to narrow the uncompressed tensors.
Every layer is checked at write time: its decoded state must reproduce the fake-quantized weight
bit for bit; a layer that does not is stored as a float weight, with a warning.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import __version__
from .bitpack import pack_bits, unpack_bits
from .source import LayerRecord, PackError, SlimkitFolder, expand_groups, first_line, read_json_file

log = logging.getLogger(__name__)

FORMAT = "slimkit-packed"
VERSION = 1
TENSORS_FILE = "slimkit_packed.safetensors"
MANIFEST_FILE = "slimkit_packed.json"
COPY_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt",
              "tokenizer.model", "added_tokens.json", "report.json", "report.md")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def narrowest(x: torch.Tensor) -> torch.Tensor:
    """x in fp16 or bf16 when that holds every value exactly, else unchanged."""
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        return x
    for dt in (torch.float16, torch.bfloat16):
        y = x.to(dt)
        if torch.equal(y.to(x.dtype), x):
            return y
    return x


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class _Writer:
    """Collects one layer's tensors and counts their bits by part."""

    def __init__(self, name: str, store: dict, dtypes: dict):
        self.name, self.store, self.dtypes = name, store, dtypes
        self.parts: dict[str, int] = {}

    def put(self, key: str, tensor: torch.Tensor, part: str, exact_float: bool = True) -> None:
        full = f"{self.name}.{key}"
        if tensor.is_floating_point() and exact_float:
            self.dtypes[full] = _dtype_name(tensor.dtype)
            tensor = narrowest(tensor)
        self.store[full] = tensor.contiguous()
        self.parts[part] = self.parts.get(part, 0) + tensor.numel() * tensor.element_size() * 8


def _nm(meta: dict) -> tuple[int, int] | None:
    s = meta.get("sparsity")
    if isinstance(s, str) and ":" in s:
        n, m = (int(v) for v in s.split(":"))
        return n, m
    return None


def _encode_mask(w: _Writer, mask: torch.Tensor, meta: dict) -> dict:
    N, K = mask.shape
    nm = _nm(meta)
    if nm and K % nm[1] == 0:
        n, m = nm
        per_block = mask.view(N, K // m, m).sum(-1)
        if bool((per_block == m - n).all()):
            cols = torch.arange(K).expand(N, K)[mask]  # kept columns, row-major
            w.put("pos", pack_bits(cols % m, max(1, math.ceil(math.log2(m)))), "mask")
            return {"encoding": "nm", "n": n, "m": m}
        log.warning("%s: mask is not %d:%d in every block; stored as a bitmap", w.name, n, m)
    w.put("bitmap", pack_bits(mask.reshape(-1), 1), "mask")
    return {"encoding": "bitmap"}


def _decode_mask(name: str, enc: dict, t: dict, N: int, K: int) -> torch.Tensor:
    if enc["encoding"] == "nm":
        n, m = enc["n"], enc["m"]
        keep = m - n
        count = N * K // m * keep
        pos = unpack_bits(t[f"{name}.pos"], max(1, math.ceil(math.log2(m))), count).to(torch.int64)
        block = torch.arange(count) // keep  # flat (row, block) index of each kept value
        flat = block * m + pos  # (N * K/m * m = N*K) row-major positions
        mask = torch.zeros(N * K, dtype=torch.bool)
        mask[flat] = True
        if int(mask.sum()) != count:
            raise PackError(f"{name}: corrupt N:M positions (two kept values in one slot)")
        return mask.view(N, K)
    return unpack_bits(t[f"{name}.bitmap"], 1, N * K).bool().view(N, K)


def _adapter_codes(M: torch.Tensor, bits: int, group: int):
    """AbsMax codes of an adapter that was fake-quantized by ops.lowrank.absmax_quantize, with
    scales chosen so that codes * scale reproduces M exactly; None when no such scale is found."""
    rows, cols = M.shape
    qmax = 2 ** (bits - 1) - 1
    G = -(-rows // group)
    Mp = torch.cat([M, M.new_zeros(G * group - rows, cols)]).view(G, group, cols)  # (G, group, cols)
    s0 = Mp.abs().amax(dim=1) / qmax  # (G, cols)
    s0 = torch.where(s0 > 0, s0, torch.ones_like(s0))
    best_s = torch.full_like(s0, float("nan"))
    best_q = torch.zeros_like(Mp)
    for s in (s0, torch.nextafter(s0, torch.full_like(s0, math.inf)), torch.nextafter(s0, torch.zeros_like(s0))):
        q = torch.clamp(torch.round(Mp / s[:, None, :]), -qmax, qmax)
        ok = (q * s[:, None, :] == Mp).all(dim=1) & torch.isnan(best_s)  # (G, cols)
        best_s = torch.where(ok, s, best_s)
        best_q = torch.where(ok[:, None, :], q, best_q)
    if torch.isnan(best_s).any():
        return None
    codes = (best_q.reshape(G * group, cols)[:rows] + qmax).to(torch.uint8)  # in [0, 2 qmax]
    return codes, best_s


VQ_KEYS = ("vq_codes", "vq_codebook", "vq_scale_q", "vq_scale_max", "vq_perm")
VQ_PARTS = {"vq_codes": "weights", "vq_codebook": "codebook", "vq_scale_q": "scales", "vq_scale_max": "scales",
            "vq_perm": "metadata"}


def _vq_code(cfg: dict, shape, t: dict):
    from ..ops.vq import VQCode, VQConfig
    config = VQConfig(cfg["d"], cfg["code_bits"], cfg["block"], cfg["scale_group"])
    return VQCode(config, tuple(shape), t["vq_codes"], t["vq_codebook"], t["vq_scale_q"], t["vq_scale_max"],
                  t.get("vq_perm"))


def _vq_config(rec: LayerRecord) -> dict | None:
    """The VQ configuration of a ReALLM layer whose stored code decodes to its base weight bit for
    bit (not with the learned decoder, whose output the code alone does not give), else None."""
    t, cfg = rec.tensors, rec.meta.get("vq")
    if cfg is None or "vq_codes" not in t or "codes" in t or "mask" in t:
        return None
    base = _vq_code(cfg, rec.shape, t).decode()
    return cfg if torch.equal(rec.merged(base), rec.effective) else None


def encode_layer(rec: LayerRecord, store: dict, dtypes: dict) -> dict:
    """Write one Linear's tensors into ``store``; -> its manifest entry."""
    N, K = rec.shape
    t = rec.tensors
    rec.require_form(("uniform", "mixed", "vq", "dense"), "the native format", "use --format gguf")
    w = _Writer(rec.name, store, dtypes)
    entry: dict = {"shape": [N, K], "meta": rec.meta}
    if not rec.exact():
        diff = (rec.merged() - rec.effective).abs().max().item()
        log.warning("%s: the recorded state does not reproduce the model's weight (max diff %.3g); "
                    "stored as a float weight", rec.name, diff)
        w.put("effective", rec.effective, "weights")
        entry.update(encoding="float", parts=w.parts)
        return entry
    entry["encoding"] = "packed"
    entry["state_weight"] = "weight" in t
    kept = t["mask"].bool() if "mask" in t else None
    if kept is not None:
        entry["mask"] = _encode_mask(w, kept, rec.meta)
    if "codes" in t:
        codes = t["codes"].to(torch.int64)
        colbits = rec.column_bits()  # (K,)
        bits_el = colbits.expand(N, K)
        if bool((codes >= (1 << bits_el)).any()):
            log.warning("%s: codes exceed their bit-width; stored at 8 bits", rec.name)
            colbits = torch.full((K,), 8, dtype=torch.int64)
            bits_el = colbits.expand(N, K)
        g = rec.group_size
        zero = t["zero"].float()
        zero_el = expand_groups(zero, K, g)
        sel_base = torch.ones(N, K, dtype=torch.bool)
        if kept is not None:
            pruned_ok = bool((codes[~kept].float() == zero_el[~kept]).all())
            entry["codes_of_pruned"] = "zero" if pruned_ok else "stored"
            if pruned_ok:
                sel_base = kept
        widths = sorted(set(colbits.tolist()))
        for b in widths:
            w.put(f"codes{b}", pack_bits(codes[sel_base & (bits_el == b)], b), "weights")
        entry["code_bits"] = widths
        entry["column_bits"] = "group_bits" if "group_bits" in t else int(colbits[0])
        w.put("scale", t["scale"].float(), "scales")
        gbits = colbits[torch.tensor([sl for sl in range(0, K, g or K)])].expand_as(zero)  # (N, G)
        integral = bool((zero == zero.round()).all() and (zero >= 0).all() and (zero < (1 << gbits)).all())
        if integral and bool((zero == (1 << (gbits - 1)).float()).all()):
            entry["zero"] = "symmetric"
        elif integral:
            entry["zero"] = "packed"
            for b in sorted(set(gbits.reshape(-1).tolist())):
                w.put(f"zero{b}", pack_bits(zero[gbits == b].to(torch.uint8), b), "zeros")
        else:
            entry["zero"] = "float"
            w.put("zero", zero, "zeros")
        entry["zero_dtype"] = _dtype_name(t["zero"].dtype)
        for key in ("group_bits", "input_scale"):
            if key in t:
                w.put(key, t[key], "metadata")
    elif (vq := _vq_config(rec)) is not None:  # ReALLM: the base is its VQ code, decoded on load
        for key in VQ_KEYS:
            if key in t:
                w.put(f"x.{key}", t[key], VQ_PARTS[key])
        entry["base"] = "vq"
        entry["vq"] = vq
    elif "weight" in t or kept is not None:
        base = rec.base_weight()
        if kept is not None and bool((base[~kept] == 0).all()):
            w.put("values", base[kept], "weights")
            entry["base"] = "values"
        else:
            w.put("weight", base, "weights")
            entry["base"] = "weight"
    else:
        w.put("weight", rec.effective, "weights")
        entry["base"] = "weight"
    if rec.has_adapters:
        ad = rec.meta.get("adapters") or {}
        entry["adapters"] = {}
        for key in ("L", "R"):
            M = t[key].float()
            enc = _adapter_codes(M, ad["bits"], ad.get("group", 128)) if ad.get("bits") else None
            if enc is None:
                if ad.get("bits"):
                    log.warning("%s.%s: adapter is not on an AbsMax grid; stored as floats", rec.name, key)
                w.put(key, M, "adapters")
                entry["adapters"][key] = {"encoding": "float", "shape": list(M.shape)}
            else:
                codes, scale = enc
                w.put(f"{key}.codes", pack_bits(codes, ad["bits"]), "adapters")
                w.put(f"{key}.scale", scale, "adapters")
                entry["adapters"][key] = {"encoding": "absmax", "bits": ad["bits"], "group": ad.get("group", 128),
                                          "shape": list(M.shape)}
    for key in rec.extras:
        if key not in ("group_bits", "input_scale") and f"{rec.name}.x.{key}" not in store:
            w.put(f"x.{key}", t[key], "metadata")
    entry["extras"] = [k for k in rec.extras if k not in ("group_bits", "input_scale")]
    entry["parts"] = w.parts
    return entry


def decode_layer(name: str, entry: dict, t: dict, dtypes: dict, effective: bool = True) -> LayerRecord:
    """Inverse of :func:`encode_layer`: the layer's state tensors and (``effective``) its effective
    weight; without it the record holds only the packed state (what the packed runtime needs)."""
    def get(key):
        full = f"{name}.{key}"
        if full not in t:
            raise PackError(f"{name}: tensor {full!r} missing from {TENSORS_FILE}")
        v = t[full]
        return v.to(DTYPES[dtypes[full]]) if full in dtypes else v

    N, K = entry["shape"]
    meta = entry["meta"]
    if entry["encoding"] == "float":
        eff = get("effective")
        return LayerRecord(name, meta, {}, eff)
    out: dict[str, torch.Tensor] = {}
    kept = _decode_mask(f"{name}", entry["mask"], t, N, K) if "mask" in entry else None
    if kept is not None:
        out["mask"] = kept.to(torch.uint8)
    if "code_bits" in entry:
        g = meta.get("quant", {}).get("group_size")
        if f"{name}.group_bits" in t:
            out["group_bits"] = get("group_bits")
        if f"{name}.input_scale" in t:
            out["input_scale"] = get("input_scale")
        scale = get("scale")
        out["scale"] = scale
        if entry["column_bits"] == "group_bits":
            colbits = expand_groups(out["group_bits"].to(torch.int64).reshape(-1), K, g)
        else:
            colbits = torch.full((K,), int(entry["column_bits"]), dtype=torch.int64)
        G = scale.shape[-1]
        gbits = colbits[torch.arange(0, K, g or K)].expand(N, G)
        zdt = DTYPES.get(entry["zero_dtype"])
        if entry["zero"] == "symmetric":
            zero = (1 << (gbits - 1)).float()
        elif entry["zero"] == "packed":
            zero = torch.zeros(N, G)
            for b in sorted(set(gbits.reshape(-1).tolist())):
                sel = gbits == b
                zero[sel] = unpack_bits(get(f"zero{b}"), b, int(sel.sum())).float()
        else:
            zero = get("zero").float()
        out["zero"] = zero.to(zdt) if zdt is not None else zero.to(torch.uint8)
        compact = kept is not None and entry.get("codes_of_pruned") == "zero"
        widths = entry["code_bits"]
        if compact:  # pruned codes equal the zero point
            codes = expand_groups(zero.round().to(torch.uint8), K, g).contiguous()
        if len(widths) == 1:  # one width: no (N, K) selection masks (they fragment the heap: 3x the RSS)
            vals = unpack_bits(get(f"codes{widths[0]}"), widths[0], int(kept.sum()) if compact else N * K)
            if compact:
                codes.masked_scatter_(kept, vals)
            else:
                codes = vals.view(N, K)
        else:
            bits_el = colbits.expand(N, K)
            sel_base = kept if compact else torch.ones(N, K, dtype=torch.bool)
            if not compact:
                codes = torch.zeros(N, K, dtype=torch.uint8)
            for b in widths:
                sel = sel_base & (bits_el == b)
                codes[sel] = unpack_bits(get(f"codes{b}"), b, int(sel.sum()))
        out["codes"] = codes
    elif entry.get("base") == "vq":
        vt = {k: get(f"x.{k}") for k in VQ_KEYS if f"{name}.x.{k}" in t}
        out["weight"] = _vq_code(entry["vq"], (N, K), vt).decode()
    elif entry.get("base") == "values":
        vals = get("values")
        W = torch.zeros(N, K, dtype=vals.dtype)
        W[kept] = vals
        out["weight"] = W
    else:
        out["weight"] = get("weight")
    for key, enc in entry.get("adapters", {}).items():
        if enc["encoding"] == "float":
            out[key] = get(key)
        else:
            rows, cols = enc["shape"]
            qmax = 2 ** (enc["bits"] - 1) - 1
            q = unpack_bits(get(f"{key}.codes"), enc["bits"], rows * cols).view(rows, cols).float() - qmax
            s = get(f"{key}.scale")  # (G, cols)
            out[key] = (q.view(-1, enc["group"], cols) if rows % enc["group"] == 0 else
                        torch.cat([q, q.new_zeros(-rows % enc["group"], cols)]).view(-1, enc["group"], cols))
            out[key] = (out[key] * s[:, None, :]).reshape(-1, cols)[:rows]
    for key in entry.get("extras", []):
        out[key] = get(f"x.{key}")
    rec = LayerRecord(name, dict(meta, shape=[N, K]), out, effective=torch.empty(0))
    if effective:
        rec.effective = rec.merged() if "codes" in out else rec.merged(out["weight"].float())
    if not entry.get("state_weight") and (effective or "codes" in out):
        out.pop("weight", None)
    return rec


def write_native(src: str | Path, out: Path, dense_dtype: str = "auto") -> dict:
    """Write the native packed folder of the slimkit folder ``src`` into the (new, empty) ``out``."""
    if dense_dtype not in ("auto", *DTYPES):
        raise PackError(f"dense dtype must be auto, float32, float16 or bfloat16, got {dense_dtype!r}")
    folder = SlimkitFolder(src)
    store: dict[str, torch.Tensor] = {}
    dtypes: dict[str, str] = {}
    layers = {}
    for rec in folder.records():
        layers[rec.name] = encode_layer(rec, store, dtypes)
    dense = {}
    for key, v in folder.dense_tensors().items():
        dense[key] = _dtype_name(v.dtype)
        if v.is_floating_point():
            v = narrowest(v) if dense_dtype == "auto" else v.to(DTYPES[dense_dtype])
        store[key] = v.contiguous()
    save_file(store, str(out / TENSORS_FILE), metadata={"format": f"{FORMAT}/{VERSION}"})  # one key: byte-stable
    for f in COPY_FILES:
        if (folder.dir / f).is_file():
            shutil.copy2(folder.dir / f, out / f)
    manifest = {
        "format": FORMAT, "version": VERSION, "slimkit_version": __version__,
        "source": {k: v for k, v in folder.header.items() if k != "layers"},
        "dense_dtype": dense_dtype, "dense": dense, "dtypes": dtypes, "layers": layers,
        "files": {TENSORS_FILE: {"sha256": sha256(out / TENSORS_FILE), "bytes": (out / TENSORS_FILE).stat().st_size}},
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    n_float = sum(1 for e in layers.values() if e["encoding"] == "float")
    log.info("native: %d layers packed, %d stored as float, %d dense tensors", len(layers) - n_float, n_float, len(dense))
    return manifest


def is_native(directory: str | Path) -> bool:
    return (Path(directory) / MANIFEST_FILE).is_file()


def read_manifest(directory: str | Path) -> dict:
    d = Path(directory)
    path = d / MANIFEST_FILE
    if not path.is_file():
        raise PackError(f"{str(d)!r} is not a slimkit packed folder (no {MANIFEST_FILE})")
    manifest = read_json_file(path, "a manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PackError(f"{str(path)!r} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION or isinstance(manifest.get("version"), bool):
        raise PackError(f"{str(path)!r} has format version {manifest.get('version')!r}; this slimkit "
                        f"({__version__}) reads version {VERSION}")
    problem = _manifest_problem(manifest)
    if problem:
        raise PackError(f"{str(path)!r} is corrupt: {problem}")
    return manifest


def _manifest_problem(m: dict) -> str | None:
    """What is wrong with the structure of a manifest that `info` and the readers rely on, else None."""
    def strmap(v):
        return isinstance(v, dict) and all(isinstance(x, str) for x in v.values())
    for key, test, want in (("layers", lambda v: isinstance(v, dict), "an object"), ("dense", strmap, "an object of dtypes"),
                            ("dtypes", strmap, "an object of dtypes"), ("files", lambda v: isinstance(v, dict), "an object")):
        if key not in m:
            return f"it has no {key!r}"
        if not test(m[key]):
            return f"{key!r} must be {want}"
    for name, info in m["files"].items():
        if not (isinstance(info, dict) and isinstance(info.get("bytes"), int) and isinstance(info.get("sha256"), str)):
            return f"files: {name!r} needs 'bytes' and 'sha256'"
    for name, e in m["layers"].items():
        ok = isinstance(e, dict) and isinstance(e.get("encoding"), str) and isinstance(e.get("meta"), dict) \
            and isinstance(e["meta"].get("grid", ""), str) \
            and isinstance(e.get("shape"), list) and len(e["shape"]) == 2 \
            and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in e["shape"]) \
            and isinstance(e.get("parts"), dict) \
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in e["parts"].values())
        if not ok:
            return f"layer {name!r} needs 'encoding', 'meta' (a 'grid' string), a 'shape' [out, in] and 'parts' bit counts"
    return None


def read_native(directory: str | Path, verify: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """-> (manifest, raw stored tensors); checks sizes and checksums so corruption is one clear line."""
    d = Path(directory)
    manifest = read_manifest(d)
    for fname, info in manifest.get("files", {}).items():
        p = d / fname
        if not p.is_file():
            raise PackError(f"{str(p)!r} is missing")
        size = p.stat().st_size
        if size != info["bytes"]:
            raise PackError(f"{str(p)!r} is truncated or altered: {size} bytes, the manifest says {info['bytes']}")
        if verify and sha256(p) != info["sha256"]:
            raise PackError(f"{str(p)!r} is corrupt: its sha256 does not match the manifest")
    try:
        tensors = load_file(str(d / TENSORS_FILE))
    except Exception as e:
        raise PackError(f"{str(d / TENSORS_FILE)!r} is corrupt: {first_line(e)}") from None
    return manifest, tensors


def decode_all(manifest: dict, tensors: dict, effective: bool = True) -> tuple[dict[str, LayerRecord], dict[str, torch.Tensor]]:
    """-> (layer records with reconstructed state, dense tensors in their original dtypes)."""
    dtypes = manifest.get("dtypes", {})
    try:
        layers = {n: decode_layer(n, e, tensors, dtypes, effective) for n, e in manifest["layers"].items()}
    except (KeyError, ValueError, RuntimeError, IndexError) as e:
        raise PackError(f"packed tensors do not match the manifest: {first_line(e)}") from None
    dense = {}
    for key, dt in manifest["dense"].items():
        if key not in tensors:
            raise PackError(f"tensor {key!r} missing from {TENSORS_FILE}")
        dense[key] = tensors[key].to(DTYPES[dt]) if dt in DTYPES else tensors[key]
    return layers, dense
