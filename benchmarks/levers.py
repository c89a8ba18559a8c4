"""Quality levers of issue 15 on the embedded default model, over calibration seeds -> the
"quality levers" section of docs/results.md.

    python benchmarks/levers.py                         # every budget, variant and seed (hours)
    python benchmarks/levers.py --budgets w3g64 --seeds 0 --variants gptq gptq-ao
    python benchmarks/levers.py --finished-only         # write the section from the finished runs

Each lever alone on GPTQ (and RTN), then together, at one budget: act-order with static groups,
the importance-weighted range search (weighted_search), and the rotate stage (a seeded random
Hadamard rotation of the residual stream and of each value head, fused into the weights). Every
run is its own `slimkit compress` process with the core table's settings (128 x 512 calibration
tokens of the calibration plays, 16,384 evaluation tokens of the held-out plays) and a calibration
seed; the table gives the mean over the seeds run and their range, so that differences inside the
range read as ties. The recipes are YAML files in benchmarks/recipes/levers/ (written by this script).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml
from common import REPORTS, ROOT, compress_run, finished, machine, row, write_section

RECIPES = ROOT / "benchmarks" / "recipes" / "levers"
BUDGETS = {"w4g64": (4, 64), "w3g64": (3, 64), "w2g64": (2, 64)}
ROT = {"method": "rotate", "kind": "hadamard", "seed": 0}
# key -> (label, stages given bits and group)
VARIANTS = {
    "rtn": ("RTN", lambda b, g: [{"method": "rtn", "bits": b, "group_size": g}]),
    "rtn-ws": ("RTN + weighted range search", lambda b, g: [{"method": "rtn", "bits": b, "group_size": g,
                                                              "weighted_search": True}]),
    "rot-rtn": ("rotate + RTN", lambda b, g: [ROT, {"method": "rtn", "bits": b, "group_size": g}]),
    "gptq": ("GPTQ (the built-in recipe today)", lambda b, g: [{"method": "gptq", "bits": b, "group_size": g}]),
    "gptq-ao": ("GPTQ + act-order (static groups)", lambda b, g: [{"method": "gptq", "bits": b, "group_size": g,
                                                                   "actorder": True}]),
    "gptq-ws": ("GPTQ + weighted range search", lambda b, g: [{"method": "gptq", "bits": b, "group_size": g,
                                                               "weighted_search": True}]),
    "rot-gptq": ("rotate + GPTQ", lambda b, g: [ROT, {"method": "gptq", "bits": b, "group_size": g}]),
    "rot-gptq-ao-ws": ("rotate + GPTQ + act-order + weighted search",
                       lambda b, g: [ROT, {"method": "gptq", "bits": b, "group_size": g, "actorder": True,
                                           "weighted_search": True}]),
}


def recipe_file(budget: str, key: str) -> Path:
    b, g = BUDGETS[budget]
    name = f"{key}-w{b}-g{g}"
    path = RECIPES / f"{name}.yaml"
    text = yaml.dump({"name": name, "description": f"{VARIANTS[key][0]}, W{b} g{g} asymmetric",
                      "ignore": ["re:.*[.](gate|router|shared_expert_gate)$"], "stages": VARIANTS[key][1](b, g)},
                     sort_keys=False)
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path


def tag(budget: str, key: str, seed: int) -> str:
    return f"levers-{key}-{budget}-s{seed}"


def spread(values: list[float], digits: int = 2) -> str:
    """The mean, and the range in brackets when there are several values."""
    f = f"{{:.{digits}f}}"
    if len(values) == 1:
        return f.format(values[0])
    return f"{f.format(statistics.mean(values))} ({f.format(min(values))}–{f.format(max(values))})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--finished-only", action="store_true", help="run nothing; write the section from finished runs")
    a = ap.parse_args()
    for budget in a.budgets:
        for seed in a.seeds:
            for key in a.variants:
                path = recipe_file(budget, key)
                if not a.finished_only:
                    compress_run(str(path.relative_to(ROOT)), tag=tag(budget, key, seed), extra=["--seed", str(seed)])
    write_section("levers", render())


def render() -> str:
    body = [
        "## Quality levers: act-order, weighted range search, rotation (issue 15)",
        "",
        "SmolLM2-135M-Instruct (embedded default), all 210 Linears; calibration 128 x 512 tokens of the "
        "calibration plays with the seed given; evaluation 16,384 tokens of the held-out plays, windows of 512; "
        "KL is KL(dense || compressed) per token against the original (unrotated) dense model. Each cell: mean "
        "over the seeds run (range in brackets); differences inside the ranges are ties. Compress time: the "
        "engine's own total, mean over seeds, each run alone on the machine. "
        f"Machine: {machine()}.",
        "",
        "Regenerate: `python benchmarks/levers.py` (recipes in benchmarks/recipes/levers/).",
        "",
    ]
    dense_ppl = None
    for budget in BUDGETS:
        rows = []
        for key, (label, _) in VARIANTS.items():
            runs = [compress_run(str(recipe_file(budget, key).relative_to(ROOT)), tag=tag(budget, key, s))
                    for s in range(10) if finished(None, tag(budget, key, s))]
            if not runs:
                continue
            rs = [row(label, r) for r in runs]
            dense_ppl = rs[0]["dense_ppl"]
            seeds = [r["calibration"]["seed"] for r in runs]
            rows.append(f"| {label} | {','.join(map(str, seeds))} | {spread([r['ppl'] for r in rs])} | "
                        f"{spread([r['kl'] for r in rs], 4)} | {rs[0]['bpw']:.3f} | "
                        f"{statistics.mean(r['time'] for r in rs):.0f} |")
        b, g = BUDGETS[budget]
        peers = [json.loads(p.read_text()) for p in sorted(REPORTS.glob(f"peer-gptq-w{b}-g{g}-s*.json"))]
        if peers and rows:
            p0 = peers[0]
            rows.append(f"| {p0['peer'].split(' (')[0]} GPTQ (its defaults: static act-order, min-max; same windows; "
                        f"`benchmarks/peer.py`) | {','.join(str(p['seed']) for p in peers)} | "
                        f"{spread([p['eval']['ppl'] for p in peers])} | {spread([p['eval']['kl'] for p in peers], 4)} | "
                        f"same grid as GPTQ | {statistics.mean(p['compress_seconds'] for p in peers):.0f} |")
        if not rows:
            continue
        body += [f"### W{b} g{g} asymmetric (dense ppl {dense_ppl:.2f})", "",
                 "| variant | seeds | ppl | KL (nats/token) | bits/weight | compress time (s) |",
                 "|---|---|---|---|---|---|", *rows, ""]
    return "\n".join(body)


if __name__ == "__main__":
    main()
