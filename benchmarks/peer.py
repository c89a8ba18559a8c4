"""llm-compressor, side by side with slimkit on the same token ids (issue 15).

    python benchmarks/peer.py --configs gptq-w4-g64 --seeds 0     # one peer run (about 10 minutes here)

llm-compressor 0.14 pins transformers <= 5.17 and compressed-tensors 0.19, so it lives in its own
virtual environment under benchmarks/runs/peer/venv (torch 2.13.0 CPU installed first, then
llmcompressor 0.14.0.1). For each configuration and seed this script

1. makes the calibration windows with slimkit's own function and arguments (`calibration_ids`,
   source "shakespeare", 128 x 512 tokens, the seed): the token ids `slimkit compress` uses;
2. runs llm-compressor's `oneshot` on the dense default model in that environment, with those ids as
   its dataset (no shuffling, no truncation), its defaults otherwise (GPTQ: static act-order,
   damping 0.01, min-max observer; the "-imatrix" configurations use its importance-weighted
   `imatrix_mse` observer instead), lm_head left alone; records its wall time and peak RSS;
3. saves the result as a plain Hugging Face checkpoint (the fake-quantized weights, the dense
   model's config and tokenizer; checked to sit on the scheme's grid: at most 2^bits distinct values
   per row and group; with 2:4 sparsity, the share of groups of 4 that hold more than 2 non-zeros
   is recorded: llm-compressor 0.14's GPTQ does not keep SparseGPT's mask, and its error updates
   refill some pruned weights);
4. scores it with slimkit's own evaluator (`evaluate_model`: the 16,384 held-out tokens of the core
   table, windows of 512, KL against the dense model).

Reports go to benchmarks/reports/peer-<config>-s<seed>.json; benchmarks/levers.py puts them in its
tables next to slimkit's rows of the same grid. On the default model (576-wide Linears) group 128
does not divide the width and llm-compressor refuses it, so the peer runs groups of 64.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import REPORTS, RUNS

VENV = RUNS / "peer" / "venv"
PY = VENV / "bin" / "python"
LLMCOMPRESSOR = "llmcompressor==0.14.0.1"
THREADS = 2
NSAMPLES, SEQLEN, EVAL_TOKENS = 128, 512, 16384
# name -> (bits, group, symmetric, 2:4 sparsity first, weight observer: None for its default, min-max;
# "imatrix_mse", its importance-weighted range search (E[x^2] per input column), its best GPTQ lever)
CONFIGS = {
    "gptq-w4-g64": (4, 64, False, False, None),
    "gptq-w4-g64-sym": (4, 64, True, False, None),
    "gptq-w3-g64": (3, 64, False, False, None),
    "gptq-w2-g64": (2, 64, False, False, None),
    "gptq-w4-g64-imatrix": (4, 64, False, False, "imatrix_mse"),
    "gptq-w3-g64-imatrix": (3, 64, False, False, "imatrix_mse"),
    "gptq-w2-g64-imatrix": (2, 64, False, False, "imatrix_mse"),
    "sparsegpt-2of4-gptq-w4-g64": (4, 64, False, True, None),
}

CHILD = r"""
import json, resource, sys, time
import torch
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
from datasets import Dataset
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.pruning import SparseGPTModifier

ids = torch.load(a["ids"])
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
model = AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.float32)
keys = set(model.state_dict())
weights = {"num_bits": a["bits"], "type": "int", "symmetric": a["symmetric"], "strategy": "group",
           "group_size": a["group"]}
if a["observer"]:  # else its default (min-max)
    weights["observer"] = a["observer"]
recipe = []
if a["sparse"]:
    recipe.append(SparseGPTModifier(sparsity=0.5, mask_structure="2:4", targets=["Linear"], ignore=["lm_head"]))
recipe.append(GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"]))
t = time.perf_counter()
oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=ids.shape[1], num_calibration_samples=ids.shape[0],
        shuffle_calibration_samples=False, pipeline="sequential")
seconds = time.perf_counter() - t
sd = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k in keys}
if model.config.tie_word_embeddings:
    sd.pop("lm_head.weight", None)
worst = 0
for k, v in sd.items():
    if ".layers." in k and k.endswith("proj.weight"):
        g = v.reshape(v.shape[0], -1, a["group"])
        distinct = max(len(torch.unique(g[r, c])) for r in range(0, g.shape[0], 97) for c in range(g.shape[1]))
        worst = max(worst, distinct)
not_2of4 = total_groups = 0
if a["sparse"]:  # llm-compressor's GPTQ does not keep a mask: count the groups of 4 it refilled
    for k, v in sd.items():
        if ".layers." in k and k.endswith("proj.weight"):
            g = v.reshape(-1, 4)
            not_2of4 += int(((g != 0).sum(1) > 2).sum())
            total_groups += g.shape[0]
save_file(sd, a["out"] + "/model.safetensors", metadata={"format": "pt"})
print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "max_distinct_per_group": worst,
                  "not_2of4_fraction": not_2of4 / total_groups if total_groups else None}))
"""


def ensure_venv() -> str:
    if not PY.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(PY), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)  # the CPU build
        subprocess.run([str(PY), "-m", "pip", "install", "-q", LLMCOMPRESSOR], check=True)
    out = subprocess.run([str(PY), "-c", "import llmcompressor, transformers, compressed_tensors, torch; "
                          "print(llmcompressor.__version__, transformers.__version__, compressed_tensors.__version__, "
                          "torch.__version__)"], capture_output=True, text=True, check=True).stdout.splitlines()[-1].split()
    return f"llm-compressor {out[0]} (transformers {out[1]}, compressed-tensors {out[2]}, torch {out[3]})"


def run(config: str, seed: int, versions: str) -> dict:
    from slimkit.api import evaluate_model
    from slimkit.data import calibration_ids
    from slimkit.models.loading import load_tokenizer, resolve

    bits, group, sym, sparse, observer = CONFIGS[config]
    dense = resolve("default")[1]
    work = RUNS / "peer" / f"{config}-s{seed}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tok = load_tokenizer(dense)
    ids = calibration_ids("shakespeare", tok, NSAMPLES, SEQLEN, seed)
    torch.save(ids, work / "ids.pt")
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja"):
        if (Path(dense) / f).is_file():
            shutil.copy(Path(dense) / f, work / f)
    args = {"model": str(dense), "ids": str(work / "ids.pt"), "out": str(work), "bits": bits, "group": group,
            "symmetric": sym, "sparse": sparse, "observer": observer, "threads": THREADS}
    print(f"[{time.strftime('%H:%M:%S')}] llm-compressor {config} seed {seed}", flush=True)
    r = subprocess.run([str(PY), "-c", CHILD, json.dumps(args)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"llm-compressor {config} failed:\n{r.stderr[-4000:]}")
    child = json.loads(next(line for line in reversed(r.stdout.splitlines()) if line.startswith("{")))
    if child["max_distinct_per_group"] > 2 ** bits:
        raise SystemExit(f"llm-compressor's {config} weights are not on a {bits}-bit grid "
                         f"({child['max_distinct_per_group']} distinct values in a group)")
    ev = evaluate_model(str(work), "shakespeare:eval", reference="default", seqlen=SEQLEN, max_tokens=EVAL_TOKENS,
                        progress=False)
    report = {"peer": versions, "config": config, "bits": bits, "group_size": group, "symmetric": sym,
              "sparsity": "2:4" if sparse else None, "observer": observer, "seed": seed, "calibration": {"source": "shakespeare",
              "nsamples": NSAMPLES, "seqlen": SEQLEN, "seed": seed, "ids_sha": _digest(ids)},
              "eval": ev.get("eval", ev), "compress_seconds": child["seconds"], "peak_rss_mb": child["peak_rss_mb"],
              "max_distinct_per_group": child["max_distinct_per_group"],
              "not_2of4_fraction": child["not_2of4_fraction"],
              "command": f"python benchmarks/peer.py --configs {config} --seeds {seed}"}
    REPORTS.mkdir(parents=True, exist_ok=True)
    (REPORTS / f"peer-{config}-s{seed}.json").write_text(json.dumps(report, indent=1))
    (work / "model.safetensors").unlink()
    return report


def _digest(ids: torch.Tensor) -> str:
    from slimkit.calib.checkpoint import tensor_digest
    return tensor_digest(ids)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--fresh", action="store_true", help="run again even where a report exists")
    a = ap.parse_args()
    versions = ensure_venv()
    for seed in a.seeds:
        for config in a.configs:
            if (REPORTS / f"peer-{config}-s{seed}.json").is_file() and not a.fresh:
                continue
            rep = run(config, seed, versions)
            print(f"  ppl {rep['eval']['ppl']:.2f}  KL {rep['eval']['kl']:.4f}  {rep['compress_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
