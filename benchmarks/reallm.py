"""ReALLM against GPTQ (and SliM-LLM when its recipes are installed) at 3 and 2 bits/weight, every
stored bit counted -> the "reallm" section of docs/results.md.

    python benchmarks/reallm.py            # reuses finished runs in benchmarks/runs/
    python benchmarks/reallm.py --fresh    # recompute everything

Same protocol as benchmarks/slim_llm.py, whose GPTQ and SliM-LLM runs it shares: each
configuration is its own `slimkit compress` process, 32 x 512 calibration tokens of the
calibration plays (seed 0), 16,384 evaluation tokens of the held-out plays. Besides the built-in recipes (ReALLM at 3.0 / 2.0 bits/weight), ReALLM is also
run at exactly the bits/weight GPTQ g128 measured, from a recipe written next to the runs.
"""
from __future__ import annotations

import argparse
import math
from collections import Counter

from common import RUNS, command_lines, compress_run, machine, row, table, write_section
from slim_llm import CALIB, tag as calib_tag

from slimkit.recipe import builtin_recipes


def matched_recipe(name: str, bits: float, finetune: bool) -> str:
    """A ReALLM recipe at ``bits`` (rounded down to 1e-3) written under benchmarks/runs/."""
    bits = math.floor(bits * 1000) / 1000
    stage = f"{{method: reallm, bits: {bits}{', finetune: true' if finetune else ''}}}"
    RUNS.mkdir(parents=True, exist_ok=True)
    path = RUNS / f"{name}.yaml"
    path.write_text(f"name: {name}\ndescription: ReALLM at the bits/weight GPTQ measured\nstages:\n  - {stage}\n")
    return str(path.relative_to(RUNS.parent.parent))


def choices(report: dict) -> str:
    """How often each per-matrix configuration was chosen, e.g. 'VQ d2 k32 b64 r8: 90'."""
    c = Counter(l["grid"] for l in report["compression"]["layers"])
    return ", ".join(f"{g}: {n}" for g, n in c.most_common())


def parts(report: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in sorted(report["compression"]["bits_by_part"].items()) if v)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--only", nargs="*", help="recipe names / tags to (re)run")
    args = ap.parse_args()
    have = builtin_recipes()

    def run(label, recipe, tag=None):
        tag = tag or recipe
        fresh = args.fresh or (args.only is not None and tag in args.only)
        report = compress_run(recipe, tag=calib_tag(tag), extra=CALIB, fresh=fresh)
        return row(label, report), report

    sections, details = [], []
    for budget, ft in ((3, False), (2, True)):
        rows, reports = [], {}
        for label, recipe in ((f"GPTQ W{budget} g128 (asym)", f"gptq-w{budget}-g128"),
                              (f"GPTQ W{budget} g64 (asym)", f"gptq-w{budget}-g64"),
                              (f"SliM-LLM {budget}-bit", f"slim-llm-{budget}bit"),
                              (f"ReALLM {budget}.0 bits/weight", f"reallm-{budget}bit"),
                              *([(f"ReALLM {budget}.0 bits/weight + low-rank fine-tuning", f"reallm-{budget}bit-ft")]
                                if ft else [])):
            if recipe not in have:
                continue
            r, rep = run(label, recipe)
            rows.append(r)
            reports[recipe] = rep
        gptq = reports[f"gptq-w{budget}-g128"]["compression"]["bits_per_weight"]
        tag = f"reallm-{budget}bit{'-ft' if ft else ''}-matched"
        r, rep = run(f"ReALLM{' + fine-tuning' if ft else ''} at GPTQ g128's {gptq:.3f} bits/weight",
                     matched_recipe(tag, gptq, ft), tag=tag)
        rows.append(r)
        reports[tag] = rep
        sections.append((budget, rows))
        for name, rep in reports.items():
            if name.startswith("reallm"):
                details.append(f"- {name}: bits/weight by part: {parts(rep)}; per-matrix choices: {choices(rep)}")

    dense = {"label": "dense (fp32 weights, 16-bit accounting)", "ppl": sections[0][1][0]["dense_ppl"], "kl": 0.0,
             "bpw": 16.0, "time": None, "rss": None}
    body = [
        "## ReALLM: low rank + vector-quantized residual (issue 5)",
        "",
        "SmolLM2-135M-Instruct (embedded default), all 210 Linears compressed; calibration 32 x 512 tokens "
        "(seed 0; the runs are shared with the SliM-LLM section); evaluation 16,384 held-out tokens, windows of 512. Bits/weight count everything stored: "
        "for GPTQ codes + fp16 scales + zero points; for ReALLM packed VQ codes, the fp16 codebook, 8-bit "
        "block scales with their fp32 group maxima, the packed column permutation and the fp16 low-rank "
        "factors. Each ReALLM matrix meets the budget on its own (rank, vector length, codebook and block "
        f"chosen per matrix by measured error). Times: OMP_NUM_THREADS=1, two or three runs at a time on "
        f"the 2 cores (as in the SliM-LLM table). Machine: {machine()}.",
        "",
        "Regenerate: `python benchmarks/reallm.py --fresh`.",
        "",
    ]
    for budget, rows in sections:
        body += [f"### {budget} bits/weight", "", table([dense] + rows), ""]
    body += ["ReALLM details:", ""] + details + [""]
    body += command_lines([r for _, rows in sections for r in rows])
    write_section("reallm", "\n".join(body))
    for budget, rows in sections:
        print(table([dense] + rows))


if __name__ == "__main__":
    main()
