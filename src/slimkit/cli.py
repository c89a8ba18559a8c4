"""Command line: slimkit compress | eval | recipes | export | info | generate."""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys

from .errors import SlimkitError

log = logging.getLogger("slimkit")


def _positive(kind):
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {s}")
        return v
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``slimkit: error: ...``) and exit code 2."""

    def error(self, message):
        sub = self.prog.removeprefix("slimkit").strip()
        raise SlimkitError(f"{sub}: {message}" if sub else message)


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    placement = _Parser(add_help=False)
    placement.add_argument("--device", default="auto",
                           help="where blocks compute: auto (the first CUDA device, else the CPU), cpu, cuda, cuda:N")
    placement.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                           help="storage dtype of the model and the output (auto: the checkpoint's own); blocks "
                                "compute in it on CUDA and in float32 on a CPU")
    p = _Parser(prog="slimkit", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    c = sub.add_parser("compress", help="compress a model with a recipe", parents=[common, placement])
    c.add_argument("model", help="'default' (embedded SmolLM2-135M-Instruct), a HF folder, a .gguf file or a hub id")
    c.add_argument("--recipe", required=True, help="a built-in recipe name (see `slimkit recipes`) or a YAML file")
    c.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    c.add_argument("--calib", default="shakespeare", help="calibration text source (default: shakespeare)")
    c.add_argument("--nsamples", type=_positive(int), default=128, help="calibration sequences (default 128)")
    c.add_argument("--seqlen", type=_positive(int), default=512, help="tokens per sequence (default 512)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--seeds", default=None, metavar="S1,S2,...",
                   help="run the recipe once per calibration seed into OUT/seed-<s> and report mean and spread "
                        "of perplexity and KL (OUT/seeds.md); replaces --seed")
    c.add_argument("--eval", dest="eval_data", default="shakespeare:eval",
                   help="held-out text for perplexity/KL after compression (default shakespeare:eval)")
    c.add_argument("--no-eval", action="store_true", help="skip the evaluation")
    c.add_argument("--eval-tokens", type=_positive(int), default=16384, help="evaluation tokens (default 16384)")
    c.add_argument("--batch-size", type=_positive(int), default=8)
    c.add_argument("--reference-cache", default=None,
                   help="folder to keep the dense model's evaluation summary in (hidden size + 3 numbers per "
                        "token; reused by later runs on the same model and windows)")
    c.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of the same command from its last finished block")
    c.add_argument("--low-memory", action="store_true",
                   help="read the blocks of a safetensors folder one at a time and write the output block by "
                        "block: peak memory no longer grows with the number of blocks (models larger than RAM; "
                        "the evaluation loads the written model whole, so pass --no-eval if it does not fit)")
    c.add_argument("--offload-activations", action="store_true",
                   help="keep the calibration activations in memory-mapped files beside --out, not in RAM")

    e = sub.add_parser("eval", help="perplexity (and KL to a reference) of a model, and lm-eval tasks",
                       parents=[common, placement],
                       description="Perplexity (and KL to --reference) on --data, and/or lm-evaluation-harness "
                                   "tasks (--tasks; needs pip install \"slimkit[eval]\"). MODEL: a model or "
                                   "slimkit folder, a packed folder (slimkit export --format native), a .gguf "
                                   "file, 'default' or a hub id.")
    e.add_argument("model")
    e.add_argument("--data", default=None,
                   help="evaluation text source for perplexity (default shakespeare:eval); with --tasks, "
                        "perplexity runs only when --data or --reference is given")
    e.add_argument("--reference", default=None, help="dense model to measure KL against")
    e.add_argument("--seqlen", type=_positive(int), default=512)
    e.add_argument("--max-tokens", type=_positive(int), default=16384)
    e.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval task names (e.g. piqa,arc_easy; their data is downloaded), "
                        "plus the built-in slimkit_shakespeare_next_line (offline: the true next line of a "
                        "held-out Shakespeare play among 4); scores keep lm-eval's task and metric names")
    e.add_argument("--include-path", action="append", default=None, metavar="DIR",
                   help="a folder of lm-eval task YAML files (e.g. over local JSON files: dataset_path: json, "
                        "dataset_kwargs: {data_files: ...}, best given as absolute paths); repeatable")
    e.add_argument("--limit", type=_positive(float), default=None,
                   help="documents per task (a fraction of each task below 1); default all")
    e.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    e.add_argument("--batch-size", type=_positive(int), default=8, help="lm-eval batch size (default 8)")

    sub.add_parser("recipes", help="list the built-in recipes", parents=[common])

    x = sub.add_parser("export", help="write a compressed folder as compressed-tensors, PEFT, native or GGUF", parents=[common])
    x.add_argument("--device", default="cpu", help="device for the export's tensor work (default cpu)")
    x.add_argument("dir", help="a `slimkit compress` output folder")
    x.add_argument("--format", required=True, choices=["compressed-tensors", "peft", "native", "gguf"])
    x.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    x.add_argument("--dense-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="native: dtype of the uncompressed tensors (auto: the narrowest that is exact)")

    cm = sub.add_parser("compare", help="a table and a plot of quality against bits/weight for several runs",
                        parents=[common])
    cm.add_argument("runs", nargs="+", help="`slimkit compress` output folders")
    cm.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    cm.add_argument("--metric", default="ppl", choices=["ppl", "kl"], help="what to plot against bits/weight")

    i = sub.add_parser("info", help="what a folder stores: bits/weight by part, size vs fp16", parents=[common])
    i.add_argument("dir")

    g = sub.add_parser("generate", help="greedy text from a (packed) folder, for a quick look", parents=[common])
    g.add_argument("--device", default="cpu", help="where the packed model runs: cpu (default), auto, cuda, cuda:N")
    g.add_argument("dir")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=_positive(int), default=40)
    g.add_argument("--mode", default="auto", choices=["auto", "kernel", "dequant"],
                   help="packed runtime: kernels for decode (auto), always kernels, or exact fp32 dequantization")
    g.add_argument("--head", default="exact", choices=["exact", "int8"],
                   help="packed runtime: keep the output head as stored (exact) or quantize it per row to "
                        "8 bits at load (faster decode, slightly different logits)")
    return p


def _table(rows):
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)


def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="slimkit: %(message)s")
    try:
        import transformers
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers is a dependency
        pass
    progress = not args.quiet

    if args.cmd == "recipes":
        from .recipe import builtin_recipes, load_recipe
        rows = [(name, load_recipe(name).description) for name in builtin_recipes()]
        print(_table(rows))
        return 0

    if args.cmd == "compress" and args.seeds is not None:
        from .seeds import compress_seeds, parse_seeds
        from .seeds import summary_rows as seed_rows
        seeds = parse_seeds(args.seeds)
        summary = compress_seeds(args.model, args.recipe, args.out, seeds, calib=args.calib, nsamples=args.nsamples,
                                 seqlen=args.seqlen, eval_data=None if args.no_eval else args.eval_data,
                                 eval_tokens=args.eval_tokens, batch_size=args.batch_size, progress=progress,
                                 reference_cache=args.reference_cache, resume=args.resume,
                                 low_memory=args.low_memory, offload_activations=args.offload_activations,
                                 device=args.device, dtype=args.dtype,
                                 command="slimkit " + shlex.join(sys.argv[1:] if argv is None else argv))
        if summary.get("worker"):
            return 0
        print(_table(seed_rows(summary)))
        print(f"\nwrote {args.out} (seed-*/, seeds.md, seeds.json)")
        return 0

    if args.cmd == "compress":
        from .api import compress
        from .eval.report import summary_rows
        report = compress(args.model, args.recipe, args.out, calib=args.calib, nsamples=args.nsamples,
                          seqlen=args.seqlen, seed=args.seed,
                          eval_data=None if args.no_eval else args.eval_data, eval_tokens=args.eval_tokens,
                          batch_size=args.batch_size, progress=progress, reference_cache=args.reference_cache,
                          resume=args.resume, low_memory=args.low_memory,
                          offload_activations=args.offload_activations, device=args.device, dtype=args.dtype,
                          command="slimkit " + shlex.join(sys.argv[1:] if argv is None else argv))
        if "worker" in report:  # a torchrun helper worker: worker 0 reports
            return 0
        print(_table(summary_rows(report)))
        print(f"\nwrote {args.out} (report.md, report.json)")
        return 0

    if args.cmd == "eval":
        from .api import evaluate_model
        r = evaluate_model(args.model, args.data, reference=args.reference, seqlen=args.seqlen,
                           max_tokens=args.max_tokens, progress=progress, device=args.device, dtype=args.dtype,
                           tasks=args.tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                           batch_size=args.batch_size, include_path=args.include_path)
        rows = [("model", r["model"])]
        if "ppl" in r:
            rows += [("data", f"{r['source']}: {r['windows']} x {r['seqlen']} tokens"),
                     ("perplexity", f"{r['ppl']:.3f}")]
        if r.get("kl") is not None:
            rows += [("reference perplexity", f"{r['ref_ppl']:.3f}"), ("KL(reference || model)", f"{r['kl']:.4f}"),
                     ("KL method", r["kl_method"])]
        if "tasks" in r:
            from .eval.tasks import task_rows
            shots = "each task's own" if r["num_fewshot"] is None else r["num_fewshot"]
            rows += [("lm-eval", f"{r['lm_eval_version']}, few-shot {shots}"
                                 + (f", limit {r['limit']}" if r["limit"] is not None else ""))]
            rows += task_rows(r)
        print(_table(rows))
        return 0

    if args.cmd == "export":
        from .export import export
        out = export(args.dir, args.format, args.out, dense_dtype=args.dense_dtype, device=args.device)
        print(f"wrote {out} ({args.format})")
        return 0

    if args.cmd == "compare":
        from .eval.compare import TABLE, compare
        out = compare(args.runs, args.out, metric=args.metric)
        print((out / TABLE).read_text())
        print(f"wrote {out} ({TABLE}, compare.png)")
        return 0

    if args.cmd == "info":
        from .export.info import folder_info, info_rows
        print(_table(info_rows(folder_info(args.dir))))
        return 0

    if args.cmd == "generate":
        from .pack.generate import generate
        r = generate(args.dir, args.prompt, max_new_tokens=args.max_new_tokens, mode=args.mode, head=args.head,
                     device=args.device)
        print(r["text"])
        print(f"\n[{r['new_tokens']} tokens, {r['tokens_per_s']:.1f} tokens/s decode, load {r['load_s']:.1f} s]",
              file=sys.stderr)
        return 0
    return 2


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that partial outputs are cleaned up on the way out."""


def _on_sigterm(signum, frame):
    raise _Terminated


def main(argv=None) -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = run(argv)
    except BaseException as e:
        if isinstance(e, SystemExit) or (os.environ.get("SLIMKIT_DEBUG") and not isinstance(e, SlimkitError)):
            raise
        line, code = _describe(e)
        hint = getattr(e, "slimkit_hint", "")  # e.g. where the progress was kept for --resume
        print(f"slimkit: {line}{'; ' + hint if hint else ''}", file=sys.stderr)
    sys.exit(code)


def _describe(e: BaseException) -> tuple[str, int]:
    """One line and an exit code for anything that ends a command."""
    if isinstance(e, SlimkitError):
        return f"error: {e}", 2
    if isinstance(e, KeyboardInterrupt):
        return "interrupted", 130
    if isinstance(e, _Terminated):
        return "terminated", 143
    if "No space left on device" in str(e):  # e.g. from safetensors' own writer (the partial output is removed)
        return "error: No space left on device", 2
    if isinstance(e, OSError):  # disk full (the partial output is removed), permissions, ...
        return f"error: {e.strerror or e}{f' ({e.filename})' if e.filename else ''}", 2
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"internal error: {type(e).__name__}: {first} (SLIMKIT_DEBUG=1 shows the traceback)", 1


if __name__ == "__main__":
    main()
