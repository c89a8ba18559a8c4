"""SLiM against its baselines on the embedded default model -> the "slim" section of docs/results.md,
mirroring Tables 10 and 11 of the SLiM paper (2:4 + W4 and 50% unstructured + W4).

    python benchmarks/slim.py                 # both sparsity settings, reusing finished runs
    python benchmarks/slim.py --only 2:4      # one setting
    python benchmarks/slim.py --fresh         # recompute

Same calibration/evaluation protocol as benchmarks/core.py (128 x 512 calibration tokens, seed 0;
16,384 held-out tokens). "Gap closed" is (ppl_SparseGPT+GPTQ - ppl) / (ppl_SparseGPT+GPTQ - ppl_dense).
"""
from __future__ import annotations

import argparse
import statistics

from common import (ROOT, RUNS, SEEDS, TASK, command_lines, compress_run, kept_model, machine, row, section_plot,
                    seed_ppls, seeds_column, shared_mark, shared_note, spread, task_score, verdict, with_seeds, write_section)

SETTINGS = {
    "2:4": [
        ("SparseGPT + GPTQ (W4 g128 sym)", "sparsegpt-gptq"),
        ("Wanda + group AbsMax (W4 g128 sym)", "wanda-absmax"),
        ("Naive-LoRA + SLiM-Quant", "naive-lora"),
        ("SLiM-LoRA (fp16 adapters)", "slim-lora"),
        ("SLiM-LoRA^Q (recipe `slim`)", "slim"),
        ("SLiM-LoRA^Q + FT", "slim-ft"),
        ("slimkit SLiM+ (SparseGPT+GPTQ base, Hessian-weighted LoRA^Q, alternating re-fits)", "slim-plus"),
    ],
    "50%": [
        ("SparseGPT + GPTQ (W4 g128 sym)", "sparsegpt-gptq-unstructured"),
        ("Wanda + group AbsMax (W4 g128 sym)", "wanda-absmax-unstructured"),
        ("Naive-LoRA + SLiM-Quant", "naive-lora-unstructured"),
        ("SLiM-LoRA (fp16 adapters)", "slim-lora-unstructured"),
        ("SLiM-LoRA^Q (recipe `slim-unstructured`)", "slim-unstructured"),
        ("SLiM-LoRA^Q + FT", "slim-unstructured-ft"),
        # slim-plus-unstructured (recipe shipped) was not run at 50%: the 2-core budget went to issues 4-6
    ],
}


# the rows the targets compare (the base, the paper's recipe, slimkit's): also run with seeds 1 and 2
HEADLINE = {"sparsegpt-gptq", "slim", "slim-plus"}

# runs whose wall time was taken while another job (tests, the memory benchmark) shared the 2 cores:
# recipe -> the day of that run (a later run of the recipe is not marked)
SHARED_MACHINE = {"wanda-absmax": "2026-11-24", "naive-lora": "2026-11-24", "slim-lora": "2026-11-24",
                  "slim-unstructured-ft": "2026-11-24"}


def mean_ppl(r: dict) -> float:
    return statistics.mean(seed_ppls(r))


def acc(score: dict | None) -> str:
    return "—" if score is None else f"{score['acc']:.3f} ± {score['stderr']:.3f}"


def gap_table(rows: list[dict], dense_ppl: float, dense_task: dict | None = None) -> str:
    """Seed 0's run of each row and its gap closed over the first row; rows run on several seeds add
    their perplexity's mean (range) and the gap closed by that mean over the first row's mean; rows
    scored on the built-in task add its accuracy (± lm-eval's standard error) after KL."""
    base = rows[0]["ppl"]
    extra = seeds_column(rows)
    many = extra and len(rows[0].get("seeds") or {}) > 1
    tasks = any(r.get("task") for r in rows)
    lines = ["| method | ppl | KL |" + (" next-line acc |" if tasks else "")
             + " bits/weight | time (s) | peak RSS (MiB) | gap closed |"
             + (f" {extra[0]} | gap closed by the mean |" if many else ""),
             "|---|---|---|" + ("---|" if tasks else "") + "---|---|---|---|" + ("---|---|" if many else ""),
             f"| dense (fp32 weights, stored as fp16) | {dense_ppl:.2f} | 0 |" + (f" {acc(dense_task)} |" if tasks else "")
             + " 16 | — | — | +1.00 |" + (" — | +1.00 |" if many else "")]
    for i, r in enumerate(rows):
        gap = (base - r["ppl"]) / (base - dense_ppl) if base != dense_ppl else float("nan")
        cells = ""
        if many:
            mean_gap = (f"{(mean_ppl(rows[0]) - mean_ppl(r)) / (mean_ppl(rows[0]) - dense_ppl):+.2f}"
                        if len(r.get("seeds") or {}) > 1 else "—")
            cells = f" {extra[1][i]} | {mean_gap} |"
        lines.append(f"| {r['label']} | {r['ppl']:.2f} | {r['kl']:.4f} |" + (f" {acc(r.get('task'))} |" if tasks else "")
                     + f" {r['bpw']:.3f} | {r['time']:.0f} | {r['rss']:.0f} | {gap:+.2f} |" + cells)
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--only", choices=list(SETTINGS))
    ap.add_argument("--tasks", action="store_true",
                    help=f"score every 2:4 row (its seed-0 run) and the dense model on the built-in task {TASK} "
                         "(a row whose model was not kept is compressed again, keeping it)")
    ap.add_argument("--finished-only", action="store_true",
                    help="run no missing seed of a headline row; write the section from the runs finished")
    args = ap.parse_args()
    body = ["## SLiM and its baselines (issue 3)", "",
            "Mirrors the SLiM paper's Tables 10 (2:4 + 4-bit) and 11 (50% unstructured + 4-bit) on the default "
            "model. Bits/weight include everything stored: codes, scales, sparsity metadata and the adapters "
            "(fp16, or 4-bit codes + fp16 scale per 128 entries). Time includes adapter fine-tuning where "
            f"listed. The rows the targets compare (`sparsegpt-gptq`, `slim`, `slim-plus`) also ran with "
            f"`--seed {' / '.join(map(str, SEEDS[1:]))}` last (other calibration windows): their perplexity's "
            "mean and range, and the gap closed by the means, are the last two columns. Machine: {machine}.", "",
            "Regenerate: `python benchmarks/slim.py --fresh`.", ""]
    every = []
    dense_task = task_score("dense", "default", run_missing=args.tasks and not args.finished_only)
    for setting, configs in SETTINGS.items():
        if args.only and setting != args.only:
            continue
        rows = []
        for label, recipe in configs:
            report = compress_run(recipe, fresh=args.fresh)
            score = None
            if setting == "2:4":
                report, score = scored(recipe, report, args.tasks and not args.finished_only)
            r = row(label + shared_mark(recipe, report, SHARED_MACHINE), report)
            if setting == "2:4" and recipe in HEADLINE:
                r = with_seeds(r, recipe, run_missing=not args.finished_only, fresh=args.fresh)
            rows.append(r | {"recipe": recipe, "report": report, "task": score})
        dense = rows[0]["dense_ppl"]
        every += rows
        slug = "slim-" + "".join(c for c in setting if c.isalnum())
        body += [f"### {setting} sparsity + 4-bit weights (dense ppl {dense:.2f})", "",
                 *section_plot(slug, rows, dense, f"SLiM, {setting} sparsity + 4-bit"),
                 gap_table(rows, dense, dense_task if setting == "2:4" else None), ""]
        if setting == "2:4":
            body += task_note(rows, dense_task)
        body += shared_note(rows, SHARED_MACHINE)
        ft = [r for r in rows if r["finetune"]]
        for r in ft:
            loss = r["finetune"]["loss"]
            body += [f"Fine-tuning ({r['label']}): {len(loss)} steps, {r['finetune']['seconds']:.0f} s, "
                     f"training loss {loss[0]:.3f} -> {sum(loss[-5:]) / min(5, len(loss)):.3f} (mean of the last 5).", ""]
        if setting == "2:4":
            body += targets(rows, dense)
        body += command_lines(rows) + [""]
    body[2] = body[2].replace("{machine}", machine(every))
    write_section("slim", "\n".join(body))


def task_note(rows: list[dict], dense_task: dict | None) -> list[str]:
    """What the accuracy column is, how it was made, and what it can tell apart."""
    scored_rows = [r for r in rows if r.get("task")]
    if not scored_rows:
        return []
    first = scored_rows[0]["task"]
    return [f"Next-line acc: lm-eval {first['lm_eval']} on the built-in task `{TASK}` (the true next line of a "
            "held-out play among 4, 500 documents, 0-shot; chance 0.25), scoring each row's seed-0 model as "
            "written, ± lm-eval's standard error. Commands: "
            + "; ".join(f"`{r['task']['command']}`" for r in scored_rows)
            + (f"; dense: `{dense_task['command']}`" if dense_task else "")
            + (". Every row is scored" if len(scored_rows) == len(rows) else
               f". Scored so far: {', '.join(r['recipe'] for r in scored_rows)}; the others show —")
            + " (`python benchmarks/slim.py --tasks` scores them, compressing a row again, its model kept, when "
            "the model was not kept). With 500 documents the standard error is about 0.02: accuracies closer than "
            "about twice that are not told apart.", ""]


def scored(recipe: str, report: dict, run_missing: bool) -> tuple[dict, dict | None]:
    """(the run's report, its score on the built-in task or None): a score is made when run_missing,
    from the kept model, compressing again (same command, model kept) when it was deleted."""
    score = task_score(recipe, str((RUNS / recipe).relative_to(ROOT)), of=report, run_missing=False)
    if score or not run_missing:
        return report, score
    if not kept_model(recipe):
        report = compress_run(recipe, fresh=True, keep_model=True)
    return report, task_score(recipe, str((RUNS / recipe).relative_to(ROOT)), of=report)


def seed_targets(base: dict, slim: dict, plus: dict, dense: float) -> list[str]:
    """The gap-closed targets again on the means over the seeds each row ran, and SLiM+ against the
    base by the document's win rule (one bullet; none when the base has one seed)."""
    if len(base.get("seeds") or {}) < 2:
        return []
    gap = lambda r: (mean_ppl(base) - mean_ppl(r)) / (mean_ppl(base) - dense)  # noqa: E731
    parts = [f"`{name}` {spread(seed_ppls(r))}, gap closed {gap(r):+.2f}" for name, r in
             (("slim", slim), ("slim-plus", plus)) if len(r.get("seeds") or {}) > 1]
    seeds = ",".join(map(str, sorted(base["seeds"])))
    return [f"- Over calibration seeds {seeds} (mean (range)): `sparsegpt-gptq` {spread(seed_ppls(base))}; "
            + "; ".join(parts) + f". `slim-plus` against `sparsegpt-gptq`: {verdict(seed_ppls(plus), seed_ppls(base))} "
            f"(issue 15's target for it: a gap closed of +0.75 or more by the means: "
            f"{'met' if gap(plus) >= 0.75 else 'NOT met'})."]


def mean_block_error(report: dict, last: int = 0) -> float:
    blocks = report["compression"]["blocks"][-last:] if last else report["compression"]["blocks"]
    return sum(b["rel_error"] for b in blocks) / len(blocks)


def targets(rows: list[dict], dense: float) -> list[str]:
    """The issue's two targets at 2:4 + W4, computed from the rows, and what the block errors say."""
    by = {r["recipe"]: r for r in rows}
    base, slim, plus = by["sparsegpt-gptq"], by["slim"], by["slim-plus"]
    gap = lambda r: (base["ppl"] - r["ppl"]) / (base["ppl"] - dense)  # noqa: E731
    ratio = slim["time"] / base["time"]
    clean = "†" not in slim["label"] and "†" not in base["label"]
    err = {k: (mean_block_error(by[k]["report"]), by[k]["report"]["compression"]["blocks"][-1]["rel_error"])
           for k in ("sparsegpt-gptq", "wanda-absmax", "slim", "slim-plus")}
    e = lambda k: f"{err[k][0]:.3f} / {err[k][1]:.3f}"  # noqa: E731
    return [
        "Targets (2:4 + W4):", "",
        f"- Gap closed by SLiM-LoRA^Q (the paper's recipe, `slim`): {gap(slim):+.2f} (target >= 0.50): NOT met on "
        f"this model. slimkit's SLiM+ (`slim-plus`) closes {gap(plus):+.2f} at {plus['bpw']:.3f} bits/weight "
        f"({'met' if gap(plus) >= 0.5 else 'NOT met'}); with adapter fine-tuning the paper's recipe reaches "
        f"{gap(by['slim-ft']):+.2f}.",
        f"- Speed: `slim` {slim['time']:.0f} s vs `sparsegpt-gptq` {base['time']:.0f} s in this run, "
        f"{ratio:.2f}x (target <= 1.3x; the paper's ratio is 1.56x){'' if clean else ' — timed on shared cores'}.",
        *seed_targets(base, slim, plus, dense),
        "",
        "Why the paper's recipe falls short here, from the block output errors (relative, mean over the 30 "
        f"blocks / last block): SparseGPT+GPTQ {e('sparsegpt-gptq')}, Wanda + AbsMax {e('wanda-absmax')}, "
        f"SLiM-LoRA^Q {e('slim')}, SLiM+ {e('slim-plus')}. SLiM's base (Wanda 2:4 + one per-tensor SLiM-Quant "
        "scale per matrix) is far weaker on this small model than an OBS-compensated base. The adapters recover "
        "most of that loss (Wanda + AbsMax ppl "
        f"{by['wanda-absmax']['ppl']:.1f} -> SLiM-LoRA^Q {slim['ppl']:.1f}) and even bring the mean block error "
        "below SparseGPT+GPTQ's, but each block is measured on the inputs the compressed model really produces, "
        "and the error of the late blocks, which carry what the early ones let through, stays well above "
        "SparseGPT+GPTQ's (GPTQ compensates every rounding inside the layer; the adapters only fit the residual "
        "after it). What slimkit changed (recipe `slim-plus`): the base is SparseGPT 2:4 + GPTQ W4 "
        "g128 from one OBS sweep (with the activation-weighted range search), and the low-rank saliency uses "
        "the full input covariance instead of its diagonal (L, R = the exact minimiser of the layer's output "
        "error ||X (W - W_c - L R)||, via the SVD of E C with C C^T = H), with the same 4-bit AbsMax adapters of "
        "rank 0.1; then 4 alternating rounds: the base re-fitted through SparseGPT + GPTQ to W - L R (from the "
        "second round on choosing a new 2:4 mask with the adapters in place), the adapters re-fitted to the new "
        "base's error, keeping the round of lowest output error.",
        "",
    ]


if __name__ == "__main__":
    main()
