"""The same recipe on independent calibration draws: ``slimkit compress ... --seeds 0,1,2``.

On a small model, perplexity moves by several percent between runs that differ only in the
calibration windows; one seed cannot separate methods closer than that. Each seed runs as its own
`compress` into ``OUT/seed-<s>`` (a complete output folder), the dense model's evaluation summary
is made once and shared, and ``OUT/seeds.json`` / ``seeds.md`` give every seed's numbers with their
mean and spread (sample standard deviation, min, max).
"""
from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

from .errors import SlimkitError

log = logging.getLogger(__name__)

SUMMARY, TABLE, SHARED_CACHE = "seeds.json", "seeds.md", ".reference-cache"
METRICS = ("ppl", "kl", "bits_per_weight", "seconds")


def parse_seeds(text: str) -> list[int]:
    """"0,1,2" -> [0, 1, 2]; one line naming the problem otherwise."""
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip() != ""]
    except ValueError:
        raise SlimkitError(f"--seeds takes integers separated by commas (e.g. 0,1,2), got {text!r}") from None
    if len(seeds) < 2:
        raise SlimkitError(f"--seeds needs at least two seeds for a spread, got {text!r}")
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise SlimkitError(f"--seeds must be distinct non-negative integers, got {text!r}")
    return seeds


def spread(values: list[float | None]) -> dict | None:
    """mean, sample standard deviation, min, max, n of the values (None where any is missing)."""
    if not values or any(v is None for v in values):
        return None
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": sd, "min": min(values), "max": max(values), "n": n}


def _row(seed: int, report: dict) -> dict:
    ev = report.get("eval") or {}
    comp = report["compression"]
    return {"seed": seed, "ppl": ev.get("ppl"), "kl": ev.get("kl"), "ref_ppl": ev.get("ref_ppl"),
            "bits_per_weight": comp["bits_per_weight"], "seconds": comp["timings"]["total"]}


def compress_seeds(model: str, recipe, out: str | Path, seeds: list[int], *, resume: bool = False,
                   reference_cache: str | None = None, **kwargs) -> dict:
    """Run ``api.compress`` once per seed into ``out/seed-<s>``; -> the summary (also written to
    ``out/seeds.json`` and ``out/seeds.md``). With ``resume``, seeds whose folder is complete are
    kept and an interrupted one continues."""
    from .api import check_output_dir, compress

    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise SlimkitError(f"compress_seeds needs two or more distinct seeds, got {seeds}")
    out = Path(out).expanduser()
    expected = {f"seed-{s}" for s in seeds} | {SHARED_CACHE}
    if out.exists() and resume:
        ours = expected | {SUMMARY, TABLE} | {f".seed-{s}.partial" for s in seeds}  # a partial holds its checkpoint
        if not out.is_dir() or not {p.name for p in out.iterdir()} <= ours:
            raise SlimkitError(f"{str(out)!r} holds other files than this --seeds run's; cannot resume into it")
    else:
        check_output_dir(out, model)
    out.mkdir(parents=True, exist_ok=True)
    own_cache = reference_cache is None
    cache = str(out / SHARED_CACHE) if own_cache else reference_cache
    rows = []
    for s in seeds:
        folder = out / f"seed-{s}"
        if resume and (folder / "report.json").is_file():
            report = json.loads((folder / "report.json").read_text())
            log.info("seed %d: kept the finished run in %s", s, folder)
        else:
            log.info("seed %d of %s", s, seeds)
            report = compress(model, recipe, folder, seed=s, resume=resume, reference_cache=cache, **kwargs)
        if "worker" in report:  # a torchrun helper worker: worker 0 writes the summary
            continue
        rows.append(_row(s, report))
    if own_cache:
        shutil.rmtree(out / SHARED_CACHE, ignore_errors=True)
    if not rows:
        return {"worker": True}
    summary = {"recipe": json.loads((out / f"seed-{rows[0]['seed']}" / "report.json").read_text())["recipe"]["name"],
               "seeds": rows, **{m: spread([r[m] for r in rows]) for m in METRICS},
               "ref_ppl": rows[0]["ref_ppl"]}
    (out / SUMMARY).write_text(json.dumps(summary, indent=1))
    (out / TABLE).write_text(markdown(summary))
    return summary


def fmt(s: dict | None, digits: int = 3) -> str:
    return "—" if s is None else f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} (min {s['min']:.{digits}f}, " \
                                 f"max {s['max']:.{digits}f}, n={s['n']})"


def markdown(summary: dict) -> str:
    lines = [f"# {summary['recipe']}: {len(summary['seeds'])} calibration seeds", "",
             "| seed | perplexity | KL | bits/weight | seconds |", "|---|---|---|---|---|"]
    for r in summary["seeds"]:
        ppl = f"{r['ppl']:.3f}" if r["ppl"] is not None else "—"
        kl = f"{r['kl']:.4f}" if r["kl"] is not None else "—"
        lines.append(f"| {r['seed']} | {ppl} | {kl} | {r['bits_per_weight']:.3f} | {r['seconds']:.0f} |")
    lines += ["", f"- perplexity: {fmt(summary['ppl'])}" + (f" (dense {summary['ref_ppl']:.3f})"
                                                             if summary.get("ref_ppl") else ""),
              f"- KL: {fmt(summary['kl'], 4)}", "",
              "± is the sample standard deviation over the seeds; a difference between recipes smaller than "
              "their spreads is a tie."]
    return "\n".join(lines) + "\n"


def summary_rows(summary: dict) -> list[tuple[str, str]]:
    rows = [(f"seed {r['seed']}", f"perplexity {r['ppl']:.3f}, KL {r['kl']:.4f}" if r["ppl"] is not None
             and r["kl"] is not None else "not evaluated") for r in summary["seeds"]]
    rows += [("perplexity (mean ± std)", fmt(summary["ppl"])), ("KL (mean ± std)", fmt(summary["kl"], 4))]
    if summary.get("ref_ppl"):
        rows.append(("perplexity dense", f"{summary['ref_ppl']:.3f}"))
    return rows
