"""GPU benchmark: compress a random Llama-3-8B-shaped model on one accelerator -> the "gpu"
section of docs/results.md.

    python benchmarks/gpu.py --out gpu.json --markdown docs/results.md     # the 8B shape, on CUDA
    python benchmarks/gpu.py --device cpu --blocks 2 --hidden 512 ...      # a small smoke run

What it does, all on the machine it runs on (nothing is downloaded):

1. Writes a random Llama model of the requested shape (default: Llama-3-8B, hidden 4096, MLP
   14336, 32 blocks, 32 heads / 8 KV heads, vocabulary 128,256, untied head, bf16) as a
   safetensors folder without tokenizer, one shard per block: every tensor is
   ``torch.randn(shape, generator=seeded by its name) * 0.02`` (norms are ones), so generating
   is fast and holds one block at a time. A second folder holds only the first
   ``--sparse-blocks`` blocks; its shards are hard links to the first folder's (identical bytes;
   a copy, or a regeneration from the same per-tensor seeds, where links are refused).
2. Compresses the model with ``gptq-w4-g128`` over all blocks and the small one with
   ``sparsegpt-2of4-gptq-w4``, through ``slimkit.api.compress`` on seeded random-token
   calibration (``torch.randint`` over the vocabulary, ``--nsamples`` x ``--seqlen``), without
   evaluation. Records the time of every block, the compression total and the whole call, the
   peak GPU memory (``torch.cuda.max_memory_allocated``, reset before each run), the peak RSS
   (``resource.getrusage``; the process high-water mark is reset before each run through
   /proc/self/clear_refs where the kernel allows it), the GPU's name and the date, with the
   issue's targets: GPTQ of the 8B shape over 32 blocks in <= 5 minutes on an H200, and a peak
   GPU memory <= one bf16 block + 3 activation buffers + 2 GiB (bound computed from the shapes).
3. Agreement (unless ``--skip-agreement``): a tiny fp32 llama (hidden 64, 2 blocks, vocabulary
   256) compressed with ``sparsegpt-2of4-gptq-w4`` (groups of 64, which divide every width) on
   the CPU and on the chosen device (on a CPU-only run: a second CPU run, i.e. a determinism
   check only); the two ``slimkit_state.safetensors`` must have equal masks, >= 99% equal
   codes, and the two compressed models' logits on the calibration windows a relative error
   <= 1e-3.

Everything goes into one JSON document (``--out FILE``, else stdout); a readable summary goes
to stderr; ``--markdown FILE`` writes the "gpu" section (between ``<!-- BEGIN gpu -->`` and
``<!-- END gpu -->``, replaced in place if FILE has them). Exit code 1 when the agreement
check fails, else 0 (the speed and memory targets are reported, not enforced); 2 for a usage
error or a crash.

Needs torch, transformers and safetensors, plus slimkit from this checkout's ``src/`` (no
install needed; slimkit itself imports pyyaml, tqdm and numpy, which transformers depends on).
Uses only long-standing APIs (LlamaConfig, LlamaForCausalLM on the meta device,
AutoModelForCausalLM.from_pretrained, safetensors' save_file).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

GIB = 2**30
MIB = 2**20
GPTQ_RECIPE = "gptq-w4-g128"
SPARSE_RECIPE = "sparsegpt-2of4-gptq-w4"
TARGET_GPTQ_SECONDS = 300.0  # the target for the 8B shape over 32 blocks on an H200
SLACK_BYTES = 2 * GIB  # the memory bound's allowance beyond one block and its activations
ACTIVATION_BUFFERS = 3
TINY = dict(hidden=64, intermediate=128, blocks=2, heads=4, kv_heads=2, vocab=256)
TINY_CALIB = (16, 64)  # nsamples x seqlen of the agreement check
AGREEMENT = {"codes_equal_fraction_min": 0.99, "logits_rel_error_max": 1e-3}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def fail(msg: str):
    """A usage error: exit code 2 (1 means that the agreement check failed)."""
    print(f"gpu.py: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


# ---------------------------------------------------------------------------------------------
# the random model
# ---------------------------------------------------------------------------------------------
def llama3_intermediate(hidden: int) -> int:
    """Llama-3's MLP width: 8/3 x hidden, x 1.3 (ffn_dim_multiplier), rounded up to a multiple
    of 1024 -> 14336 = 3.5 x 4096 for the 8B, 28672 = 3.5 x 8192 for the 70B."""
    width = int(1.3 * int(8 * hidden / 3))
    return 1024 * math.ceil(width / 1024)


def llama_config(hidden: int, intermediate: int, blocks: int, heads: int, kv_heads: int, vocab: int,
                 dtype: str, max_positions: int = 8192):
    from transformers import LlamaConfig

    if hidden % heads or heads % kv_heads:
        fail(f"hidden {hidden} must be a multiple of heads {heads}, and heads of kv-heads {kv_heads}")
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=blocks, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=max_positions, tie_word_embeddings=False, dtype=dtype)


def tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the model, from an instance on the meta device (no memory,
    no initialisation)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def shard_of(name: str) -> str:
    """One shard per block, one for the rest (embedding, final norm, head)."""
    if name.startswith("model.layers."):
        return f"model-block-{int(name.split('.')[2]):05d}.safetensors"
    return "model-embed-head.safetensors"


CHUNK = 1 << 22  # elements per generator: large tensors are filled in parallel, chunk by chunk


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int, pool=None) -> torch.Tensor:
    """Norm weights are ones; every other tensor is N(0, 0.02^2), its rows filled in chunks of
    about 4 M values, each from a generator seeded by the tensor's name and the chunk's index: a
    block is the same in every model that has it, whatever the number of threads (``pool``, a
    thread pool: torch's CPU generator is sequential, so chunks are what run in parallel)."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    out = torch.empty(shape, dtype=dtype)
    rows = max(1, CHUNK // max(1, math.prod(shape[1:])))
    base = seed * 1_000_003 + zlib.crc32(name.encode())

    def fill(i: int) -> None:
        g = torch.Generator().manual_seed((base * 65_537 + i) % 2**63)
        out[i * rows:(i + 1) * rows].normal_(0.0, 1.0, generator=g).mul_(0.02)

    chunks = range(math.ceil(shape[0] / rows))
    list(pool.map(fill, chunks) if pool is not None else map(fill, chunks))
    return out


def write_model(path: Path, config, seed: int = 0, link_from: Path | None = None) -> dict:
    """Write a random model for ``config`` to ``path`` (config.json, one safetensors shard per
    block and an index). Shards that ``link_from`` has already (same names, same tensors) are
    hard-linked (copied where links are refused) instead of generated. Returns its sizes."""
    t0 = time.perf_counter()
    dtype = DTYPES[str(config.dtype).removeprefix("torch.")]
    shapes = tensor_shapes(config)
    shards: dict[str, list[str]] = {}
    for name in shapes:
        shards.setdefault(shard_of(name), []).append(name)
    path.mkdir(parents=True, exist_ok=True)
    weight_map, total_bytes, linked = {}, 0, 0
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
    writer, pending = ThreadPoolExecutor(max_workers=1), None  # writes a shard while the next is generated
    for shard, names in shards.items():
        src = link_from / shard if link_from is not None else None
        if src is not None and src.is_file():
            try:
                os.link(src, path / shard)
            except OSError:
                shutil.copyfile(src, path / shard)
            linked += 1
        else:
            tensors = {n: random_tensor(n, shapes[n], dtype, seed, pool) for n in names}
            if pending is not None:
                pending.result()  # at most two shards in memory: one being written, one generated
            pending = writer.submit(save_file, tensors, str(path / shard), metadata={"format": "pt"})
            del tensors
        weight_map |= {n: shard for n in names}
        total_bytes += sum(math.prod(shapes[n]) for n in names) * torch.empty((), dtype=dtype).element_size()
    if pending is not None:
        pending.result()
    pool.shutdown()
    writer.shutdown()
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(path)
    block0 = [n for n in shapes if n.startswith("model.layers.0.")]
    return {"params": sum(math.prod(s) for s in shapes.values()),
            "block_params": sum(math.prod(shapes[n]) for n in block0),
            "bytes": total_bytes, "shards": len(shards), "linked_shards": linked,
            "seconds": time.perf_counter() - t0}


def random_calibration(vocab: int, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (nsamples, seqlen), generator=g, dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------
def resolve_device(spec: str) -> str:
    spec = spec.strip().lower()
    if spec == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            fail(f"--device {spec}: torch sees no CUDA device here (use --device cpu or auto)")
        return "cuda:0" if spec == "cuda" else spec
    if spec != "cpu":
        fail(f"unknown --device {spec!r}; use auto, cpu, cuda or cuda:N")
    return spec


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0; False where it is refused)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_bound_bytes(block_params: int, nsamples: int, seqlen: int, hidden: int) -> int:
    """The issue's bound on the peak GPU memory: one bf16 block, three bf16 activation buffers
    of the calibration set, and 2 GiB."""
    return block_params * 2 + nsamples * seqlen * hidden * 2 * ACTIVATION_BUFFERS + SLACK_BYTES


def disk_estimate_bytes(model_bytes: int, block_params: int, blocks: int, nsamples: int, seqlen: int,
                        hidden: int, element_size: int, low_memory: bool) -> int:
    """Rough peak disk use of one compression beyond its input model: the compressed copy, the
    state (a byte of codes per block weight), the per-block checkpoint (the state payload, plus a
    copy of every compressed block unless --low-memory) and one set of fp32 activations."""
    codes = block_params * blocks
    checkpoint = codes + (0 if low_memory else block_params * element_size * blocks)
    return model_bytes + codes + checkpoint + nsamples * seqlen * hidden * 4


def compress_run(model_dir: Path, recipe: str, out: Path, calib: torch.Tensor, device: str, dtype: str,
                 seed: int, progress: bool, low_memory: bool, bound: int | None = None) -> dict:
    """One slimkit.api.compress call, measured; the compressed folder is left in ``out``."""
    from slimkit.api import compress

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rss_reset = reset_peak_rss()
    t0 = time.perf_counter()
    report = compress(str(model_dir), recipe, out, calib=calib, seed=seed, eval_data=None, progress=progress,
                      low_memory=low_memory, device=device, dtype=dtype)
    if cuda:
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    comp = report["compression"]
    blocks = [{"index": b["index"], "seconds": b["seconds"], "rel_error": b["rel_error"]} for b in comp["blocks"]]
    seconds = [b["seconds"] for b in blocks]
    run = {
        "recipe": recipe, "model_dir": str(model_dir), "device": device, "dtype": dtype, "low_memory": low_memory,
        "blocks": blocks, "n_blocks": len(blocks),
        "block_seconds": {"mean": sum(seconds) / max(1, len(seconds)), "min": min(seconds, default=0.0),
                          "max": max(seconds, default=0.0)},
        "compress_seconds": comp["timings"].get("total"), "wall_seconds": wall,
        "load_seconds": report.get("load_seconds"), "save_seconds": report.get("save_seconds"),
        "timings": comp["timings"], "bits_per_weight": comp.get("bits_per_weight"),
        "peak_rss_mb": peak_rss_mb(), "peak_rss_reset": rss_reset,
        "slimkit_peak_rss_compress_mb": report.get("peak_rss_compress_mb"),
        "slimkit_device_report": report.get("device"),
        "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / MIB if cuda else None,
        "peak_gpu_reserved_mb": torch.cuda.max_memory_reserved(device) / MIB if cuda else None,
    }
    if bound is not None:
        run["gpu_bound_mb"] = bound / MIB
        run["within_gpu_bound"] = run["peak_gpu_mb"] <= run["gpu_bound_mb"] if cuda else None
    return run


# ---------------------------------------------------------------------------------------------
# agreement
# ---------------------------------------------------------------------------------------------
def read_state(folder: Path) -> dict[str, torch.Tensor]:
    """slimkit_state.safetensors, or its shards when it was written block by block."""
    single = folder / "slimkit_state.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = folder / "slimkit_state.index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{folder} holds no slimkit_state.safetensors")
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state |= load_file(str(folder / f))
    return state


@torch.no_grad()
def logits_of(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    return torch.cat([model(ids[i:i + 4]).logits.float() for i in range(0, len(ids), 4)])


def compare_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    masks = sorted(k for k in a if k.endswith(".mask"))
    codes = sorted(k for k in a if k.endswith(".codes"))
    same_keys = set(a) == set(b)
    masks_equal = same_keys and all(torch.equal(a[k], b[k]) for k in masks)
    equal = total = 0
    for k in codes:
        if k in b and a[k].shape == b[k].shape:
            equal += int((a[k] == b[k]).sum())
        total += a[k].numel()
    return {"same_keys": same_keys, "masks": len(masks), "masks_equal": masks_equal, "codes_tensors": len(codes),
            "codes_equal_fraction": equal / total if total else 0.0}


def agreement(work: Path, device: str, seed: int, progress: bool, drop=None) -> dict:
    """Compress the tiny model on the CPU and on ``device`` (a second CPU run on a CPU-only
    machine) and compare what the two runs decided."""
    t0 = time.perf_counter()
    cfg = llama_config(TINY["hidden"], TINY["intermediate"], TINY["blocks"], TINY["heads"], TINY["kv_heads"],
                       TINY["vocab"], "float32", max_positions=max(256, TINY_CALIB[1]))
    model_dir = work / "tiny-model"
    write_model(model_dir, cfg, seed=seed)
    calib = random_calibration(TINY["vocab"], *TINY_CALIB, seed=seed)
    other = device if device.startswith("cuda") else "cpu"
    mode = (f"cpu vs {other}" if other != "cpu" else
            "cpu vs cpu (no CUDA device: a second CPU run, i.e. a determinism check only)")
    outs = {}
    for tag, dev in (("reference", "cpu"), ("device", other)):
        outs[tag] = work / f"tiny-{tag}"
        compress_run(model_dir, SPARSE_RECIPE, outs[tag], calib, dev, "float32", seed, progress, low_memory=False)
    cmp = compare_states(read_state(outs["reference"]), read_state(outs["device"]))
    ref, dev_logits = logits_of(outs["reference"], calib), logits_of(outs["device"], calib)
    rel = float((dev_logits - ref).norm() / ref.norm().clamp_min(1e-30))
    checks = {"masks": cmp["same_keys"] and cmp["masks"] > 0 and cmp["masks_equal"],
              "codes": cmp["codes_equal_fraction"] >= AGREEMENT["codes_equal_fraction_min"],
              "logits": rel <= AGREEMENT["logits_rel_error_max"]}
    for p in (model_dir, *outs.values()):
        (drop or (lambda path: shutil.rmtree(path, ignore_errors=True)))(p)
    return {"mode": mode, "devices": ["cpu", other], "recipe": SPARSE_RECIPE, "dtype": "float32",
            "model": dict(TINY), "calibration": {"nsamples": TINY_CALIB[0], "seqlen": TINY_CALIB[1], "seed": seed},
            **cmp, "logits_rel_error": rel, "thresholds": dict(AGREEMENT), "checks": checks,
            "passed": all(checks.values()), "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------
def _mb(x) -> str:
    return "—" if x is None else f"{x:,.0f}"


def _s(x) -> str:
    return "—" if x is None else f"{x:.1f}"


def compute_dtype(results: dict) -> str:
    """The dtype blocks computed in, as slimkit reported it (the model dtype on CUDA, fp32 on a CPU)."""
    for run in results.get("runs", {}).values():
        d = (run.get("slimkit_device_report") or {}).get("compute_dtype")
        if d:
            return d
    return "?"


def summary(results: dict) -> str:
    m, c = results["model"], results["calibration"]
    lines = [f"slimkit GPU benchmark, {results['date']}, device {results['device']} ({results['device_name']}), "
             f"torch {results['versions']['torch']}, transformers {results['versions']['transformers']}",
             f"model: random llama, hidden {m['hidden']}, MLP {m['intermediate']}, {m['blocks']} blocks, "
             f"{m['heads']}/{m['kv_heads']} heads, vocab {m['vocab']}, {m['dtype']}: {m['params'] / 1e9:.3f} B params "
             f"({m['bytes'] / GIB:.2f} GiB), written in {m['build_seconds']:.1f} s",
             f"calibration: {c['nsamples']} x {c['seqlen']} random tokens (seed {c['seed']}); model dtype "
             f"{results['dtype']}, compute dtype {compute_dtype(results)}"]
    for key, run in results["runs"].items():
        bs = run["block_seconds"]
        lines.append(f"[{key}] {run['recipe']} over {run['n_blocks']} blocks: compress {_s(run['compress_seconds'])} s "
                     f"(whole call {_s(run['wall_seconds'])} s, load {_s(run['load_seconds'])} s, save "
                     f"{_s(run['save_seconds'])} s); per block mean {bs['mean']:.2f} s, min {bs['min']:.2f}, "
                     f"max {bs['max']:.2f}")
        lines.append(f"[{key}]   per block (s): " + " ".join(f"{b['seconds']:.2f}" for b in run["blocks"]))
        lines.append(f"[{key}]   peak GPU memory {_mb(run['peak_gpu_mb'])} MiB (reserved "
                     f"{_mb(run['peak_gpu_reserved_mb'])}) vs bound {_mb(run.get('gpu_bound_mb'))} MiB"
                     + ("" if run.get("within_gpu_bound") is None else
                        f" -> {'within' if run['within_gpu_bound'] else 'OVER'}")
                     + f"; peak RSS {_mb(run['peak_rss_mb'])} MiB"
                     + ("" if run["peak_rss_reset"] else " (high-water mark not resettable: includes earlier phases)"))
    t = results["targets"]
    lines.append(f"bound = block params x 2 B ({t['block_bytes'] / MIB:,.0f} MiB) + {ACTIVATION_BUFFERS} x nsamples x seqlen "
                 f"x hidden x 2 B ({t['activation_bytes'] / MIB:,.0f} MiB) + 2 GiB = {t['gpu_bound_mb']:,.0f} MiB")
    if t.get("gptq_seconds_met") is not None:
        lines.append(f"target GPTQ <= {t['gptq_seconds_max']:.0f} s (8B shape, H200): compress "
                     f"{'met' if t['gptq_seconds_met'] else 'NOT met'}, whole call "
                     f"{'met' if t['gptq_wall_seconds_met'] else 'NOT met'}")
    a = results["agreement"]
    if a.get("skipped"):
        lines.append("agreement: skipped (--skip-agreement)")
    else:
        ck = a["checks"]
        lines += [f"agreement ({a['mode']}, tiny llama, {a['recipe']}, fp32):",
                  f"  masks equal: {a['masks_equal']} ({a['masks']} masks) -> {'PASS' if ck['masks'] else 'FAIL'}",
                  f"  codes equal: {a['codes_equal_fraction']:.6f} (>= {a['thresholds']['codes_equal_fraction_min']}) "
                  f"-> {'PASS' if ck['codes'] else 'FAIL'}",
                  f"  logits relative error: {a['logits_rel_error']:.3e} (<= {a['thresholds']['logits_rel_error_max']:g}) "
                  f"-> {'PASS' if ck['logits'] else 'FAIL'}",
                  f"  agreement: {'PASS' if a['passed'] else 'FAIL'}"]
    return "\n".join(lines)


def markdown(results: dict) -> str:
    """The results as the "gpu" section of docs/results.md."""
    m, c, t = results["model"], results["calibration"], results["targets"]
    lines = ["## Compression on a GPU", "",
             f"Random Llama model (hidden {m['hidden']}, MLP {m['intermediate']}, {m['blocks']} blocks, "
             f"{m['heads']} heads / {m['kv_heads']} KV heads, vocabulary {m['vocab']:,} untied, {m['dtype']}: "
             f"{m['params'] / 1e9:.2f} B parameters, {m['bytes'] / GIB:.1f} GiB), written on the machine in "
             f"{m['build_seconds']:.0f} s. Calibration: {c['nsamples']} x {c['seqlen']} random tokens (seed "
             f"{c['seed']}), no evaluation. Device: {results['device']} ({results['device_name']}), model dtype "
             f"{results['dtype']}, compute dtype {compute_dtype(results)}; torch {results['versions']['torch']}, transformers "
             f"{results['versions']['transformers']}, {results['date']}.", "",
             "| recipe | blocks | compress (s) | whole call (s) | s/block mean / max | peak GPU (MiB) | "
             "bound (MiB) | peak RSS (MiB) |", "|---|---|---|---|---|---|---|---|"]
    for run in results["runs"].values():
        bs = run["block_seconds"]
        lines.append(f"| {run['recipe']} | {run['n_blocks']} | {_s(run['compress_seconds'])} | {_s(run['wall_seconds'])} | "
                     f"{bs['mean']:.2f} / {bs['max']:.2f} | {_mb(run['peak_gpu_mb'])} | {_mb(run.get('gpu_bound_mb'))} | "
                     f"{_mb(run['peak_rss_mb'])} |")
    lines += ["", f"Bound on the peak GPU memory: one bf16 block ({t['block_bytes'] / MIB:,.0f} MiB) + "
              f"{ACTIVATION_BUFFERS} bf16 activation buffers of the calibration set ({t['activation_bytes'] / MIB:,.0f} "
              f"MiB) + 2 GiB = {t['gpu_bound_mb']:,.0f} MiB."]
    if t.get("gptq_seconds_met") is not None:
        lines.append(f"Target for the 8B shape on an H200: GPTQ over 32 blocks in <= {t['gptq_seconds_max']:.0f} s: "
                     f"{'met' if t['gptq_seconds_met'] else 'not met'} (compression loop), "
                     f"{'met' if t['gptq_wall_seconds_met'] else 'not met'} (whole call, with loading and saving).")
    gptq = results["runs"].get("gptq")
    if gptq:
        lines += ["", f"Seconds per block ({gptq['recipe']}): " + ", ".join(f"{b['seconds']:.2f}" for b in gptq["blocks"]) + "."]
    a = results["agreement"]
    lines.append("")
    if a.get("skipped"):
        lines.append("Agreement check: skipped.")
    else:
        ck = a["checks"]
        mark = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
        lines += [f"Agreement ({a['mode']}; tiny fp32 llama, hidden 64, 2 blocks, {a['recipe']}, "
                  f"{a['calibration']['nsamples']} x {a['calibration']['seqlen']} random tokens):", "",
                  "| check | value | threshold | result |", "|---|---|---|---|",
                  f"| masks equal | {a['masks_equal']} ({a['masks']} masks) | exact | {mark(ck['masks'])} |",
                  f"| fraction of equal codes | {a['codes_equal_fraction']:.6f} | >= "
                  f"{a['thresholds']['codes_equal_fraction_min']} | {mark(ck['codes'])} |",
                  f"| logits relative error | {a['logits_rel_error']:.2e} | <= "
                  f"{a['thresholds']['logits_rel_error_max']:g} | {mark(ck['logits'])} |"]
    lines += ["", f"Command: `{results['command']}`"]
    return "\n".join(lines)


def write_markdown(path: Path, body: str, name: str = "gpu") -> None:
    """Replace the text between <!-- BEGIN name --> and <!-- END name --> in ``path`` (append
    the section when it has none; create the file when it does not exist)."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    text = path.read_text() if path.is_file() else ""
    if begin in text and end in text.split(begin, 1)[1]:
        pre, rest = text.split(begin, 1)
        text = pre + block + rest.split(end, 1)[1]
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=None,
                    help="MLP width (default: Llama-3's rule, 3.5 x hidden for 4096 -> 14336)")
    ap.add_argument("--blocks", type=int, default=32)
    ap.add_argument("--heads", type=int, default=None, help="attention heads (default hidden / 128)")
    ap.add_argument("--kv-heads", type=int, default=None, help="KV heads (default heads / 4)")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="the model's storage dtype (computation follows slimkit's rule for the device)")
    ap.add_argument("--sparse-blocks", type=int, default=4, help="blocks of the sparsegpt-2of4-gptq-w4 run (0: none)")
    ap.add_argument("--low-memory", action="store_true", help="pass low_memory=True (stream blocks from disk)")
    ap.add_argument("--out", default=None, help="JSON results file (default: print the JSON to stdout)")
    ap.add_argument("--markdown", default=None, help="write the 'gpu' markdown section into this file")
    ap.add_argument("--skip-agreement", action="store_true")
    ap.add_argument("--work", default=None, help="folder for the temporary models (default: the system temp)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the temporary folder with every model and output (disk: about 3x the model)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    args.intermediate = args.intermediate or llama3_intermediate(args.hidden)
    args.heads = args.heads or max(1, args.hidden // 128)
    args.kv_heads = args.kv_heads or max(1, args.heads // 4)
    if min(args.blocks, args.nsamples, args.seqlen, args.vocab) < 1 or args.sparse_blocks < 0:
        ap.error("sizes must be positive")
    args.sparse_blocks = min(args.sparse_blocks, args.blocks)
    return args


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    import transformers

    import slimkit

    progress = not args.quiet
    if args.quiet:
        transformers.utils.logging.disable_progress_bar()
    command = "python benchmarks/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="slimkit-gpu-bench-", dir=args.work))
    results: dict = {
        "benchmark": "gpu", "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device, "device_name": device_name(device), "dtype": args.dtype,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "slimkit": slimkit.__version__,
                     "python": platform.python_version()},
        "host": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "command": command, "work": str(work),
    }
    drop = (lambda path: None) if args.keep else (lambda path: shutil.rmtree(path, ignore_errors=True))
    try:
        cfg = llama_config(args.hidden, args.intermediate, args.blocks, args.heads, args.kv_heads, args.vocab,
                           args.dtype, max_positions=max(8192, args.seqlen))
        shapes = tensor_shapes(cfg)
        block_params = sum(math.prod(v) for k, v in shapes.items() if k.startswith("model.layers.0."))
        model_bytes = sum(math.prod(v) for v in shapes.values()) * DTYPES[args.dtype].itemsize
        need = model_bytes + disk_estimate_bytes(model_bytes, block_params, args.blocks, args.nsamples, args.seqlen,
                                                 args.hidden, DTYPES[args.dtype].itemsize, args.low_memory)
        free = shutil.disk_usage(work).free
        results["disk"] = {"free_gb": free / 1e9, "estimated_peak_gb": need / 1e9}
        if need > free:
            log(f"WARNING: this run may need about {need / 1e9:.0f} GB of disk at its peak and {free / 1e9:.0f} GB are "
                f"free in {work}" + ("" if args.low_memory else
                                     "; --low-memory needs less (no block copies in the checkpoint)"))
        log(f"writing the random model ({args.blocks} blocks of hidden {args.hidden}) into {work}")
        full = write_model(work / "model", cfg, seed=args.seed)
        results["model"] = {"hidden": args.hidden, "intermediate": args.intermediate, "blocks": args.blocks,
                            "heads": args.heads, "kv_heads": args.kv_heads, "vocab": args.vocab, "dtype": args.dtype,
                            "params": full["params"], "block_params": full["block_params"], "bytes": full["bytes"],
                            "build_seconds": full["seconds"], "build_params_per_second": full["params"] / full["seconds"]}
        log(f"  {full['params'] / 1e9:.3f} B params, {full['bytes'] / GIB:.2f} GiB in {full['seconds']:.1f} s")
        calib = random_calibration(args.vocab, args.nsamples, args.seqlen, args.seed)
        results["calibration"] = {"source": "random tokens (torch.randint over the vocabulary)",
                                  "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed}
        block_bytes = full["block_params"] * 2
        act_bytes = args.nsamples * args.seqlen * args.hidden * 2 * ACTIVATION_BUFFERS
        bound = memory_bound_bytes(full["block_params"], args.nsamples, args.seqlen, args.hidden)
        results["targets"] = {"gpu_bound_mb": bound / MIB, "block_bytes": block_bytes, "activation_bytes": act_bytes,
                              "slack_bytes": SLACK_BYTES, "gptq_seconds_max": TARGET_GPTQ_SECONDS}
        results["runs"] = {}

        log(f"compressing with {GPTQ_RECIPE} on {device} ({results['device_name']})")
        run = compress_run(work / "model", GPTQ_RECIPE, work / "out-gptq", calib, device, args.dtype, args.seed,
                           progress, args.low_memory, bound)
        results["runs"]["gptq"] = run
        drop(work / "out-gptq")
        is_8b = (args.hidden, args.intermediate, args.blocks, args.heads, args.kv_heads, args.vocab) == \
            (4096, 14336, 32, 32, 8, 128256)
        if is_8b and device.startswith("cuda"):
            results["targets"]["gptq_seconds_met"] = run["compress_seconds"] <= TARGET_GPTQ_SECONDS
            results["targets"]["gptq_wall_seconds_met"] = run["wall_seconds"] <= TARGET_GPTQ_SECONDS
        log(f"  compress {run['compress_seconds']:.1f} s, whole call {run['wall_seconds']:.1f} s, "
            f"peak GPU {_mb(run['peak_gpu_mb'])} MiB (bound {bound / MIB:,.0f})")

        if args.sparse_blocks:
            small_cfg = llama_config(args.hidden, args.intermediate, args.sparse_blocks, args.heads, args.kv_heads,
                                     args.vocab, args.dtype, max_positions=max(8192, args.seqlen))
            small = write_model(work / "model-sparse", small_cfg, seed=args.seed, link_from=work / "model")
            drop(work / "model")  # the links keep the shards the small model uses
            results["model"]["sparse_blocks"] = args.sparse_blocks
            results["model"]["sparse_linked_shards"] = small["linked_shards"]
            log(f"compressing the first {args.sparse_blocks} blocks with {SPARSE_RECIPE}")
            run = compress_run(work / "model-sparse", SPARSE_RECIPE, work / "out-sparse", calib, device, args.dtype,
                               args.seed, progress, args.low_memory, bound)
            results["runs"]["sparse"] = run
            drop(work / "out-sparse")
            log(f"  compress {run['compress_seconds']:.1f} s, peak GPU {_mb(run['peak_gpu_mb'])} MiB")
        drop(work / "model")
        drop(work / "model-sparse")

        if args.skip_agreement:
            results["agreement"] = {"skipped": True, "passed": None}
        else:
            log("agreement check on a tiny model")
            results["agreement"] = agreement(work, device, args.seed, progress, drop)
    except BaseException as e:  # keep what was measured before the failure (a GPU run is costly)
        if args.out:
            import traceback
            results["error"] = "".join(traceback.format_exception(e))[-4000:]
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
            log(f"failed; what was measured so far is in {args.out}")
        raise
    finally:
        drop(work)
    passed = results["agreement"].get("passed") is not False
    results["passed"] = passed
    text = json.dumps(results, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    if args.markdown:
        write_markdown(Path(args.markdown), markdown(results))
    print(summary(results), file=sys.stderr, flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # a crash is not a failed agreement: exit code 2, like a usage error
        import traceback
        traceback.print_exc()
        sys.exit(2)
