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


def _ppls(budget: str, key: str) -> list[float]:
    return [json.loads((REPORTS / f"{tag(budget, key, s)}.json").read_text())["eval"]["ppl"]
            for s in range(10) if finished(None, tag(budget, key, s))]


def findings(budget: str, peers: list[dict]) -> list[str]:
    """The best variant against today's GPTQ and the peer, as measured (ties when ranges overlap)."""
    ppl = {k: v for k in VARIANTS if (v := _ppls(budget, k))}
    if not ppl:
        return []
    best = min(ppl, key=lambda k: statistics.mean(ppl[k]))
    out = [f"Best here: {VARIANTS[best][0]}, mean perplexity {statistics.mean(ppl[best]):.2f} over "
           f"{len(ppl[best])} seed(s)."]
    compare = [(VARIANTS["gptq"][0].split(" (")[0] + " as built in today", ppl.get("gptq"))] if best != "gptq" else []
    if peers:
        compare.append(("llm-compressor's GPTQ", [p["eval"]["ppl"] for p in peers]))
    for label, other in compare:
        if not other:
            continue
        sep = max(ppl[best]) < min(other)
        one = min(len(ppl[best]), len(other)) < 2
        out.append(f"Against {label} ({statistics.mean(other):.2f} over {len(other)} seed(s)): "
                   f"{'lower in every seed' if sep else 'NOT lower in every seed'}"
                   f"{' (fewer than two seeds: not yet a finding)' if one else ''}.")
    return [" ".join(out), ""]


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
        "over the seeds run (range in brackets); differences inside the ranges are ties, and a row with one seed "
        "is one draw. Compress time: the engine's own total (calibration forwards included: RTN with the "
        "weighted search needs the calibration statistics, plain RTN does not), mean over seeds; the slimkit runs "
        "shared the 2 cores with short test runs now and then, so read their times as +-10%; llm-compressor's seed "
        "0 shared them with a llama-perplexity run for 2 of its 8.5 minutes (its other seeds ran alone). "
        "The peer row is llm-compressor run by "
        "`benchmarks/peer.py` on the same calibration token ids and scored by slimkit's evaluator on the same "
        f"windows (its own wall time of `oneshot`). Machine: {machine()}.",
        "",
        "Bits/weight count the compressed Linears (codes, fp16 scales, zero points). The rotation costs storage "
        "outside them on a model with tied embeddings whose final norm is not a constant, as this one: the head "
        "can no longer be the embedding matrix, so the checkpoint gains an untied head (49,152 x 576 = 28.3 M "
        "values in the dense dtype, +21% of this 135M model's parameters; negligible for a 7B+ model).",
        "",
        "Caveat for the W4 rows: the default model's weights were themselves dequantized from a Q4_1 GGUF (4-bit "
        "blocks of 32 with a float minimum), so unrotated weights already sit on a 4-bit grid that a W4 grid "
        "partly matches and a rotation destroys; W4 differences on this model say little about other models.",
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
            if key == "rot-gptq-ao-ws":
                label += f" (the built-in `rotate-gptq-w{BUDGETS[budget][0]}-g{BUDGETS[budget][1]}`)"
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
        body += findings(budget, peers)
    return "\n".join(body)


if __name__ == "__main__":
    main()
