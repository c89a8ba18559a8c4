"""Export formats and the packed runtime on the embedded default model -> the "export" section
of docs/results.md.

    python benchmarks/export.py                     # RTN W4 g64 (data-free) and, if present, other runs
    python benchmarks/export.py --recipes rtn-w4-g64 slim

For each recipe: `slimkit compress default --recipe R --no-eval --nsamples 32` (reused if present), then every
export that can hold it; size on disk (fp16 original, fake-quant folder, each format), bits/weight
by part (`slimkit info`), and, each in a fresh process: peak RSS when loading, decode tokens/s at
batch 1 (greedy, KV cache, 64 new tokens after a 16-token prompt) and prefill tokens/s at 512 tokens,
for the dense fp32 model vs the packed runtime.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

from common import ROOT, RUNS, SLIMKIT, machine, write_section

MEASURE = r"""
import json, resource, sys, time, torch
kind, path = sys.argv[1], sys.argv[2]
t = time.perf_counter()
if kind == "dense":
    from slimkit.models import load_model
    model = load_model(path, with_tokenizer=False)[0]
else:
    import slimkit.pack as pk
    model = pk.load(path, mode="auto", head="int8" if kind == "packed-int8-head" else "exact")
load_s = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
model.config.use_cache = True
g = torch.Generator().manual_seed(0)
with torch.inference_mode():
    ids = torch.randint(0, model.config.vocab_size, (1, 512), generator=g)
    model(input_ids=ids[:, :32])
    t = time.perf_counter(); model(input_ids=ids); prefill = 512 / (time.perf_counter() - t)
    prompt = ids[:, :16]
    model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=True)
    t = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False, use_cache=True)
    decode = (out.shape[1] - 16) / (time.perf_counter() - t)
rss_run = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"load_s": load_s, "rss_mb": rss, "rss_run_mb": rss_run, "prefill_tps": prefill, "decode_tps": decode}))
"""


HEAD_COST = r"""
import json, sys, torch
from transformers import AutoTokenizer
from slimkit.data.sources import evaluation_ids
from slimkit.eval.perplexity import evaluate
from slimkit.pack import load
path = sys.argv[1]
windows = evaluation_ids("shakespeare:eval", AutoTokenizer.from_pretrained(path), 512, 4096)
exact = load(path)
r = evaluate(load(path, head="int8"), windows, exact, progress=False)
print(json.dumps({"ppl": r.ppl, "ppl_exact": r.ref_ppl, "kl": r.kl, "tokens": r.tokens}))
"""


def sh(*args) -> str:
    return subprocess.run(list(args), cwd=ROOT, check=True, capture_output=True, text=True).stdout


def run_json(script: str, *args: str) -> dict:
    """Run ``script`` in a fresh process; its last stdout line is a JSON object."""
    return json.loads(sh(sys.executable, "-c", script, *args).strip().splitlines()[-1])


def info(path) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    from slimkit.export.info import folder_info
    return folder_info(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", nargs="*", default=["rtn-w4-g64"])
    args = ap.parse_args()
    lines = ["## Export formats and packed inference (issue 6)", "",
             f"Machine: {machine()}. Regenerate: `python benchmarks/export.py --recipes {' '.join(args.recipes)}`.", "",
             "| recipe | format | size on disk (MiB) | vs fp16 model | compressed layers vs their fp16 | bits/weight by part |",
             "|---|---|---|---|---|---|"]
    speed = ["", "| recipe | runtime | peak RSS loading (MiB) | peak RSS after running (MiB) | load (s) | decode tok/s (batch 1) | prefill tok/s (512) |",
             "|---|---|---|---|---|---|---|"]
    dense_done = False
    costs = ["", "Cost of the int8 head (`slimkit generate DIR --head int8`, `slimkit.pack.load(DIR, head=\"int8\")`: "
             "the output head quantized per row to 8 bits at load; not part of the compressed model):", ""]
    for recipe in args.recipes:
        base = RUNS / f"export-{recipe}"
        if not (base / "slimkit.json").is_file():
            # 32 calibration sequences: sizes and speeds do not depend on how the codes were chosen
            sh(*SLIMKIT, "compress", "default", "--recipe", recipe, "--out", str(base), "--no-eval",
               "--nsamples", "32", "-q")
        outs = {"fake-quant (fp32)": base}
        for fmt in ("native", "compressed-tensors", "peft"):
            out = RUNS / f"export-{recipe}-{fmt}"
            if not out.exists():
                # paths from the root (the cwd), so that a refusal quoted in the table names no machine's folders
                r = subprocess.run([*SLIMKIT, "export", str(base.relative_to(ROOT)), "--format", fmt,
                                    "--out", str(out.relative_to(ROOT)), "-q"],
                                   cwd=ROOT, capture_output=True, text=True)
                if r.returncode:
                    lines.append(f"| {recipe} | {fmt} | — | — | — | {r.stderr.strip().removeprefix('slimkit: error: ')} |")
                    continue
            outs[fmt] = out
        nat = info(outs["native"]) if "native" in outs else None
        fp16 = nat["fp16_total_bytes"] if nat else None
        for label, path in outs.items():
            i = info(path)
            parts = ", ".join(f"{k} {v:.3f}" for k, v in i.get("bits_per_weight", i.get("nominal_bits_per_weight", {})).items())
            ratio_layers = f"{i['compressed_bytes'] / i['fp16_compressed_bytes']:.3f}x" if "compressed_bytes" in i else "—"
            vs = f"{i['disk_bytes'] / fp16:.3f}x" if fp16 else "—"
            lines.append(f"| {recipe} | {label} | {i['disk_bytes'] / 2**20:.1f} | {vs} | {ratio_layers} | {parts} |")
        if not dense_done:
            m = run_json(MEASURE, "dense", str(base))
            speed.append(f"| — | dense fp32 | {m['rss_mb']:.0f} | {m['rss_run_mb']:.0f} | {m['load_s']:.1f} | {m['decode_tps']:.1f} | {m['prefill_tps']:.0f} |")
            dense_done = True
        if "native" in outs:
            for kind, label in (("packed", "packed (native)"), ("packed-int8-head", "packed + int8 head")):
                m = run_json(MEASURE, kind, str(outs["native"]))
                speed.append(f"| {recipe} | {label} | {m['rss_mb']:.0f} | {m['rss_run_mb']:.0f} | {m['load_s']:.1f} | {m['decode_tps']:.1f} | {m['prefill_tps']:.0f} |")
            c = run_json(HEAD_COST, str(outs["native"]))
            costs.append(f"- {recipe}: ppl {c['ppl_exact']:.3f} -> {c['ppl']:.3f}, KL(exact head || int8 head) "
                         f"{c['kl']:.5f} nats/token on {c['tokens']:,} held-out tokens")
    if fp16:
        lines.insert(6, f"| — | fp16 original (computed: params x 2 bytes) | {fp16 / 2**20:.1f} | 1.000x | 1.000x | 16 |")
    write_section("export", "\n".join(lines + speed + costs))
    print("\n".join(lines + speed + costs))


if __name__ == "__main__":
    main()
