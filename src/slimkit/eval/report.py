"""The compression report: JSON for machines, markdown for people."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import first_line

log = logging.getLogger(__name__)


def _f(x, digits=3):
    if x is None:
        return "—"
    if isinstance(x, float):
        if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
            return f"{x:.{digits}e}"
        return f"{x:.{digits}f}"
    return str(x)


def summary_rows(report: dict) -> list[tuple[str, str]]:
    ev, comp = report.get("eval") or {}, report["compression"]
    rows = [
        ("model", report["model"]),
        ("recipe", f"{report['recipe']['name']} — {report['recipe']['description']}"),
        ("calibration", f"{report['calibration']['source']}: {comp['calib_sequences']} x {comp['calib_seqlen']} tokens, seed {report['calibration']['seed']}"),
        ("compressed Linears", f"{len(comp['layers'])} ({report['compressed_params']:,} weights)"),
        ("bits / weight (compressed Linears)", _f(comp["bits_per_weight"])),
        ("bits / weight by part", ", ".join(f"{k} {v:.3f}" for k, v in comp["bits_by_part"].items() if v)),
        ("compression wall time", f"{comp['timings']['total']:.1f} s"
                                  + (f" ({report['threads']} CPU thread{'s' if report['threads'] != 1 else ''})"
                                     if report.get("threads") else "")),
    ]
    if report.get("finetune"):
        ft = report["finetune"]
        rows.append(("adapter fine-tuning", f"{len(ft['loss'])} steps, {ft['seconds']:.1f} s, "
                                            f"loss {ft['loss'][0]:.3f} -> {ft['loss'][-1]:.3f}"))
    rows += [
        ("peak RSS (load + compress)", f"{report['peak_rss_compress_mb']:.0f} MiB"),
    ]
    if ev:
        rows += [
            ("evaluation", f"{ev['source']}: {ev['windows']} x {ev['seqlen']} tokens"),
            ("perplexity dense", _f(ev.get("ref_ppl"))),
            ("perplexity compressed", _f(ev["ppl"])),
            ("KL(dense || compressed), nats/token", _f(ev.get("kl"), 4)),
        ]
        if ev.get("kl_method"):
            rows += [("KL method", ev["kl_method"]), ("KL error bound", ev["kl_error_bound"])]
        if report.get("peak_rss_total_mb"):
            rows.append(("peak RSS (whole run, with evaluation)", f"{report['peak_rss_total_mb']:.0f} MiB"))
    return rows


def markdown(report: dict, plots: list[str] = ()) -> str:
    comp = report["compression"]
    lines = ["# slimkit compression report", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary_rows(report)]
    if plots:
        lines += ["", "## Where the error sits", ""] + [f"![{p[:-4].replace('_', ' ')}]({p})" for p in plots]
    lines += ["", "## Where the time went", "", "| phase | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in sorted(comp["timings"].items(), key=lambda kv: -kv[1])]
    if report.get("finetune"):
        loss = report["finetune"]["loss"]
        lines += ["", "## Adapter fine-tuning loss (every step)", "", "    " + " ".join(f"{x:.3f}" for x in loss)]
    data_free = [l for l in comp["layers"] if (l.get("notes") or {}).get("data_free")]
    if data_free:
        lines += ["", "## Experts compressed without calibration data", "",
                  "Mixture-of-experts experts that the router sent too few calibration tokens to get "
                  "round-to-nearest on the recipe's grid instead of the recipe's own method.", "",
                  "| expert Linear | why |", "|---|---|"]
        lines += [f"| {l['name']} | {l['notes']['data_free']} |" for l in data_free]
    lines += ["", "## Blocks: output error against the dense block on the same inputs", "",
              "| block | rel. output error | seconds |", "|---|---|---|"]
    lines += [f"| {b['index']} | {b['rel_error']:.5f} | {b['seconds']:.1f} |" for b in comp["blocks"]]
    lines += ["", "## Linears: relative output error ||(W - W_hat) x|| / ||W x|| on calibration inputs", "",
              "| layer | shape | grid | density | bits/w | rel. error |", "|---|---|---|---|---|---|"]
    for l in comp["layers"]:
        bpw = sum(l["bits"].values()) / (l["shape"][0] * l["shape"][1])
        lines.append(f"| {l['name']} | {l['shape'][0]}x{l['shape'][1]} | {l['grid']} | {l['density']:.3f} | "
                     f"{bpw:.3f} | {l['rel_error']:.5f} |")
    if report.get("command"):
        lines += ["", "Command:", "", "    " + report["command"]]
    return "\n".join(lines) + "\n"


def write_report(report: dict, directory: Path) -> None:
    """report.json, report.md and its plots. A plot that fails is logged and left out: it must
    not cost the compressed model it describes."""
    try:
        from .plots import report_plots

        plots = report_plots(report, directory)
    except Exception as e:  # noqa: BLE001 - matplotlib missing or failing: the report still gets written
        log.warning("report plots skipped: %s", first_line(e))
        plots = []
    (directory / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (directory / "report.md").write_text(markdown(report, plots))
