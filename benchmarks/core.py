"""Core baselines on the embedded default model -> the "core" section of docs/results.md.

    python benchmarks/core.py            # reuses finished runs in benchmarks/runs/
    python benchmarks/core.py --fresh    # recompute everything

Every configuration runs as its own `slimkit compress` process (so time and peak RSS are
its own): 128 x 512 calibration tokens from the calibration plays, seed 0; evaluation on
the first 16,384 tokens of the held-out plays (Hamlet first), windows of 512.
"""
from __future__ import annotations

import argparse
import statistics

from common import (SEEDS, command_lines, compress_run, finished, machine, row, section_plot, seed_ppls,
                    shared_mark, shared_note, table, with_seeds, write_section)

CONFIGS = [
    ("RTN W4 per-channel (asym)", "rtn-w4-channel"),
    ("RTN W4 g64 (asym)", "rtn-w4-g64"),
    ("GPTQ W4 g64 (asym)", "gptq-w4-g64"),
    ("GPTQ W4 g128 (asym, ragged last group on 576 columns)", "gptq-w4-g128"),
    ("magnitude 2:4", "magnitude-2of4"),
    ("Wanda 2:4", "wanda-2of4"),
    ("SparseGPT 2:4", "sparsegpt-2of4"),
    ("magnitude 50%", "magnitude-50"),
    ("Wanda 50%", "wanda-50"),
    ("SparseGPT 50%", "sparsegpt-50"),
    ("SparseGPT 2:4 + GPTQ W4 g64 (joint)", "sparsegpt-2of4-gptq-w4"),
    ("Wanda 2:4 + RTN W4 g64", "wanda-2of4-rtn-w4"),
]


# runs whose wall time was taken while another job (the test suite, a smoke run) shared the 2 cores:
# recipe -> the day of that run (a later run of the recipe is not marked)
SHARED_MACHINE = {"wanda-2of4": "2026-11-24", "wanda-2of4-rtn-w4": "2026-11-24", "rtn-w4-channel": "2026-11-24",
                  "rtn-w4-g64": "2026-11-24"}

# the rows that claims rest on (GPTQ, the README's first command): also run with seeds 1 and 2
HEADLINE = ["gptq-w4-g64", "sparsegpt-2of4-gptq-w4"]

# what the claims rest on runs first; the table keeps the order above
PRIORITY = ["sparsegpt-2of4-gptq-w4", "magnitude-2of4", "sparsegpt-2of4", "wanda-2of4", "wanda-2of4-rtn-w4"]


def seed_note(joint: dict) -> list[str]:
    """What the README's first command prints (seed 0) against its seeds' spread."""
    if len(joint.get("seeds") or {}) < 2:
        return []
    ppl = seed_ppls(joint)
    return [f"The README's first command is the SparseGPT 2:4 + GPTQ W4 g64 row with seed 0: it prints "
            f"{joint['ppl']:.2f}. The same command with other calibration windows gives "
            + ", ".join(f"{p:.2f} (seed {s})" for s, (p, _) in sorted(joint["seeds"].items()) if s)
            + f": {100 * (max(ppl) - min(ppl)) / statistics.mean(ppl):.1f}% of perplexity between the draws, so a "
            f"difference of that size between two single-seed rows here is a tie.", ""]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--only", nargs="*", help="recipe names to (re)run")
    ap.add_argument("--finished-only", action="store_true",
                    help="run nothing; write the section from the runs already finished, naming the missing ones")
    args = ap.parse_args()
    order = sorted(CONFIGS, key=lambda c: PRIORITY.index(c[1]) if c[1] in PRIORITY else len(PRIORITY))
    reports = {}
    for label, recipe in order:
        if args.finished_only:
            if finished(recipe):
                reports[recipe] = compress_run(recipe)
            continue
        fresh = args.fresh or (args.only is not None and recipe in args.only)
        reports[recipe] = compress_run(recipe, fresh=fresh)
    rows = []
    for label, recipe in CONFIGS:
        if recipe in reports:
            r = row(label + shared_mark(recipe, reports[recipe], SHARED_MACHINE), reports[recipe])
            rows.append(with_seeds(r, recipe, run_missing=not args.finished_only, fresh=args.fresh)
                        if recipe in HEADLINE else r)
    missing = [label for label, recipe in CONFIGS if recipe not in reports]
    dense = {"label": "dense (fp32 weights, 16-bit accounting)", "ppl": rows[0]["dense_ppl"], "kl": 0.0,
             "bpw": 16.0, "time": None, "rss": None}
    joint = next(r for r in rows if "joint" in r["label"])
    t = joint["timings"]
    not_run = ([f"Not measured yet (the run was cut short; `python benchmarks/core.py` completes it): "
                f"{', '.join(missing)}.", ""] if missing else [])
    body = [
        "## Core baselines (issue 2)",
        "",
        f"SmolLM2-135M-Instruct (embedded default), all 210 Linears of the 30 blocks compressed; "
        f"calibration 128 x 512 tokens of the calibration plays (seed 0; the last column: the same command "
        f"with `--seed {' / '.join(map(str, SEEDS[1:]))}` last, other calibration windows, for the rows the "
        f"claims rest on); evaluation: 16,384 tokens of the "
        f"held-out plays, windows of 512. KL is KL(dense || compressed) per token. Bits/weight count "
        f"everything stored for the compressed Linears: codes, fp16 scales, zero points, and for sparse "
        f"layers the kept values plus 2-bit positions (2:4) or a 1-bit map (unstructured); pruned-only "
        f"layers keep fp16 values. Time is the compression itself (first-block capture to the last block, "
        f"without model loading, tokenization and evaluation); peak RSS is the whole `slimkit compress` "
        f"process up to the end of compression (model loading included). Machine: {machine(rows)}.",
        "",
        "Regenerate: `python benchmarks/core.py --fresh` (each row's command is listed below).",
        "",
        *section_plot("core", rows, rows[0]["dense_ppl"], "Core baselines"),
        table([dense] + rows),
        "",
        *not_run,
        *seed_note(joint),
        *shared_note(rows, SHARED_MACHINE),
        f"Where the time of SparseGPT 2:4 + GPTQ W4 went ({t['total']:.0f} s): "
        f"statistics forward (with Hessians) {t['stats_forward']:.0f} s, "
        f"OBS sweeps {t['stages']:.0f} s, next-input forward {t['next_forward']:.0f} s, "
        f"capture {t['capture']:.1f} s.",
        "",
        "Note: the default model's Linears were dequantized from GGUF Q4_1 (4-bit, groups of 32, a float "
        "minimum per group), so 4-bit grids aligned to groups of 32 are artificially easy on it; the rows above "
        "use per-channel grids and groups of 64/128, whose boundaries do not coincide with that structure.",
        "",
    ] + command_lines(rows)
    write_section("core", "\n".join(body))
    print(table([dense] + rows))


if __name__ == "__main__":
    main()
