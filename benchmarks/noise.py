"""The noise floor of docs/results.md: how far one recipe's perplexity and KL move with the
calibration draw alone and with the number of CPU threads alone -> section "noise".

    python benchmarks/noise.py                 # runs what is missing, then writes the section
    python benchmarks/noise.py --finished-only

The recipe is GPTQ W3 g64 (benchmarks/recipes/levers/, the quality frontier's "GPTQ today" row) and
its rotated, act-ordered, weighted-search form; their seeds 0, 1, 2 at this machine's default
thread count are the frontier's own runs (benchmarks/levers.py), and seed 0 is run again with
OMP_NUM_THREADS=1: the same calibration tokens, only the summation order of the matrix products
changes. The section states the larger relative spread as the floor under which a difference in
perplexity between two single runs on this model is a tie.
"""
from __future__ import annotations

import argparse
import statistics

from common import compress_run, finished, machine, row, write_section
from levers import recipe_file, tag

BUDGET = "w3g64"
RECIPES = {"gptq": "GPTQ W3 g64 (the built-in recipe today)",
           "rot-gptq-ao-ws": "rotate + GPTQ W3 g64 + act-order + weighted search (`rotate-gptq-w3-g64`)"}
SEEDS = (0, 1, 2)


def thread_tag(key: str, threads: int) -> str:
    return f"noise-{key}-{BUDGET}-s0-t{threads}"


def runs(key: str, run_missing: bool, threads_for: set[str]) -> tuple[list[dict], dict | None]:
    """(rows of seeds 0-2 at the default thread count, the row of seed 0 at 1 thread or None)."""
    recipe = recipe_file(BUDGET, key)
    by_seed = []
    for s in SEEDS:
        if run_missing or finished(None, tag(BUDGET, key, s)):
            r = compress_run(recipe, tag=tag(BUDGET, key, s), extra=["--seed", str(s)])
            by_seed.append(row(RECIPES[key], r) | {"seed": s, "threads": r["threads"]})
    one = None
    t1 = thread_tag(key, 1)
    if (run_missing and key in threads_for) or finished(None, t1):
        r = compress_run(recipe, tag=t1, extra=["--seed", "0"], env={"OMP_NUM_THREADS": "1"})
        one = row(RECIPES[key], r) | {"seed": 0, "threads": r["threads"]}
    return by_seed, one


def rel(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.mean(values)


def threads_note(results: dict) -> str:
    done = [RECIPES[k] for k, (_, one) in results.items() if one]
    return ("run for " + " and ".join(done)) if done else \
        "NOT yet run (`python benchmarks/noise.py` runs it: about 13 minutes on these 2 cores)"


def render(results: dict) -> str:
    every = [r for by_seed, one in results.values() for r in [*by_seed, *([one] if one else [])]]
    body = ["## Noise floor: the same recipe across calibration draws and thread counts (issue 16)", "",
            "SmolLM2-135M-Instruct (embedded default), the quality frontier's settings (128 x 512 calibration "
            "tokens, 16,384 evaluation tokens). Spread: (max - min) / mean over the runs compared. Seeds: the "
            "same command with `--seed 0/1/2` (other calibration windows). Threads: seed 0 again with "
            "OMP_NUM_THREADS=1 (the same windows; only the summation order of matrix products differs; the "
            "report and the resume fingerprint record the thread count, and the same seed and thread count "
            f"give the same bytes); {threads_note(results)}. Machine: {machine(every)}.", "",
            "Regenerate: `python benchmarks/noise.py` (the seed runs are the quality frontier's).", "",
            "| recipe | seed | threads | ppl | KL (nats/token) |", "|---|---|---|---|---|"]
    floors = []
    for key, (by_seed, one) in results.items():
        for r in by_seed:
            body.append(f"| {r['label']} | {r['seed']} | {r['threads']} | {r['ppl']:.2f} | {r['kl']:.4f} |")
        if one:
            body.append(f"| {one['label']} | 0 | {one['threads']} | {one['ppl']:.2f} | {one['kl']:.4f} |")
    body.append("")
    for key, (by_seed, one) in results.items():
        parts = []
        if len(by_seed) > 1:
            sp = rel([r["ppl"] for r in by_seed])
            floors.append(sp)
            parts.append(f"across {len(by_seed)} seeds {100 * sp:.1f}% of perplexity "
                         f"({100 * rel([r['kl'] for r in by_seed]):.1f}% of KL)")
        s0 = next((r for r in by_seed if r["seed"] == 0), None)
        if one and s0:
            sp = rel([s0["ppl"], one["ppl"]])
            floors.append(sp)
            parts.append(f"between 2 threads and 1 thread (seed 0) {100 * sp:.2f}% of perplexity")
        if parts:
            body.append(f"- {RECIPES[key]}: " + "; ".join(parts) + ".")
    if floors:
        body += ["", f"Noise floor: **{100 * max(floors):.1f}% of perplexity**, the largest spread above. On this "
                 "model, two single runs whose perplexities differ by less than that are a tie; the tables of "
                 "this document that have several seeds give their range, and a claim of one method over "
                 "another is made only when the ranges do not overlap."]
    return "\n".join(body)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--finished-only", action="store_true", help="run nothing; write the section from finished runs")
    ap.add_argument("--threads-for", nargs="*", default=["gptq"], choices=list(RECIPES),
                    help="recipes whose seed 0 is also run with 1 thread (default: gptq)")
    a = ap.parse_args()
    results = {key: runs(key, not a.finished_only, set(a.threads_for)) for key in RECIPES}
    write_section("noise", render(results))


if __name__ == "__main__":
    main()
