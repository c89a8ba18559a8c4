"""Evaluation at bounded memory -> the "evaluation memory" section of docs/results.md (issue 18).

    python benchmarks/evalmem.py                 # runs what has no report yet
    python benchmarks/evalmem.py --fresh         # recompute everything
    python benchmarks/evalmem.py --before REV    # the code to compare with (default: f1d1f09)

The default model, rtn-w4-g64 (data-free: 8 of the 128 x 512 calibration sequences measure errors), evaluating 32,768 tokens (64 windows of 512)
with a --reference-cache, in fresh processes one after another:

- compression alone (--no-eval): the compression's own peak RSS, the figure to stay near;
- before (the code at REV, checked out in a git worktree): the dense log-probabilities of every
  evaluated token over the whole vocabulary, memory-mapped in the cache; first run (cache written)
  and second run (cache read);
- after (this code): the dense model's head-moment summary (hidden size + 2 numbers per token),
  made from the resident model before compression; first and second run.

Peak RSS is the process's ru_maxrss (the report's peak_rss_total_mb: whole run, evaluation
included); evaluation time is wall time of the dense reference pass plus the compressed model's
pass (or the cached read), from the report; cache size is the bytes on disk in the cache folder.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

from common import REPORTS, ROOT, RUNS, machine, write_section

HERE = RUNS / "evalmem"
TOKENS = 32768
BASE = ["default", "--recipe", "rtn-w4-g64", "--nsamples", "128", "--seqlen", "512", "--seed", "0",
        "--eval-tokens", str(TOKENS), "-q"]


def worktree(rev: str) -> str:
    path = HERE / f"src-{rev}"
    if not (path / "src" / "slimkit").is_dir():
        shutil.rmtree(path, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, check=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], cwd=ROOT, check=True,
                       capture_output=True)
    return str(path / "src")


def cache_bytes(folder) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0


def run(tag: str, extra: list[str], *, src: str | None = None, cache: str | None = None, fresh: bool = False) -> dict:
    report_path = REPORTS / f"evalmem-{tag}.json"
    if report_path.is_file() and not fresh:
        return json.loads(report_path.read_text())
    out = HERE / tag
    shutil.rmtree(out, ignore_errors=True)
    args = ["compress", *BASE, "--out", str(out.relative_to(ROOT)), *extra]
    if cache:
        args += ["--reference-cache", str((HERE / cache).relative_to(ROOT))]
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    command = ("PYTHONPATH=<worktree of REV>/src " if src else "") + "slimkit " + shlex.join(args)
    print(f"[{time.strftime('%H:%M:%S')}] {command}", flush=True)
    subprocess.run([sys.executable, "-m", "slimkit", *args], cwd=ROOT, env=env, check=True)
    r = json.loads((out / "report.json").read_text())
    ev = r.get("eval") or {}
    res = {"command": command, "peak_rss_compress_mb": r["peak_rss_compress_mb"],
           "peak_rss_total_mb": r["peak_rss_total_mb"], "compress_s": r["compression"]["timings"]["total"],
           "eval_s": ev.get("seconds", 0.0) + (ev.get("reference_seconds") or 0.0),
           "ppl": ev.get("ppl"), "kl": ev.get("kl"), "ref_ppl": ev.get("ref_ppl"), "tokens": ev.get("tokens"),
           "kl_method": ev.get("kl_method"), "cache_bytes": cache_bytes(HERE / cache) if cache else None}
    REPORTS.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(res, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", default="f1d1f09", help="the commit to compare with (full log-prob cache)")
    ap.add_argument("--fresh", action="store_true")
    a = ap.parse_args()
    HERE.mkdir(parents=True, exist_ok=True)
    if a.fresh:
        for c in ("cache-before", "cache-after"):
            shutil.rmtree(HERE / c, ignore_errors=True)
    alone = run("alone", ["--no-eval"], fresh=a.fresh)
    src = worktree(a.before)
    fresh_before = a.fresh or not (REPORTS / "evalmem-before-1.json").is_file()
    if fresh_before:
        shutil.rmtree(HERE / "cache-before", ignore_errors=True)
    b1 = run("before-1", [], src=src, cache="cache-before", fresh=fresh_before)
    b2 = run("before-2", [], src=src, cache="cache-before", fresh=fresh_before)
    shutil.rmtree(HERE / "cache-before", ignore_errors=True)  # 6 GB
    subprocess.run(["git", "worktree", "remove", "--force", str(HERE / f"src-{a.before}")], cwd=ROOT,
                   capture_output=True)
    fresh_after = a.fresh or not (REPORTS / "evalmem-after-1.json").is_file()
    if fresh_after:
        shutil.rmtree(HERE / "cache-after", ignore_errors=True)
    a1 = run("after-1", [], cache="cache-after", fresh=fresh_after)
    a2 = run("after-2", [], cache="cache-after", fresh=fresh_after)

    def row(label, r):
        extra = r["peak_rss_total_mb"] - alone["peak_rss_compress_mb"]
        return (f"| {label} | {r['peak_rss_total_mb']:.0f} | {extra:+.0f} | {r['eval_s']:.0f} | "
                f"{r['cache_bytes'] / 1e6:,.1f} | {r['ppl']:.3f} | {r['kl']:.4f} |")

    gib = 1024
    ok_rss = a1["peak_rss_total_mb"] <= alone["peak_rss_compress_mb"] + gib / 2 and \
        a2["peak_rss_total_mb"] <= alone["peak_rss_compress_mb"] + gib / 2
    ok_cache = a1["cache_bytes"] <= 320e6 and a1["cache_bytes"] * 20 <= b1["cache_bytes"]
    lines = [
        f"Evaluating {a1['tokens']:,} predicted tokens ({TOKENS // 512} windows of 512) of the default model "
        "after rtn-w4-g64 (data-free: of `--nsamples 128 --seqlen 512` it uses 8 sequences, to measure errors), "
        "with `--reference-cache`, each run a fresh process, one "
        f"after another on an idle machine ({machine()}). Compression alone (`--no-eval`) peaks at "
        f"**{alone['peak_rss_compress_mb']:.0f} MiB** RSS.",
        "",
        "| run | peak RSS, whole run (MiB) | over compression alone (MiB) | evaluation time (s) | "
        "reference cache (MB) | ppl | KL |",
        "|---|---|---|---|---|---|---|",
        row(f"before ({a.before}): full log-probabilities, cache written", b1),
        row(f"before ({a.before}): cache read", b2),
        row("after: head-moment summary, cache written", a1),
        row("after: cache read", a2),
        "",
        f"Targets: peak RSS at most the compression's own + 512 MiB: **{'met' if ok_rss else 'NOT met'}**; "
        f"cache at most 320 MB and 1/20 of before: **{'met' if ok_cache else 'NOT met'}** "
        f"({b1['cache_bytes'] / max(a1['cache_bytes'], 1):.0f}x smaller).",
        "",
        "Peak RSS is the process's `ru_maxrss` over the whole run (report.json `peak_rss_total_mb`). "
        "Evaluation time is the wall time of the dense reference pass (before: inside the evaluation; "
        "after: before the compression, from the resident model) plus the compressed model's pass, both "
        "from report.json; with the cache read, the dense pass is a file read. Before, the cache is "
        "memory-mapped and its pages count in RSS. KL method after: "
        f"{a1['kl_method']}.",
        "",
        "Commands:", "",
        f"- compression alone: `{alone['command']}`",
        f"- before: `{b1['command']}` (twice)",
        f"- after: `{a1['command']}` (twice)",
        "",
        f"Regenerate: `python benchmarks/evalmem.py --fresh --before {a.before}`.",
    ]
    write_section("evaluation memory", "\n".join(lines))


if __name__ == "__main__":
    main()
