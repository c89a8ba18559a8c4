"""Shared by the benchmark scripts: run `slimkit compress` per configuration in a fresh process,
collect its report, and rewrite one marked section of docs/results.md."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "benchmarks" / "runs"  # compressed models and the dense reference cache (not tracked)
REPORTS = ROOT / "benchmarks" / "reports"  # one report per finished run (tracked: results survive a new machine)
RESULTS = ROOT / "docs" / "results.md"
SLIMKIT = [sys.executable, "-m", "slimkit"]


def finished(recipe: str, tag: str | None = None) -> bool:
    return (REPORTS / f"{tag or recipe.replace('/', '_')}.json").is_file()


def compress_run(recipe: str, tag: str | None = None, extra: list[str] = (), fresh: bool = False,
                 keep_model: bool = False, model: str = "default", env: dict[str, str] | None = None) -> dict:
    """Run one compression (unless its report exists) and return the report with the command.
    ``extra`` options come last and so override the defaults (argparse keeps the last value);
    ``env``: variables set for the process (e.g. OMP_NUM_THREADS), written before the command."""
    tag = tag or recipe.replace("/", "_")
    out = RUNS / tag
    report_path = REPORTS / f"{tag}.json"
    args = ["compress", model, "--recipe", recipe, "--out", str(out.relative_to(ROOT)),
            "--nsamples", "128", "--seqlen", "512", "--seed", "0", "--eval-tokens", "16384",
            "--reference-cache", str((RUNS / "refcache").relative_to(ROOT)), "-q", *extra]
    command = "".join(f"{k}={shlex.quote(v)} " for k, v in (env or {}).items()) + "slimkit " + shlex.join(args)
    if report_path.is_file() and not fresh:
        report = json.loads(report_path.read_text())
        if "date" not in report:
            report["date"] = committed_date(report_path)
        return report
    shutil.rmtree(out, ignore_errors=True)
    from slimkit.api import partial_dir  # an unfinished earlier run of this output is not resumed: fresh means fresh
    shutil.rmtree(partial_dir(out), ignore_errors=True)
    RUNS.mkdir(parents=True, exist_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] {command}", flush=True)
    subprocess.run(SLIMKIT + args, cwd=ROOT, check=True, env=os.environ | (env or {}))
    report = json.loads((out / "report.json").read_text())
    report["command"] = command
    report["date"] = time.strftime("%Y-%m-%d")
    REPORTS.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=1))
    if not keep_model:
        for f in out.glob("*.safetensors"):
            f.unlink()
    return report


def committed_date(path: Path) -> str | None:
    """When a report older than the "date" field was made: the day git last committed it (None when
    that is not known: not committed, no git, not a checkout)."""
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%cs", "--", str(path)], cwd=ROOT,
                             capture_output=True, text=True).stdout.strip()
    except OSError:
        return None
    return out or None


def row(label: str, r: dict) -> dict:
    ev, comp = r["eval"], r["compression"]
    seconds = run_seconds(r)
    return {"label": label, "ppl": ev["ppl"], "kl": ev["kl"], "bpw": comp["bits_per_weight"],
            "time": seconds, "rss": r["peak_rss_compress_mb"], "dense_ppl": ev["ref_ppl"],
            "command": r["command"], "timings": comp["timings"], "finetune": r.get("finetune"),
            "date": r.get("date"), "threads": r.get("threads")}


def shared_mark(recipe: str, report: dict, shared_runs: dict[str, str]) -> str:
    """" †" when this report is the run that ``shared_runs`` names (recipe -> the day of a run whose wall
    time was taken while another job shared the cores), else "": a later run of the recipe is not marked."""
    return " †" if recipe in shared_runs and report.get("date") == shared_runs[recipe] else ""


def run_seconds(report: dict) -> float:
    """A report's compression time as the tables show it (fine-tuning included)."""
    return report["compression"]["timings"]["total"] + (report.get("finetune") or {}).get("seconds", 0.0)


def committed_versions(path: Path, root: Path = ROOT) -> list[tuple[str, dict]]:
    """(commit day, the report) of each version of a report that git committed, oldest first (none: never
    committed, no git)."""
    rel = str(path.resolve().relative_to(root.resolve()))
    try:
        log = subprocess.run(["git", "log", "--reverse", "--format=%H %cs", "--", rel], cwd=root,
                             capture_output=True, text=True, check=False).stdout.split()
    except OSError:
        return []
    out = []
    for commit, day in zip(log[::2], log[1::2]):
        shown = subprocess.run(["git", "show", f"{commit}:{rel}"], cwd=root, capture_output=True, text=True,
                               check=False)
        if not shown.returncode:
            out.append((day, json.loads(shown.stdout)))
    return out


def shared_vs_alone(shared_runs: dict[str, str], root: Path = ROOT) -> list[tuple[str, float, float]]:
    """(recipe, seconds of its run on the shared day, seconds of its current run) for each recipe of
    ``shared_runs`` run again since, on another day, with the same command: what sharing the cores cost,
    measured (the shared run is the version of the report that git last committed on that day)."""
    out = []
    for recipe, day in shared_runs.items():
        path = root / "benchmarks" / "reports" / f"{recipe.replace('/', '_')}.json"
        if not path.is_file():
            continue
        now = json.loads(path.read_text())
        if (now.get("date") or committed_date(path)) == day:
            continue
        then = [r for d, r in committed_versions(path, root) if d == day]
        if then and then[-1].get("command") == now.get("command"):
            out.append((recipe, run_seconds(then[-1]), run_seconds(now)))
    return out


SHARED_WHY = "while another job (the test suite, a smoke run or another benchmark) shared the 2 cores"


def shared_note(rows: list[dict], shared_runs: dict[str, str], why: str = SHARED_WHY) -> list[str]:
    """The footnote for the rows marked †, with what sharing cost the recipes run again alone since
    (nothing when no row is marked); ``why``: how the marked runs shared the cores."""
    if not any("†" in r["label"] for r in rows):
        return []
    again = shared_vs_alone(shared_runs)
    cost = ("; of the recipes run again alone since, " + ", ".join(f"`{n}` took {a:.0f} s instead of {s:.0f} s ({s / a:.1f}x)"
                                                  for n, s, a in again)) if again else ""
    return [f"† wall time taken {why}, so the time is inflated{cost}; perplexity, KL, bits and RSS are unaffected. "
            f"`--fresh` on an idle machine gives a clean time.", ""]


def table(rows: list[dict]) -> str:
    """ppl, KL, bits, time and RSS of each row's seed-0 run; rows run on several seeds add a last column
    with their perplexity's mean and range (see with_seeds)."""
    extra = seeds_column(rows)
    lines = ["| method | ppl | KL (nats/token) | bits/weight | compress time (s) | peak RSS (MiB) |"
             + (f" {extra[0]} |" if extra else ""), "|---|---|---|---|---|---|" + ("---|" if extra else "")]
    for i, r in enumerate(rows):
        kl = "0" if r["kl"] == 0 else f"{r['kl']:.4f}"
        t = "—" if r["time"] is None else f"{r['time']:.0f}"
        rss = "—" if r["rss"] is None else f"{r['rss']:.0f}"
        lines.append(f"| {r['label']} | {r['ppl']:.2f} | {kl} | {r['bpw']:.3f} | {t} | {rss} |"
                     + (f" {extra[1][i]} |" if extra else ""))
    return "\n".join(lines)


def command_lines(rows: list[dict]) -> list[str]:
    """The "Commands:" list that closes every section: how to regenerate each row."""
    return ["Commands:", ""] + [f"- {r['label']}: `{r['command']}`" for r in rows]


IMG = ROOT / "docs" / "img"


def recipe_of(r: dict) -> str:
    """The recipe a row's command ran (a built-in name, or a recipe file's name without .yaml); the
    row's label when the command names none."""
    args = shlex.split(r["command"])
    given = [a.split("=", 1)[1] if a.startswith("--recipe=") else args[i + 1]
             for i, a in enumerate(args) if a.startswith("--recipe=") or (a == "--recipe" and i + 1 < len(args))]
    if not given:
        return r["label"]
    name = Path(given[-1]).name  # argparse keeps the last
    return name.rsplit(".", 1)[0] if name.endswith((".yaml", ".yml")) else name


def section_plot(name: str, rows: list[dict], dense_ppl: float, what: str) -> list[str]:
    """Perplexity against bits/weight for a section's rows (labelled by recipe, Pareto front and
    dense marked) as docs/img/<name>.png; -> the markdown lines that embed it."""
    from slimkit.eval.plots import compare_plot

    IMG.mkdir(parents=True, exist_ok=True)
    compare_plot([{"label": recipe_of(r), "bits": r["bpw"], "value": r["ppl"]} for r in rows],
                 "perplexity (held-out plays)", dense_ppl, IMG / f"{name}.png")
    return [f"![{what}: perplexity against bits/weight, Pareto front and dense marked](img/{name}.png)", ""]


def machine(rows: list[dict] | None = None) -> str:
    """This machine, and the day and threads of the runs: given rows, the span of their reports' dates (a
    section regenerated from older reports keeps their day) and the thread counts their reports recorded,
    else today and this process's threads."""
    import platform

    import torch
    dates = sorted({d for r in rows or () for d in [r.get("date"), *r.get("seed_dates", ())] if d})
    dates = dates or [time.strftime("%Y-%m-%d")]  # unknown: today
    when = dates[0] if len(dates) == 1 else f"runs of {dates[0]} to {dates[-1]}"
    known = sorted({r["threads"] for r in rows or () if r.get("threads")})
    if not rows:
        threads = f"{torch.get_num_threads()} threads"
    elif not known:
        threads = "threads not recorded"
    else:
        threads = f"{' / '.join(map(str, known))} threads" + (
            " where recorded" if any(not r.get("threads") for r in rows) else "")
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{threads}, fp32, {when}")


def write_section(name: str, body: str) -> None:
    """Replace the text between <!-- BEGIN name --> and <!-- END name --> in docs/results.md."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = RESULTS.read_text() if RESULTS.is_file() else "# slimkit results\n"
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text:
        pre, rest = text.split(begin, 1)
        text = pre + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)


SEEDS = (0, 1, 2)  # the calibration seeds of a headline row


def seed_tag(tag: str, seed: int) -> str:
    """A seed's run of a row: seed 0 is the row's own run, another adds -s<seed> (benchmarks/levers.py's names)."""
    return tag if seed == 0 else f"{tag}-s{seed}"


def with_seeds(r: dict, recipe: str, tag: str | None = None, extra: list[str] = (), run_missing: bool = True,
               seeds: tuple[int, ...] = SEEDS, keep_model: bool = False, fresh: bool = False) -> dict:
    """A row (of seed 0's run) with the perplexity and KL of every seed as "seeds": {seed: (ppl, kl)}. The
    other seeds are the same command with `--seed S` last; run here when missing (unless run_missing is
    False: then only those already finished count; all again with fresh)."""
    tag = tag or recipe.replace("/", "_")
    by_seed, dates = {0: (r["ppl"], r["kl"])}, []
    for s in seeds:
        if s == 0 or not (run_missing or finished(recipe, seed_tag(tag, s))):
            continue
        rep = compress_run(recipe, tag=seed_tag(tag, s), extra=[*extra, "--seed", str(s)], keep_model=keep_model,
                           fresh=fresh)
        by_seed[s] = (rep["eval"]["ppl"], rep["eval"]["kl"])
        dates.append(rep.get("date"))
    return r | {"seeds": by_seed, "seed_dates": dates}


def seed_ppls(r: dict) -> list[float]:
    """The perplexity of each seed a row ran (see with_seeds)."""
    return [p for p, _ in r["seeds"].values()]


def spread(values: list[float], fmt: str = ".2f") -> str:
    """mean (min–max) of a few seeds' values; the value alone for one."""
    import statistics

    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ({format(min(values), fmt)}–{format(max(values), fmt)})"


def verdict(mine: list[float], other: list[float]) -> str:
    """Whether `mine` (lower is better, one value per seed) beats `other`, by this document's rule: a win
    needs two seeds or more on each side, ranges that do not overlap, and a difference of the means larger
    than either range; a lower mean short of that is a tie."""
    import statistics

    margin = statistics.mean(other) - statistics.mean(mine)
    range_ = max(max(mine) - min(mine), max(other) - min(other))
    if min(len(mine), len(other)) < 2:
        return "fewer than two seeds: not yet a finding"
    if max(mine) < min(other) and margin > range_:
        return f"lower by {margin:.2f}, more than the seed range ({range_:.2f}): a win"
    if margin > 0:
        return f"lower by {margin:.2f}, less than the seed range ({range_:.2f}) or the ranges overlap: a tie"
    return f"higher by {-margin:.2f}" + (": a loss" if max(other) < min(mine) else ", the ranges overlap")


def seeds_column(rows: list[dict]) -> tuple[str, list[str]] | None:
    """The header and the cells of a "ppl over seeds" column (mean (range)), or None when no row has more
    than one seed; "—" for rows of one seed."""
    many = [r for r in rows if len(r.get("seeds") or {}) > 1]
    if not many:
        return None
    seeds = sorted({s for r in many for s in r["seeds"]})
    cells = [spread(seed_ppls(r)) if len(r.get("seeds") or {}) > 1 else "—" for r in rows]
    return f"ppl, seeds {','.join(map(str, seeds))}: mean (range)", cells


TASK = "slimkit_shakespeare_next_line"  # the built-in lm-eval task: the true next line of a held-out play among 4


def task_score(tag: str, model: str, task: str = TASK, of: dict | None = None,
               run_missing: bool = True) -> dict | None:
    """lm-eval's accuracy of a kept model (a `compress` output folder, or 'default' for the dense model) on
    ``task``, in its own process: {"acc", "stderr", "command", "seconds", "date", "ppl"}, cached as
    benchmarks/reports/<tag>-<task>.json. ``of``: the run's report; the cache records its perplexity and
    counts only for that same run (a run made again is scored again). None when not cached and
    run_missing is False."""
    path = REPORTS / f"{tag}-{task}.json"
    ppl = of["eval"]["ppl"] if of else None
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("ppl") == ppl:
            return cached
    if not run_missing:
        return None
    command = f"slimkit eval {model} --tasks {task} -q"
    code = ("import json, sys; from slimkit.api import evaluate_model; "
            "r = evaluate_model(sys.argv[1], tasks=sys.argv[2], progress=False); "
            "print(json.dumps({'tasks': r['tasks'], 'lm_eval_version': r['lm_eval_version']}))")
    print(f"[{time.strftime('%H:%M:%S')}] {command}", flush=True)
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", code, model, task], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    metrics = r["tasks"][task]
    score = {"acc": metrics["acc,none"], "stderr": metrics["acc_stderr,none"], "command": command,
             "seconds": time.time() - t0, "date": time.strftime("%Y-%m-%d"), "lm_eval": r["lm_eval_version"],
             "ppl": ppl}
    REPORTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(score, indent=1))
    return score


def kept_model(tag: str) -> bool:
    """Whether a run's compressed model is still on disk (compress_run deletes it unless keep_model)."""
    return any((RUNS / tag).glob("model*.safetensors"))
