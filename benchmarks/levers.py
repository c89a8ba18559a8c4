"""Quality levers of issue 15 on the embedded default model, over calibration seeds -> the
"quality frontier" section of docs/results.md (marker "levers").

    python benchmarks/levers.py                         # every budget, variant and seed (hours)
    python benchmarks/levers.py --budgets w3g64 --seeds 0 --variants gptq gptq-ao
    python benchmarks/levers.py --finished-only         # write the section from the finished runs

Each lever alone on GPTQ (and RTN), then together, at each budget: act-order with static groups,
the importance-weighted range search (weighted_search), and the rotate stage (a seeded random
Hadamard rotation of the residual stream and of each value head, fused into the weights). Every
run is its own `slimkit compress` process with the core table's settings (128 x 512 calibration
tokens of the calibration plays, 16,384 evaluation tokens of the held-out plays) and a calibration
seed; the table gives the mean over the seeds run and their range, so that differences inside the
range read as ties. At 2:4 + W4 the variants are SparseGPT + GPTQ with the levers, and SLiM+ (plain
and rotated) against the SLiM table's base. The recipes are YAML files in benchmarks/recipes/levers/ (written by this script).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml
from common import REPORTS, RESULTS, ROOT, compress_run, finished, machine, row, verdict, write_section

RECIPES = ROOT / "benchmarks" / "recipes" / "levers"
# name -> (bits, group, symmetric), in the order of the section
BUDGETS = {"w4g128": (4, 128, False), "w4g128sym": (4, 128, True), "w4g64": (4, 64, False), "w3g128": (3, 128, False),
           "w3g64": (3, 64, False), "w2g64": (2, 64, False), "2of4-w4g64": (4, 64, False)}
SPARSE = {"2of4-w4g64"}  # 2:4 sparsity + 4-bit weights: its own variants (SPARSE_VARIANTS)
ROT = {"method": "rotate", "kind": "hadamard", "seed": 0}
SP = {"method": "sparsegpt", "sparsity": "2:4"}
# key -> (label, stages given bits and group)
VARIANTS = {
    "rtn": ("RTN", lambda b, g: [{"method": "rtn", "bits": b, "group_size": g}]),
    "rtn-ws": ("RTN + weighted range search", lambda b, g: [{"method": "rtn", "bits": b, "group_size": g,
                                                              "weighted_search": True}]),
    "rot-rtn": ("rotate + RTN", lambda b, g: [ROT, {"method": "rtn", "bits": b, "group_size": g}]),
    "gptq": ("GPTQ (the built-in recipe today)", lambda b, g: [{"method": "gptq", "bits": b, "group_size": g,
                                                              "actorder": False}]),
    "gptq-ao": ("GPTQ + act-order (static groups)", lambda b, g: [{"method": "gptq", "bits": b, "group_size": g,
                                                                   "actorder": True}]),
    "gptq-ws": ("GPTQ + weighted range search", lambda b, g: [{"method": "gptq", "bits": b, "group_size": g,
                                                               "actorder": False, "weighted_search": True}]),
    "gptq-ao-ws": ("GPTQ + act-order + weighted search (no rotation: llm-compressor's imatrix_mse GPTQ, in slimkit)",
                   lambda b, g: [{"method": "gptq", "bits": b, "group_size": g, "actorder": True,
                                  "weighted_search": True}]),
    "gptq-ao-ws3": ("GPTQ + act-order + weighted search scored by |e|^3 (llm-compressor's imatrix_mse exponent)",
                    lambda b, g: [{"method": "gptq", "bits": b, "group_size": g, "actorder": True,
                                   "weighted_search": True, "search_norm": 3}]),
    "gptq-ao-ws3-dt": ("GPTQ + act-order + weighted search |e|^3 + dense target (GPTAQ's asymmetric calibration, "
                       "a quarter of the correction as its reference code)",
                       lambda b, g: [{"method": "gptq", "bits": b, "group_size": g, "actorder": True,
                                      "weighted_search": True, "search_norm": 3, "dense_target": True,
                                      "dense_alpha": 0.25}]),
    "rot-gptq": ("rotate + GPTQ", lambda b, g: [ROT, {"method": "gptq", "bits": b, "group_size": g, "actorder": False}]),
    "rot-gptq-ao-ws": ("rotate + GPTQ + act-order + weighted search",
                       lambda b, g: [ROT, {"method": "gptq", "bits": b, "group_size": g, "actorder": True,
                                           "weighted_search": True}]),
    "rot-gptq-ao-ws3": ("rotate + GPTQ + act-order + weighted search scored by |e|^3",
                        lambda b, g: [ROT, {"method": "gptq", "bits": b, "group_size": g, "actorder": True,
                                            "weighted_search": True, "search_norm": 3}]),
    "rot-gptq-ao-ws3-dt": ("rotate + GPTQ + act-order + weighted search |e|^3 + dense target",
                           lambda b, g: [ROT, {"method": "gptq", "bits": b, "group_size": g, "actorder": True,
                                               "weighted_search": True, "search_norm": 3, "dense_target": True,
                                               "dense_alpha": 0.25}]),
}

# 2:4 + W4: key -> (label, stages given bits and group, or the built-in recipe it is)
SPARSE_VARIANTS = {
    "sgpt": ("SparseGPT 2:4 + GPTQ W4 g64 (the built-in `sparsegpt-2of4-gptq-w4`)", "sparsegpt-2of4-gptq-w4"),
    "sgpt-ws": ("SparseGPT 2:4 + GPTQ W4 g64 + weighted range search",
                lambda b, g: [SP | {"bits": b, "group_size": g, "weighted_search": True}]),
    "rot-sgpt-ws": ("rotate + SparseGPT 2:4 + GPTQ W4 g64 + weighted range search",
                    lambda b, g: [ROT, SP | {"bits": b, "group_size": g, "weighted_search": True}]),
    "sgpt-g128s": ("SparseGPT 2:4 + GPTQ W4 g128 sym (the SLiM table's base, `sparsegpt-gptq`)", "sparsegpt-gptq"),
    "slim-plus": ("SLiM+ (the built-in `slim-plus`: that base with the weighted range search + 4-bit low-rank "
                  "adapters, 4 alternating rounds of adapters and base, the mask re-chosen)", "slim-plus"),
    "rot-slim-plus": ("rotate + SLiM+ with weighted range search (the built-in `rotate-slim-plus`)", "rotate-slim-plus"),
}


def variants(budget: str) -> dict:
    return SPARSE_VARIANTS if budget in SPARSE else VARIANTS


def recipe_file(budget: str, key: str) -> str:
    """The recipe of a variant: a built-in name, or a YAML file of benchmarks/recipes/levers/ (path from the root)."""
    label, stages = variants(budget)[key]
    if isinstance(stages, str):
        return stages
    b, g, sym = BUDGETS[budget]
    name = f"{key}-w{b}-g{g}{'-sym' if sym else ''}"
    path = RECIPES / f"{name}.yaml"
    listed = [st | {"symmetric": True} if sym and "bits" in st else st for st in stages(b, g)]
    text = yaml.dump({"name": name, "description": f"{label}, {grid(budget)}",
                      "ignore": ["re:.*[.](gate|router|shared_expert_gate)$"], "stages": listed},
                     sort_keys=False)
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(path.relative_to(ROOT))


# key -> the built-in recipe with the same stages, given bits, group and "-sym" for a symmetric grid
TWINS = {"rot-gptq-ao-ws": "rotate-gptq-w{b}-g{g}{sym}", "gptq-ao-ws3-dt": "gptaq-w{b}-g{g}{sym}"}


def builtin_twin(budget: str, key: str) -> str | None:
    """The built-in recipe whose stages are this variant's at this budget (None if there is none); a
    twin whose stages differ from the variant's is an error, so a label never names the wrong recipe."""
    b, g, sym = BUDGETS[budget]
    if key not in TWINS or budget in SPARSE:
        return None
    from slimkit.recipe import Recipe, builtin_recipes, load_recipe

    name = TWINS[key].format(b=b, g=g, sym="-sym" if sym else "")
    if name not in builtin_recipes():
        return None
    ours = Recipe.from_yaml(ROOT / recipe_file(budget, key))
    if ours.to_dict()["stages"] != load_recipe(name).to_dict()["stages"]:
        raise SystemExit(f"levers.py: variant {key} at {budget} no longer has the stages of the built-in {name}")
    return name


def grid(budget: str) -> str:
    b, g, sym = BUDGETS[budget]
    return f"W{b} g{g} {'symmetric' if sym else 'asymmetric'}"


def tag(budget: str, key: str, seed: int) -> str:
    """A run's name; a built-in recipe's seed-0 run is the one the core and SLiM sections made."""
    recipe = variants(budget)[key][1]
    if isinstance(recipe, str):
        return recipe if seed == 0 else f"{recipe}-s{seed}"
    return f"levers-{key}-{budget}-s{seed}"


def spread(values: list[float], digits: int = 2) -> str:
    """The mean, and the range in brackets when there are several values."""
    f = f"{{:.{digits}f}}"
    if len(values) == 1:
        return f.format(values[0])
    return f"{f.format(statistics.mean(values))} ({f.format(min(values))}–{f.format(max(values))})"


def runs_of(budget: str) -> dict[str, list[dict]]:
    """key -> the rows (common.row) of every finished seed of that variant at this budget."""
    out = {}
    for key, (label, _) in variants(budget).items():
        rs = [row(label, compress_run(recipe_file(budget, key), tag=tag(budget, key, s))) | {"seed": s}
              for s in range(10) if finished(None, tag(budget, key, s))]
        if rs:
            out[key] = rs
    return out


def peer_configs(budget: str) -> dict[str, str]:
    """benchmarks/peer.py configuration -> what it runs, for this budget."""
    b, g, sym = BUDGETS[budget]
    if g == 128 or sym:  # it refuses groups of 128 on 576 columns; its symmetric W4 is not in peer.py's runs
        return {}
    if budget in SPARSE:
        return {f"sparsegpt-2of4-gptq-w{b}-g{g}": "SparseGPT 2:4 then GPTQ (its defaults: static act-order, min-max"}
    return {f"gptq-w{b}-g{g}": "GPTQ (its defaults: static act-order, min-max",
            f"gptq-w{b}-g{g}-imatrix": "GPTQ (with its importance-weighted range search, observer imatrix_mse"}


def peer_runs(budget: str) -> dict[str, list[dict]]:
    out = {}
    for config in peer_configs(budget):
        reports = [json.loads(p.read_text()) for p in sorted(REPORTS.glob(f"peer-{config}-s*.json"))]
        if reports:
            out[config] = reports
    return out


def at_peer_bits(budget: str, runs: dict[str, list[dict]]) -> tuple[str, float | None, list[str]]:
    """(today's recipe on the peer's grid, its bits/weight or None when not run, the variants at no
    more bits/weight than it)."""
    same = "sgpt" if budget in SPARSE else "gptq"
    limit = runs[same][0]["bpw"] if same in runs else None
    return same, limit, [k for k, rs in runs.items() if limit is None or rs[0]["bpw"] <= limit + 1e-9]


def findings(budget: str, runs: dict[str, list[dict]], peers: dict[str, list[dict]]) -> list[str]:
    """The best variant at no more bits/weight than the peer's grid, against today's recipe and the
    peer: seed by seed on the seeds both ran, and a win only with two seeds or more, ranges that do not
    overlap and a difference of the means larger than either range; for 2:4 + W4, the gap to
    dense that SLiM+ and its rotated form close over the SLiM table's base."""
    if not runs:
        return []
    same, limit, keys = at_peer_bits(budget, runs)
    ppl = {k: [r["ppl"] for r in runs[k]] for k in keys}
    by_seed = {k: {r["seed"]: r["ppl"] for r in runs[k]} for k in keys}
    label = {k: v[0] for k, v in variants(budget).items()}
    best = min(ppl, key=lambda k: statistics.mean(ppl[k]))
    twin = builtin_twin(budget, best)
    out = [f"Best here{f' at no more than {limit:.3f} bits/weight' if limit else ''}: {label[best]}"
           f"{f' (the built-in `{twin}`)' if twin else ''}, mean "
           f"perplexity {statistics.mean(ppl[best]):.2f} over {len(ppl[best])} seed(s)."]
    compare = [(label[same].split(" (")[0] + " as built in today", by_seed.get(same))] if best != same else []
    for config, reports in peers.items():
        compare.append((f"llm-compressor's {peer_configs(budget)[config].split(' (')[0].split(' with')[0]}"
                        f"{' + imatrix_mse' if config.endswith('-imatrix') else ''}",
                        {p["seed"]: p["eval"]["ppl"] for p in reports}))
    for name, other_by_seed in compare:
        if not other_by_seed:
            continue
        other = list(other_by_seed.values())
        common = sorted(set(by_seed[best]) & set(other_by_seed))
        pairwise = bool(common) and all(by_seed[best][s] < other_by_seed[s] for s in common)
        why = verdict(ppl[best], other)
        seeds = ",".join(map(str, common))
        out.append(f"Against {name} ({statistics.mean(other):.2f} over {len(other)} seed(s)): "
                   f"{'lower' if pairwise else 'NOT lower'} on {'each common seed' if len(common) > 1 else 'the common seed'} "
                   f"({seeds or 'none'}); {why}.")
    lines = [" ".join(out), ""]
    if budget in SPARSE and "sgpt-g128s" in runs:
        dense = runs["sgpt-g128s"][0]["dense_ppl"]
        base = statistics.mean(r["ppl"] for r in runs["sgpt-g128s"])
        for k in ("slim-plus", "rot-slim-plus"):
            if k in runs:
                m = statistics.mean(r["ppl"] for r in runs[k])
                lines += [f"Gap to dense closed by {label[k].split(' (')[0]} over SparseGPT + GPTQ W4 g128 sym "
                          f"(mean {base:.2f}, dense {dense:.2f}): {(base - m) / (base - dense):+.2f} at "
                          f"{runs[k][0]['bpw']:.3f} bits/weight (the issue's target: +0.75).", ""]
    return lines


PLOT = ROOT / "docs" / "img" / "frontier.png"


def frontier_plot(path: Path, runs_by_budget: dict[str, dict[str, list[dict]]]) -> bool:
    """KL to dense at each budget (a point per series, seed range as error bars, log scale): today's
    built-in recipe, slimkit's best variant at no more bits than the peer's grid, and llm-compressor's
    best configuration. False when nothing is finished."""
    from slimkit.eval.plots import _pyplot

    groups, bars = [], {"slimkit today (GPTQ / SparseGPT+GPTQ)": [], "slimkit best at the same bits": [],
                        "llm-compressor, best configuration": []}
    for budget, runs in runs_by_budget.items():
        same, limit, keys = at_peer_bits(budget, runs)
        if limit is None:
            continue
        kl = {k: [r["kl"] for r in runs[k]] for k in keys}
        best = min(kl, key=lambda k: statistics.mean(kl[k]))
        peers = {c: [p["eval"]["kl"] for p in rs] for c, rs in peer_runs(budget).items()}
        peer = min(peers.values(), key=statistics.mean) if peers else None
        b, g, sym = BUDGETS[budget]
        groups.append(f"{'2:4 + ' if budget in SPARSE else ''}W{b} g{g}{' sym' if sym else ''}\n{limit:.3f}\nbits/weight")
        for key, values in zip(bars, (kl[same], kl[best], peer)):
            bars[key].append(values)
    if not groups:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(8.0, 1.3 * len(groups)), 4.8), dpi=100)
    width = 0.8 / len(bars)
    for j, (label, per_group) in enumerate(bars.items()):
        xs = [i + (j - 1) * width for i, v in enumerate(per_group) if v]
        vs = [v for v in per_group if v]
        means = [statistics.mean(v) for v in vs]
        err = [[m - min(v) for m, v in zip(means, vs)], [max(v) - m for m, v in zip(means, vs)]]
        ax.errorbar(xs, means, yerr=err, fmt="os^"[j], markersize=7, capsize=4, linestyle="none", label=label)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("KL(dense || compressed), nats/token (log)")
    ax.set_title("Default model: mean over the seeds run (error bars: their range)", fontsize=9)
    ax.grid(True, which="both", axis="y", alpha=0.3)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    ap.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS) + list(SPARSE_VARIANTS),
                    help="default: every variant of each budget (a name a budget lacks is skipped)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--finished-only", action="store_true", help="run nothing; write the section from finished runs")
    a = ap.parse_args()
    for budget in a.budgets:
        for seed in a.seeds:
            for key in a.variants or list(variants(budget)):
                if key in variants(budget) and not a.finished_only:
                    compress_run(recipe_file(budget, key), tag=tag(budget, key, seed), extra=["--seed", str(seed)])
    write_section("levers", render())


def render() -> str:
    runs_by_budget = {budget: runs_of(budget) for budget in BUDGETS}
    every = [r for runs in runs_by_budget.values() for rs in runs.values() for r in rs]
    body = [
        "## Quality frontier: levers and a peer at each budget (issue 15)",
        "",
        "SmolLM2-135M-Instruct (embedded default), all 210 Linears; calibration 128 x 512 tokens of the "
        "calibration plays with the seed given; evaluation 16,384 tokens of the held-out plays, windows of 512; "
        "KL is KL(dense || compressed) per token against the original (unrotated) dense model. Each cell: mean "
        "over the seeds run (range in brackets); differences inside the ranges are ties, and a row with one seed "
        "is one draw. Compress time: the engine's own total (calibration forwards included: RTN with the "
        "weighted search needs the calibration statistics, plain RTN does not), mean over seeds; some runs of both "
        "tools shared the 2 cores with test runs or a llama-perplexity run for part of their time (up to about 2x "
        "slower), so compare times only roughly. "
        "The peer row is llm-compressor run by "
        "`benchmarks/peer.py` on the same calibration token ids and scored by slimkit's evaluator on the same "
        f"windows (its own wall time of `oneshot`). Machine: {machine(every)}.",
        "",
        "The 2:4 + W4 rows named after a built-in recipe reuse, for seed 0, the run of the core or SLiM section (the "
        "same command; its time was taken as that section says). "
        "Bits/weight count the compressed Linears (codes, fp16 scales, zero points; for 2:4 the kept values' "
        "2-bit positions; for SLiM+ its 4-bit adapters with their scales). The rotation costs storage "
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
    if frontier_plot(PLOT, runs_by_budget):
        body += [f"![KL to dense at each budget: slimkit today, slimkit's best, llm-compressor's best]"
                 f"({PLOT.relative_to(RESULTS.parent).as_posix()})", ""]
    dense_ppl = None
    for budget in BUDGETS:
        rows = []
        runs = runs_by_budget[budget]
        for key, rs in runs.items():
            label = variants(budget)[key][0]
            dense_ppl = rs[0]["dense_ppl"]
            name = builtin_twin(budget, key)
            if name:
                label += f" (the built-in `{name}`)"
            label = label.replace("|", "\\|")  # |e|^3 inside a table cell
            rows.append(f"| {label} | {','.join(str(r['seed']) for r in rs)} | {spread([r['ppl'] for r in rs])} | "
                        f"{spread([r['kl'] for r in rs], 4)} | {rs[0]['bpw']:.3f} | "
                        f"{statistics.mean(r['time'] for r in rs):.0f} |")
        peers = peer_runs(budget)
        for config, reports in peers.items() if rows else ():
            what = peer_configs(budget)[config] + "; same windows; `benchmarks/peer.py`)"
            refilled = [p["not_2of4_fraction"] for p in reports if p.get("not_2of4_fraction") is not None]
            if refilled:
                share = " to ".join(sorted({f"{100 * v:.1f}" for v in (min(refilled), max(refilled))}))
                what += (f": NOT strictly 2:4, its GPTQ keeps no mask and its updates refill {share}% of the "
                         "groups of 4 with a third or fourth non-zero")
            rows.append(f"| {reports[0]['peer'].split(' (')[0]} {what} | {','.join(str(p['seed']) for p in reports)} | "
                        f"{spread([p['eval']['ppl'] for p in reports])} | "
                        f"{spread([p['eval']['kl'] for p in reports], 4)} | "
                        f"same grid as {'SparseGPT 2:4 + GPTQ W4 g64' if budget in SPARSE else 'GPTQ'} | "
                        f"{statistics.mean(p['compress_seconds'] for p in reports):.0f} |")
        if not rows:
            continue
        title = f"2:4 sparsity + {grid(budget)}" if budget in SPARSE else grid(budget)
        body += [f"### {title} (dense ppl {dense_ppl:.2f})", "",
                 "| variant | seeds | ppl | KL (nats/token) | bits/weight | compress time (s) |",
                 "|---|---|---|---|---|---|", *rows, ""]
        if not peer_configs(budget):
            body += ["No llm-compressor row: it refuses groups of 128 on this model's 576-wide Linears (its "
                     "divisibility check), and `benchmarks/peer.py` runs its groups of 64 only.", ""]
        body += findings(budget, runs, peers)
    return "\n".join(body)


if __name__ == "__main__":
    main()
