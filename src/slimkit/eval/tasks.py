"""Downstream tasks through lm-evaluation-harness (the optional extra ``slimkit[eval]``).

The model slimkit loaded is handed to lm-eval's ``HFLM`` as an object, so a fake-quantized folder
or a packed one is scored exactly as it computes in slimkit. Results keep lm-eval's task and
metric names (``{"arc_easy": {"acc,none": ..., "acc_stderr,none": ...}}``).

Standard tasks download their data; offline, a folder of lm-eval task YAML over local JSON
files works (``include_path``), and one built-in task needs nothing: ``BUILTIN_TASK``, the true
next line of a held-out Shakespeare play among four (see ``shakespeare_next_line``).
"""
from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import SlimkitError, first_line

log = logging.getLogger(__name__)

BUILTIN_TASK = "slimkit_shakespeare_next_line"
TASK_VERSION = 1  # bump when the examples below change: the cache folder is named after it
N_EXAMPLES = 500
CONTEXT_LINES = 4
N_CHOICES = 4
MIN_WORDS = 4  # shorter lines ("No more.", "Ay, my lord.") say too little to be told apart
SEED = 0
INSTALL = 'pip install "slimkit[eval]"'


class TaskError(SlimkitError):
    """A task name, a task folder or the lm-eval package is wrong or missing."""


def require_lm_eval() -> None:
    """TaskError (one line, with the pip command) unless lm-eval and its Hugging Face backend import."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as e:
        missing = e.name or "lm_eval"
        what = "lm-eval" if missing.split(".")[0] == "lm_eval" else f"{missing.split('.')[0]} (needed by lm-eval)"
        raise TaskError(f"--tasks needs the package {what}, which is not installed: {INSTALL}") from None


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """'piqa, arc_easy' or a list -> ['piqa', 'arc_easy'] (order kept, duplicates dropped)."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = list(dict.fromkeys(str(t).strip() for t in items if str(t).strip()))
    if not names:
        raise TaskError("--tasks names no task")
    return names


# ---- the built-in task --------------------------------------------------------------------------

_ACT = re.compile(r"ACT\b", re.IGNORECASE)


def _speech_line(line: str) -> bool:
    """A line of verse or prose someone speaks: not a stage direction, long enough to tell apart."""
    return len(line.split()) >= MIN_WORDS and "[" not in line and "]" not in line


def shakespeare_next_line(n: int = N_EXAMPLES, seed: int = SEED) -> list[dict]:
    """The built-in task's documents, the same on every machine.

    In each held-out play (after its list of persons), every speech line that directly follows
    another line of the same paragraph is a candidate; ``n`` of them are drawn with ``seed``,
    in a shuffled order (so that a ``limit`` takes a sample of all three plays). The context is
    the ``CONTEXT_LINES`` non-empty lines before it; the choices are the true line and three
    other speech lines of the same play, drawn with the same generator, the true one at a drawn
    position ``gold``."""
    from ..data.sources import SHAKESPEARE_EVAL_PLAYS, read_documents

    texts = read_documents("shakespeare:eval", "eval")
    rng = random.Random(seed)
    plays, candidates = [], []
    for name, text in zip(SHAKESPEARE_EVAL_PLAYS, texts):
        raw = [line.strip() for line in text.splitlines()]
        start = next((i for i, line in enumerate(raw) if _ACT.match(line)), 0)
        kept = [(i, line) for i, line in enumerate(raw) if i > start and line]  # non-empty lines
        pool = list(dict.fromkeys(line for _, line in kept if _speech_line(line)))  # distinct, in order
        plays.append((name, kept, pool))
        for k in range(CONTEXT_LINES, len(kept)):
            i, line = kept[k]
            if _speech_line(line) and kept[k - 1][0] == i - 1:  # same paragraph as the line before
                candidates.append((len(plays) - 1, k))
    if len(candidates) < n:
        raise TaskError(f"the held-out plays give {len(candidates)} examples, fewer than {n}")
    docs = []
    for p, k in rng.sample(candidates, n):
        name, kept, pool = plays[p]
        i, true = kept[k]
        others = rng.sample([line for line in pool if line != true], N_CHOICES - 1)
        gold = rng.randrange(N_CHOICES)
        docs.append({"play": name, "line": i + 1,
                     "context": "\n".join(line for _, line in kept[k - CONTEXT_LINES:k]),
                     "choices": others[:gold] + [true] + others[gold:], "gold": gold})
    return docs


def _task_yaml(data_file: Path) -> dict:
    """lm-eval's standard multiple-choice task over a local JSON-lines file (no download)."""
    mean = {"aggregation": "mean", "higher_is_better": True}
    return {
        "task": BUILTIN_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": "\n",  # the next line: the choice follows the context after a newline
        "metric_list": [{"metric": "acc", **mean}, {"metric": "acc_norm", **mean}],
        "metadata": {"version": float(TASK_VERSION),
                     "description": "the true next line of a held-out Shakespeare play (Hamlet, Macbeth, "
                                    "The Tempest) among four lines of the same play, after the "
                                    f"{CONTEXT_LINES} lines before it"},
    }


def builtin_task_dir() -> Path:
    """The folder holding the built-in task (its YAML and JSON), made once in slimkit's cache.

    Written in a temporary folder and renamed into place, so that a run never sees half a task;
    the examples do not depend on the model, so every model is scored on the same ones."""
    import yaml

    from ..models.loading import cache_dir

    target = cache_dir() / "tasks" / f"{BUILTIN_TASK}-v{TASK_VERSION}"
    data, spec = target / f"{BUILTIN_TASK}.jsonl", target / f"{BUILTIN_TASK}.yaml"
    if data.is_file() and spec.is_file():
        return target
    docs = shakespeare_next_line()
    log.info("writing the built-in task %s (%d examples) once into %s", BUILTIN_TASK, len(docs), target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)
        (tmp / data.name).write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
        (tmp / spec.name).write_text(yaml.safe_dump(_task_yaml(data), sort_keys=False, allow_unicode=True),
                                     encoding="utf-8")
        if target.exists():  # incomplete (interrupted by hand?): replace it
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (data.is_file() and spec.is_file()):  # else another process finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---- task names ---------------------------------------------------------------------------------

def _include_paths(include_path: str | Path | Sequence[str | Path] | None) -> list[Path]:
    if include_path is None:
        return []
    paths = [Path(include_path)] if isinstance(include_path, (str, Path)) else [Path(p) for p in include_path]
    for p in paths:
        if not p.expanduser().is_dir():
            raise TaskError(f"--include-path {str(p)!r} is not a folder")
    return [p.expanduser().resolve() for p in paths]


def task_manager(names: Sequence[str], include_path: str | Path | Sequence[str | Path] | None = None):
    """An lm-eval TaskManager that knows every name in ``names``, or TaskError naming the unknown ones.

    The built-in task and ``include_path`` folders are indexed first, alone (a fraction of a
    second); lm-eval's own thousands of task files only when a name is not among them."""
    from lm_eval.tasks import TaskManager

    paths = [str(builtin_task_dir())] + [str(p) for p in _include_paths(include_path)]

    def unknown(tm) -> list[str]:
        return [n for n in names if n not in tm.all_tasks and not (n.endswith((".yaml", ".yml")) and Path(n).is_file())]

    with _quiet_lm_eval():
        tm = TaskManager(include_path=paths, include_defaults=False)
        if not unknown(tm):
            return tm
        tm = TaskManager(include_path=paths)
    bad = unknown(tm)
    if bad:
        close = [m for n in bad for m in difflib.get_close_matches(n, tm.all_tasks, n=1)]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise TaskError(f"unknown lm-eval task{'s' if len(bad) > 1 else ''} {', '.join(bad)}{hint}: see `lm-eval ls "
                        f"tasks`, or give a folder of task YAML files with --include-path")
    return tm


# ---- running -------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_lm_eval(progress: bool = True) -> Iterator[None]:
    """lm-eval's INFO and WARNING logs (e.g. about being handed a model object) only with -v, and
    no dataset progress bars when ``progress`` is off."""
    lm_log = logging.getLogger("lm_eval")
    level = lm_log.level
    if not log.isEnabledFor(logging.DEBUG):
        lm_log.setLevel(logging.ERROR)
    datasets_bars = None
    patches = contextlib.ExitStack()
    if not progress:
        import functools

        import lm_eval.api.task as lm_task

        if hasattr(lm_task, "tqdm"):  # the bar over a task's documents, which has no switch
            from unittest import mock

            patches.enter_context(mock.patch.object(lm_task, "tqdm", functools.partial(lm_task.tqdm, disable=True)))
        with contextlib.suppress(ImportError):
            import datasets

            datasets_bars = datasets.utils.logging.is_progress_bar_enabled()
            datasets.disable_progress_bars()
    try:
        yield
    finally:
        patches.close()
        lm_log.setLevel(level)
        if datasets_bars:
            import datasets

            datasets.enable_progress_bars()


@contextlib.contextmanager
def _offline_when_unreachable() -> Iterator[None]:
    """When the hub cannot be reached (or HF_HUB_OFFLINE is set), datasets and huggingface_hub work
    offline for the run: a task's data comes from their cache, or fails at once with one line,
    not after a minute of retries. (Their switches are read at import: set on the modules here.)"""
    from ..models.loading import hub_reachable

    with contextlib.ExitStack() as stack:
        if not hub_reachable():
            from unittest import mock

            import datasets.config
            import huggingface_hub.constants

            stack.enter_context(mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True))
            for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
                if hasattr(datasets.config, name):
                    stack.enter_context(mock.patch.object(datasets.config, name, True))
        yield


def _hflm(model, tokenizer, batch_size: int, progress: bool):
    """lm-eval's HFLM over the model object, its request progress bars following ``progress``
    (lm-eval passes no switch for them from simple_evaluate)."""
    from lm_eval.models.huggingface import HFLM

    class SlimkitHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not progress)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not progress)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or not progress)

    return SlimkitHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def run_tasks(model, tokenizer, names: Sequence[str], manager, *, num_fewshot: int | None = None,
              limit: int | float | None = None, batch_size: int = 8, progress: bool = True) -> dict:
    """Score ``model`` (a causal LM object, on the device it computes on) on lm-eval tasks.

    Returns ``tasks`` (lm-eval's results per task or group, its metric names as keys) and
    ``task_samples`` (how many documents each task scored)."""
    from lm_eval import simple_evaluate

    with _quiet_lm_eval(progress), _offline_when_unreachable():
        lm = _hflm(model, tokenizer, batch_size, progress)
        try:
            out = simple_evaluate(model=lm, tasks=list(names), num_fewshot=num_fewshot, limit=limit,
                                  task_manager=manager, log_samples=False)
        except SlimkitError:
            raise
        except Exception as e:  # noqa: BLE001 - mostly a task whose data cannot be fetched (offline)
            if type(e).__module__.split(".")[0] in ("datasets", "huggingface_hub", "requests", "urllib3", "httpx") \
                    or isinstance(e, (ConnectionError, FileNotFoundError)):
                raise TaskError(f"cannot load the data of --tasks {','.join(names)}: {first_line(e)} (offline, give "
                                f"a folder of task YAML over local JSON files with --include-path, or use "
                                f"{BUILTIN_TASK})") from None
            raise
    # lm-eval's metric keys ("acc,none", "acc_stderr,none"); not its display fields (alias, sample_len)
    tasks = {name: {k: v for k, v in r.items() if "," in k} for name, r in out["results"].items()}
    samples = {name: n.get("effective") for name, n in (out.get("n-samples") or {}).items()}
    return {"tasks": tasks, "task_samples": samples, "num_fewshot": num_fewshot, "limit": limit,
            "lm_eval_version": out.get("lm_eval_version") or _lm_eval_version()}


def _lm_eval_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None


def task_rows(r: dict) -> list[tuple[str, str]]:
    """Table rows for the CLI: one per task, its metrics (with their stderr) on one line."""
    rows = []
    for name, metrics in r.get("tasks", {}).items():
        parts = []
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            err = metrics.get(f"{metric}_stderr,{filt}")
            shown = metric if filt in ("none", "") else key
            parts.append(f"{shown} {value:.4f}" + (f" ± {err:.4f}" if isinstance(err, (int, float)) else ""))
        n = (r.get("task_samples") or {}).get(name)
        rows.append((f"{name}" + (f" ({n} docs)" if n else ""), ", ".join(parts) or "—"))
    return rows
