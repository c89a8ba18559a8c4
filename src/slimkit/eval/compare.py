"""`slimkit compare RUN_DIR... --out DIR`: a table and a plot of quality against bits/weight for
any set of `slimkit compress` runs, the dense model and the Pareto front marked."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import SlimkitError, first_line
from .plots import COMPARE_PLOT, compare_plot, pareto

log = logging.getLogger(__name__)

METRICS = {"ppl": "perplexity", "kl": "KL(dense || compressed), nats/token"}
TABLE = "compare.md"


def read_run(directory: str | Path, metric: str) -> dict:
    """The report of one run, checked: one SlimkitError line when the folder is not a finished
    slimkit run or lacks the metric."""
    d = Path(directory).expanduser()
    path = d / "report.json"
    if not d.is_dir():
        raise SlimkitError(f"{str(d)!r} is not a folder")
    if not path.is_file():
        raise SlimkitError(f"{str(d)!r} is not a slimkit run (no report.json)")
    try:
        r = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SlimkitError(f"{str(path)!r} is corrupt: {first_line(e)}") from None
    comp = r.get("compression") if isinstance(r, dict) else None
    if not isinstance(comp, dict) or "bits_per_weight" not in comp or not isinstance(r.get("recipe"), dict):
        raise SlimkitError(f"{str(d)!r} is not a slimkit run (its report.json is not a compress report)")
    ev = r.get("eval") or {}
    if ev.get(metric) is None:
        raise SlimkitError(f"{str(d)!r} has no {METRICS[metric]} (compressed with --no-eval?)")
    return {"dir": str(d), "label": d.name, "recipe": r["recipe"].get("name", "?"), "bits": comp["bits_per_weight"],
            "value": ev[metric], "ppl": ev.get("ppl"), "kl": ev.get("kl"), "ref_ppl": ev.get("ref_ppl"),
            "seconds": (comp.get("timings") or {}).get("total"), "rss": r.get("peak_rss_compress_mb"),
            "eval": f"{ev.get('source')}: {ev.get('windows')} x {ev.get('seqlen')}"}


def compare(runs: list[str | Path], out: str | Path, metric: str = "ppl") -> Path:
    from ..api import atomic_dir, check_output_dir

    if metric not in METRICS:
        raise SlimkitError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    if not runs:
        raise SlimkitError("compare needs at least one run folder")
    rows = [read_run(d, metric) for d in runs]  # every run checked before anything is written
    evals = {r["eval"] for r in rows}
    if len(evals) > 1:
        raise SlimkitError(f"the runs were evaluated on different data ({'; '.join(sorted(evals))}); "
                           "their numbers do not compare")
    for r in rows:  # not inside any of the runs
        out_path = check_output_dir(out, r["dir"])
    dense = None
    if metric == "ppl":
        refs = {round(r["ref_ppl"], 6) for r in rows if r["ref_ppl"] is not None}
        dense = refs.pop() if len(refs) == 1 else None
    elif metric == "kl":
        dense = 0.0
    front = set(pareto([(r["bits"], r["value"]) for r in rows]))
    lines = [f"# slimkit compare: {METRICS[metric]} against bits/weight", "",
             f"Evaluation: {rows[0]['eval']}." + (f" Dense perplexity {dense:.3f}." if metric == "ppl" and dense else ""),
             "", f"![{METRICS[metric]} against bits/weight]({COMPARE_PLOT})", "",
             "| run | recipe | bits/weight | perplexity | KL | compression s | peak RSS MiB | Pareto |",
             "|---|---|---|---|---|---|---|---|"]
    for i, r in sorted(enumerate(rows), key=lambda ir: ir[1]["bits"]):
        kl = f"{r['kl']:.4f}" if r["kl"] is not None else "—"
        secs = f"{r['seconds']:.0f}" if r["seconds"] is not None else "—"
        rss = f"{r['rss']:.0f}" if r["rss"] is not None else "—"
        lines.append(f"| {r['label']} | {r['recipe']} | {r['bits']:.3f} | {r['ppl']:.3f} | {kl} | {secs} | {rss} | "
                     f"{'yes' if i in front else ''} |")
    with atomic_dir(out_path) as tmp:
        (tmp / TABLE).write_text("\n".join(lines) + "\n")
        compare_plot(rows, METRICS[metric], dense, tmp / COMPARE_PLOT)
    log.info("compared %d runs into %s", len(rows), out_path)
    return out_path
