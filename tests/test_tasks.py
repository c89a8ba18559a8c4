"""lm-eval bridge (slimkit eval --tasks): scores reproduced by a direct computation of the same
multiple-choice task, the built-in Shakespeare task offline, local task folders, and one-line
refusals (lm-eval missing, unknown task) before any model is loaded."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimkit.cli import main
from slimkit.eval.tasks import BUILTIN_TASK, N_CHOICES, N_EXAMPLES, builtin_task_dir, shakespeare_next_line

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason='lm-eval is not installed (pip install "slimkit[eval]")')
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
REPO = Path(__file__).resolve().parents[1]


def cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.fixture(scope="module")
def task_cache(tmp_path_factory):
    """A fresh slimkit cache (the built-in task is written there) and datasets cache, offline."""
    root = tmp_path_factory.mktemp("task-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("SLIMKIT_CACHE", str(root / "slimkit"))
    offline(mp, root / "datasets")
    yield root
    mp.undo()


def offline(mp: pytest.MonkeyPatch, datasets_cache: Path) -> None:
    """No hub access in this process: the variables, and the constants already read from them."""
    for k, v in OFFLINE.items():
        mp.setenv(k, v)
    if importlib.util.find_spec("datasets") is not None:
        import datasets.config
        import huggingface_hub.constants

        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", datasets_cache)


def read_docs(task_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (task_dir / f"{BUILTIN_TASK}.jsonl").read_text().splitlines()]


# ---- the reference computation ------------------------------------------------------------------

def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's causal encoding (TemplateLM._encode_pair, HFLM.tok_encode): trailing spaces of the
    context move to the continuation; the continuation's tokens are those of context+continuation
    after the context's own; no special tokens when the text starts with the prefix token."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def enc(s):
        kw = {"add_special_tokens": False} if s.startswith(tok.decode(prefix)) else {}
        return tok.encode(s, **kw)

    whole, ctx = enc(context + continuation), enc(context)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def direct_scores(model, tok, docs: list[dict], delimiter: str = "\n") -> dict:
    """acc and acc_norm of lm-eval's multiple_choice, computed here with the model in torch: each
    choice's log-probability is the sum over its tokens given the context; the prediction is the
    argmax (first on ties), acc_norm divides by the choice's length in characters."""
    acc = acc_norm = 0.0
    for doc in docs:
        lls = []
        for choice in doc["choices"]:
            ctx, cont = encode_pair(tok, doc["context"], delimiter + choice)
            ids = torch.tensor((ctx + cont)[:-1])[None]
            assert ids.shape[1] < model.config.max_position_embeddings
            lp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)[-len(cont):]
            lls.append(float(lp.gather(-1, torch.tensor(cont)[:, None]).sum()))
        lls = torch.tensor(lls, dtype=torch.float64)
        lens = torch.tensor([float(len(c)) for c in doc["choices"]], dtype=torch.float64)
        acc += float(int(lls.argmax()) == doc["gold"])
        acc_norm += float(int((lls / lens).argmax()) == doc["gold"])
    return {"acc,none": acc / len(docs), "acc_norm,none": acc_norm / len(docs)}


def check_against_direct(model_spec: str, limit: int, task_dir: Path, **kw) -> dict:
    from slimkit.api import evaluate_model
    from slimkit.models import load_model

    r = evaluate_model(model_spec, tasks=BUILTIN_TASK, limit=limit, batch_size=1, progress=False, device="cpu", **kw)
    assert "ppl" not in r  # tasks only: no perplexity unless --data is given
    assert r["task_samples"] == {BUILTIN_TASK: limit}
    got = r["tasks"][BUILTIN_TASK]
    assert set(got) == {"acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none"}
    model, tok, _ = load_model(model_spec)
    want = direct_scores(model, tok, read_docs(task_dir)[:limit])  # lm-eval scores the first `limit` docs
    assert got["acc,none"] == pytest.approx(want["acc,none"], abs=1e-12)
    assert got["acc_norm,none"] == pytest.approx(want["acc_norm,none"], abs=1e-12)
    return r


# ---- tests ---------------------------------------------------------------------------------------

def test_builtin_task_definition(task_cache):
    """500 documents, the same on every build: the true next line of the play among 4 lines of the
    same play, after the 4 non-empty lines before it."""
    from slimkit.data.sources import read_documents

    d = builtin_task_dir()
    assert d.is_relative_to(task_cache)
    docs = read_docs(d)
    assert docs == shakespeare_next_line() and len(docs) == N_EXAMPLES
    plays = dict(zip(["hamlet", "macbeth", "tempest"], read_documents("shakespeare:eval", "eval")))
    assert {doc["play"] for doc in docs[:40]} == set(plays)  # shuffled: a limit samples every play
    for doc in docs:
        lines = [line.strip() for line in plays[doc["play"]].splitlines()]
        true = lines[doc["line"] - 1]
        assert doc["choices"][doc["gold"]] == true and lines[doc["line"] - 2]  # in the same paragraph
        assert len(doc["choices"]) == N_CHOICES == len(set(doc["choices"]))
        assert set(doc["choices"]) <= set(lines)
        before = [line for line in lines[:doc["line"] - 1] if line][-4:]
        assert doc["context"] == "\n".join(before)
    assert {doc["gold"] for doc in docs} == set(range(N_CHOICES))
    spec = (d / f"{BUILTIN_TASK}.yaml").read_text()
    assert "output_type: multiple_choice" in spec and "dataset_path: json" in spec


@needs_lm_eval
def test_builtin_task_matches_direct_computation(tiny_llama, task_cache):
    check_against_direct(str(tiny_llama), 40, builtin_task_dir())


@needs_lm_eval
@pytest.mark.slow
def test_builtin_task_matches_direct_computation_default_model(tmp_path, monkeypatch):
    offline(monkeypatch, tmp_path / "datasets")  # the real slimkit cache: the default model is there
    r = check_against_direct("default", 20, builtin_task_dir())
    assert r["tasks"][BUILTIN_TASK]["acc,none"] > 0.25  # a real model beats chance on its next line


@needs_lm_eval
def test_packed_folder_scores_as_its_source(compressed, task_cache, tmp_path):
    """A packed native folder is loaded by slimkit.load and scores as the fake-quantized folder does."""
    from slimkit.api import evaluate_model
    from slimkit.export import export

    native = export(compressed, "native", tmp_path / "native")
    r = check_against_direct(str(compressed), 20, builtin_task_dir())
    p = evaluate_model(str(native), tasks=[BUILTIN_TASK], limit=20, batch_size=4, progress=False, device="cpu")
    assert p["tasks"] == r["tasks"]


def test_missing_lm_eval_is_one_line(tmp_path):
    """Without lm-eval: one line naming the package and the pip command, exit 2, before anything else
    (the model path does not even exist)."""
    code = ("import sys; sys.modules['lm_eval'] = None\n"
            "from slimkit.cli import main\n"
            f"main(['eval', {str(tmp_path / 'no-model')!r}, '--tasks', 'piqa'])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env=os.environ | {"SLIMKIT_CACHE": str(tmp_path)}, timeout=300)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and "lm-eval" in p.stderr and 'pip install "slimkit[eval]"' in p.stderr
    assert not (tmp_path / "tasks").exists()


@needs_lm_eval
def test_unknown_task_is_one_line_before_loading(tiny_llama, task_cache, capsys, monkeypatch):
    import slimkit.api

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(slimkit.api, "load_model", no_loading)
    code, out, err = cli(["eval", str(tiny_llama), "--tasks", f"{BUILTIN_TASK},arc_easyy", "-q"], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "unknown lm-eval task arc_easyy" in err and "did you mean arc_easy" in err
    code, out, err = cli(["eval", str(tiny_llama), "--limit", "5"], capsys)  # options of --tasks alone
    assert code == 2 and err.count("\n") == 1 and "--limit applies only with --tasks" in err


@needs_lm_eval
def test_include_path_local_task_offline(tiny_llama, tmp_path):
    """A folder of lm-eval YAML over a local JSON file runs in a fresh offline process, next to the
    built-in task. Its two choices are the same text, so the first wins (argmax on a tie): acc is
    the share of documents whose gold is 0, whatever the model."""
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    docs = [{"q": f"Line {i}:", "choices": ["the same", "the same"], "gold": int(i % 3 == 0)} for i in range(6)]
    (tasks / "docs.json").write_text("\n".join(json.dumps(d) for d in docs))
    (tasks / "same.yaml").write_text(
        "task: my_same_choice\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tasks / 'docs.json'}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: q\ndoc_to_choice: choices\n"
        "doc_to_target: gold\nmetric_list:\n  - metric: acc\n")
    env = os.environ | OFFLINE | {"SLIMKIT_CACHE": str(tmp_path / "cache"), "HF_DATASETS_CACHE": str(tmp_path / "ds")}
    p = subprocess.run([sys.executable, "-m", "slimkit", "eval", str(tiny_llama), "--tasks",
                        f"my_same_choice,{BUILTIN_TASK}", "--include-path", str(tasks), "--limit", "8", "-q"],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    rows = dict(line.split("  ", 1) for line in p.stdout.splitlines())
    assert rows["my_same_choice (6 docs)"].strip().startswith("acc 0.6667 ± ")  # gold 0 in 4 of 6
    assert rows[f"{BUILTIN_TASK} (8 docs)"].strip().startswith("acc ")
    assert "perplexity" not in p.stdout
    code = subprocess.run([sys.executable, "-m", "slimkit", "eval", str(tiny_llama), "--tasks", "my_same_choice",
                           "--include-path", str(tmp_path / "nowhere")], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)
    assert code.returncode == 2 and "is not a folder" in code.stderr and code.stderr.count("\n") == 1


@needs_lm_eval
def test_task_data_unreachable_is_one_line(tiny_llama, task_cache, tmp_path, capsys):
    """A task whose data is on the hub, offline and not cached: one line at once (no retries), exit 2."""
    (tmp_path / "hub.yaml").write_text(
        "task: my_hub_task\ndataset_path: slimkit-tests/no-such-dataset\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: q\ndoc_to_choice: choices\ndoc_to_target: gold\n")
    code, out, err = cli(["eval", str(tiny_llama), "--tasks", "my_hub_task", "--include-path", str(tmp_path), "-q"],
                         capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "cannot load the data of --tasks my_hub_task" in err and "--include-path" in err
