"""Pictures of a compression run, and of several runs against each other (matplotlib, headless).

- ``errors_by_layer.png``: every Linear's relative output error ||(W - W_hat) x|| / ||W x|| on its
  calibration inputs, by block, one line per Linear type (q_proj, down_proj, ...): where the error sits;
- ``errors_by_block.png``: each block's output error against the dense block on the same inputs,
  through depth.
- ``compare.png`` (``slimkit compare``): a quality metric against bits/weight for any set of runs,
  the dense model and the Pareto front marked.
"""
from __future__ import annotations

import re
from pathlib import Path

LAYER_PLOT, BLOCK_PLOT, COMPARE_PLOT = "errors_by_layer.png", "errors_by_block.png", "compare.png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def _kind(name: str) -> str:
    """A Linear's type from its name: the last component, experts folded together."""
    last = name.rsplit(".", 1)[-1]
    return f"experts.{last}" if re.search(r"\.experts\.\d+\.", name) else last


def _block(name: str) -> int | None:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def report_plots(report: dict, directory: Path) -> list[str]:
    """Write the per-Linear and per-block error plots of one ``compress`` report; -> file names."""
    comp = report["compression"]
    plt = _pyplot()
    written = []
    series: dict[str, list[tuple[int, float]]] = {}
    for lr in comp["layers"]:
        b = _block(lr["name"])
        if b is not None and lr["rel_error"] > 0:
            series.setdefault(_kind(lr["name"]), []).append((b, lr["rel_error"]))
    title = f"{report['recipe']['name']} on {Path(str(report['model'])).name}"
    if series:
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
        for kind, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, linewidth=1, label=kind)
        ax.set_yscale("log")
        ax.set_xlabel("block")
        ax.set_ylabel("relative output error of the Linear")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        fig.savefig(directory / LAYER_PLOT)
        plt.close(fig)
        written.append(LAYER_PLOT)
    blocks = [(b["index"], b["rel_error"]) for b in comp.get("blocks", []) if b["rel_error"] > 0]
    if blocks:
        fig, ax = plt.subplots(figsize=(8, 3.5), dpi=100)
        ax.plot([b[0] for b in blocks], [b[1] for b in blocks], marker="o", markersize=3, color="tab:red")
        ax.set_yscale("log")
        ax.set_xlabel("block")
        ax.set_ylabel("relative block output error")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(directory / BLOCK_PLOT)
        plt.close(fig)
        written.append(BLOCK_PLOT)
    return written


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (bits, metric; lower is better in both) that no other point beats
    in both, in order of bits."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def compare_plot(rows: list[dict], metric: str, dense: float | None, path: Path) -> None:
    """``rows``: {label, bits, value}; the metric (lower is better) against bits/weight."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    pts = [(r["bits"], r["value"]) for r in rows]
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:blue", zorder=3)
    for r in rows:
        ax.annotate(r["label"], (r["bits"], r["value"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    front = pareto(pts)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], color="tab:green", linewidth=1.5,
            label="Pareto front", zorder=2)
    if dense is not None:
        ax.axhline(dense, color="black", linestyle="--", linewidth=1, label=f"dense ({dense:.3g})")
    values = [p[1] for p in pts] + ([dense] if dense is not None else [])
    log = min(values) > 0 and max(values) > 10 * min(values)  # a wide range (W2 next to W4) on a log axis
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("bits / weight (compressed Linears, everything stored)")
    ax.set_ylabel(metric + (" (log scale)" if log else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
