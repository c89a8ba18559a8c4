"""The noise floor of docs/results.md: how far one recipe's perplexity and KL move with the
calibration draw alone and with the number of CPU threads alone -> section "noise".

    python benchmarks/noise.py                 # runs what is missing, then writes the section
    python benchmarks/noise.py --finished-only

The recipe is GPTQ W3 g64 (benchmarks/recipes/levers/, the quality frontier's "GPTQ today" row) and
its rotated, act-ordered, weighted-search form; their seeds 0, 1, 2 at this machine's default
thread count are the frontier's own runs (benchmarks/levers.py), and seed 0 is run again with
OMP_NUM_THREADS=1: the same calibration tokens, only the summation order of the matrix products
changes. The section states the larger relative spread as the floor under which a difference in
perplexity between two single runs on this model is a tie. Last, for every report that git holds an
older version of (same command, same recipe stages, another perplexity), where the two runs part
Linear by Linear and how far perplexity moved: code changes against floating-point order.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import core
import slim
import slim_llm
from common import (REPORTS, ROOT, SEEDS, committed_date, committed_versions, compress_run, finished, machine, row,
                    seed_tag, write_section)
from levers import recipe_file, tag

BUDGET = "w3g64"
RECIPES = {"gptq": "GPTQ W3 g64 (the built-in recipe today)",
           "rot-gptq-ao-ws": "rotate + GPTQ W3 g64 + act-order + weighted search (`rotate-gptq-w3-g64`)"}


def headline() -> list[tuple[str, str]]:
    """(label, run name) of the other sections' rows run on seeds 0, 1, 2: their scripts' HEADLINE rows
    (their runs; nothing is run here for them)."""
    return ([(f"{label} (`{r}`, core)", r) for label, r in core.CONFIGS if r in core.HEADLINE]
            + [(f"{label} (`{r}`, SLiM 2:4)", r) for label, r in slim.SETTINGS["2:4"] if r in slim.HEADLINE]
            + [(f"{label}, 32 x 512 calibration (`{r}`, SliM-LLM)", slim_llm.tag(r))
               for label, r, _, _ in slim_llm.configs() if r in slim_llm.HEADLINE])


def headline_runs() -> list[tuple[str, list[dict]]]:
    """(label, the reports of seeds 0, 1, 2) of each headline row whose three seeds are finished."""
    out = []
    for label, name in headline():
        paths = [REPORTS / f"{seed_tag(name, s)}.json" for s in SEEDS]
        if all(p.is_file() for p in paths):
            reports = [json.loads(p.read_text()) for p in paths]
            out.append((label, [r | {"date": r.get("date") or committed_date(p)} for r, p in zip(reports, paths)]))
    return out


def earlier_versions(path: Path, root: Path = ROOT) -> list[tuple[str, dict]]:
    """(its commit day, the report) of each committed version of a report that ran the same command and
    gave another perplexity than the file as it is now, oldest first (none: never committed, no git)."""
    now = json.loads(path.read_text())
    return [(day, then) for day, then in committed_versions(path, root)
            if isinstance(then, dict) and then.get("command") == now.get("command")
            and then.get("eval", {}).get("ppl") != now["eval"]["ppl"]]


def same_recipe(now: dict, then: dict) -> bool:
    """Whether two reports ran the same stages: each recipe as the current code reads it (options added
    since take their defaults), so a recipe redefined under the same name is told apart."""
    from slimkit.errors import RecipeError
    from slimkit.recipe import Recipe

    try:
        return Recipe.from_dict(now["recipe"]).to_dict()["stages"] == Recipe.from_dict(then["recipe"]).to_dict()["stages"]
    except (RecipeError, KeyError, TypeError):
        return False


def drift(now: dict, then: dict, threshold: float = 1e-3) -> dict | None:
    """How two runs of one command made by different code differ Linear by Linear: the relative difference
    of the first Linear's output error (its calibration inputs are the same in both runs), the largest of a
    block-0 Linear's, and the first block where some Linear's differs by more than ``threshold`` relative
    (None when the Linears are not the same list)."""
    a, b = now["compression"]["layers"], then["compression"]["layers"]
    if [x["name"] for x in a] != [y["name"] for y in b]:
        return None
    by_block: dict[str, float] = {}
    diffs = []
    for x, y in zip(a, b):
        block = next((part for part in x["name"].split(".") if part.isdigit()), "")
        diffs.append(abs(x["rel_error"] - y["rel_error"]) / max(abs(y["rel_error"]), 1e-30))
        by_block[block] = max(by_block.get(block, 0.0), diffs[-1])
    first = next(iter(by_block))
    return {"first": diffs[0], "block0": by_block[first],
            "first_over": next((int(k) for k, v in by_block.items() if v > threshold), None)}


def code_drift_rows() -> list[str]:
    """A table of the runs made again by later code with another perplexity: where the two runs part (the
    first Linear agreeing to rounding means the method's arithmetic did not change, only its order) and how
    far perplexity moved."""
    rows, redefined, order_only = [], [], []
    for path in sorted(REPORTS.glob("*.json")):
        report = json.loads(path.read_text())
        if not isinstance(report, dict) or "compression" not in report or "eval" not in report:
            continue
        versions = [(day, then, d) for day, then in earlier_versions(path) if (d := drift(report, then))]
        if not versions:
            continue
        same = [(day, then, d) for day, then, d in versions if same_recipe(report, then)]
        if not same:
            redefined.append(f"`{path.stem}` (first Linear {versions[-1][2]['first']:.0e})")
            continue
        day, then, d = same[0]
        new_day = report.get("date") or committed_date(path) or "not committed"
        moved = (report["eval"]["ppl"] - then["eval"]["ppl"]) / then["eval"]["ppl"]
        if d["first"] < 1e-7:
            order_only.append((abs(moved), path.stem))
        rows.append(f"| `{path.stem}` | {day}: {then['eval']['ppl']:.2f} | {new_day}: {report['eval']['ppl']:.2f} "
                    f"| {100 * moved:+.2f}% | {d['first']:.0e} | {d['block0']:.0e} | "
                    f"{'none' if d['first_over'] is None else d['first_over']} |")
    if not rows:
        return []
    return ["", "The same command run again by later code with the same recipe stages, where the perplexity is "
            "not the same float (against the oldest version of each report in git that ran the same command). "
            "Columns: the relative difference between the two runs' output error of the first Linear (block 0's "
            "first projection: its calibration inputs, the normed embeddings of the same tokens, are the same in both runs), the largest over "
            "block 0's Linears, and the first block where some Linear's differs by more than 0.1%. The first Linear "
            "sees the same inputs in both runs, so its difference is the arithmetic alone: about 1e-8 is summation "
            "order; the recipes that run the OBS sweep (GPTQ, SparseGPT) show 1e-6 to 1e-5 because commit a2fcc6e "
            "(2026-11-30, the device/dtype seam) inverts the sweep's Hessian in fp32 instead of fp64. A changed "
            "method moves the first Linear by far more"
            + (f" (recipes redefined under the same name since, left out here: {', '.join(redefined)})" if redefined else "")
            + "). A larger difference later in block 0 than in its first Linear is consistent with a rounding code "
            "or a 2:4 choice flipped at a near-tie. The difference then grows through the blocks (each block is calibrated on the "
            "outputs of the blocks before it), and the perplexity moves by an amount to compare with the recipe's "
            "seed spread above.", "",
            "| run | before | now | ppl moved | first Linear | block 0 | first block over 0.1% |",
            "|---|---|---|---|---|---|---|",
            *rows] + ([] if not order_only else [
                "", f"Where the first Linear agrees to better than 1e-7 (the same arithmetic in another summation order), "
                f"perplexity moved by up to {100 * max(order_only)[0]:.1f}% (`{max(order_only)[1]}`): one run of a "
                "recipe on this model is a draw, and the seed spreads above are the scale to judge a difference by."])


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
    every += [{"date": r.get("date")} for _, reports in headline_runs() for r in reports]
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
    heads = headline_runs()
    wide = []
    if heads:
        body += ["", "The other sections' headline rows, on the same three seeds (their own runs):", "",
                 "| recipe | ppl, seeds 0 / 1 / 2 | spread of ppl | spread of KL |", "|---|---|---|---|"]
        for label, reports in heads:
            ppl, kl = [r["eval"]["ppl"] for r in reports], [r["eval"]["kl"] for r in reports]
            wide.append((rel(ppl), label))
            body.append(f"| {label} | {' / '.join(f'{p:.2f}' for p in ppl)} | {100 * rel(ppl):.1f}% | "
                        f"{100 * rel(kl):.1f}% |")
    if floors:
        quant = max(floors)
        body += ["", f"Noise floor: **{100 * quant:.1f}% of perplexity** for 3-bit weight quantization "
                 "(the largest spread of the two recipes above)"
                 + (f"; larger for other recipes, up to **{100 * max(wide)[0]:.1f}%** ({max(wide)[1]}): each "
                    "table compares against the spread of its own rows" if wide and
                    max(wide)[0] > quant else "")
                 + ". On this model, two single runs whose perplexities differ by less than that are a tie; the "
                 "tables of this document that have several seeds give their range, and a claim of one method "
                 "over another is made only when the ranges do not overlap and the means differ by more than "
                 "either range."]
    body += code_drift_rows()
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
