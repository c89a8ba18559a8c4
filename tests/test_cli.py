"""The command line: a tiny model end to end, and bad input -> one line, non-zero exit, nothing written."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from slimkit.cli import main


def cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def compress_args(model, out, text, recipe="gptq-w4-g64", extra=()):
    return ["compress", str(model), "--recipe", str(recipe), "--out", str(out), "--calib", str(text),
            "--eval", str(text), "--nsamples", "4", "--seqlen", "32", "--eval-tokens", "128", "-q", *extra]


def test_compress_end_to_end(tiny_llama, text_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    code, stdout, _ = cli(compress_args(tiny_llama, out, text_file, "sparsegpt-2of4-gptq-w4"), capsys)
    assert code == 0
    assert "perplexity compressed" in stdout
    report = json.loads((out / "report.json").read_text())
    ev = report["eval"]
    assert ev["ppl"] > 1 and ev["ref_ppl"] > 1 and ev["kl"] > 0
    assert 3 < report["compression"]["bits_per_weight"] < 4
    assert report["peak_rss_compress_mb"] > 0 and report["compression"]["timings"]["total"] > 0
    assert (out / "report.md").read_text().startswith("# slimkit compression report")
    assert not list(tmp_path.glob(".out.partial*"))
    m = AutoModelForCausalLM.from_pretrained(out)
    w = m.model.layers[0].self_attn.q_proj.weight
    assert (w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max() <= 2  # 2:4 survived the save


def test_eval_command(tiny_llama, text_file, capsys):
    code, stdout, _ = cli(["eval", str(tiny_llama), "--data", str(text_file), "--reference", str(tiny_llama),
                           "--seqlen", "32", "--max-tokens", "128", "-q"], capsys)
    assert code == 0 and "perplexity" in stdout
    assert "KL(reference || model)  0.0000" in stdout  # a model against itself


def test_recipes_command(capsys):
    code, stdout, _ = cli(["recipes"], capsys)
    assert code == 0 and "sparsegpt-2of4-gptq-w4" in stdout


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


BAD = {
    "missing model path": lambda t, m, txt: ([str(t / "no" / "model")], "does not exist"),
    "unknown recipe key": lambda t, m, txt: (["--recipe", str(write(t, "r.yaml", "stages: [{method: rtn}]\nfoo: 1\n"))], "foo"),
    "unknown stage key": lambda t, m, txt: (["--recipe", str(write(t, "r.yaml", "stages: [{method: rtn, bitz: 4}]\n"))], "bitz"),
    "bits=1": lambda t, m, txt: (["--recipe", str(write(t, "r.yaml", "stages: [{method: rtn, bits: 1}]\n"))], "bits"),
    "bits=9": lambda t, m, txt: (["--recipe", str(write(t, "r.yaml", "stages: [{method: gptq, bits: 9}]\n"))], "bits"),
    "pattern 5:4": lambda t, m, txt: (["--recipe", str(write(t, "r.yaml", "stages: [{method: wanda, sparsity: '5:4'}]\n"))], "5:4"),
    "pattern not dividing the width": lambda t, m, txt: (["--recipe", str(write(t, "r.yaml", "stages: [{method: magnitude, sparsity: '3:7'}]\n"))], "multiple of 7"),
    "unknown recipe": lambda t, m, txt: (["--recipe", "no-such-recipe"], "unknown recipe"),
    "missing recipe file": lambda t, m, txt: (["--recipe", str(t / "nope.yaml")], "does not exist"),
    "malformed YAML": lambda t, m, txt: (["--recipe", str(write(t, "r.yaml", "stages: [\n"))], "YAML"),
    "empty calibration file": lambda t, m, txt: (["--calib", str(write(t, "empty.txt", ""))], "empty"),
    "too-short calibration": lambda t, m, txt: (["--calib", str(write(t, "short.txt", "to be"))], "tokens"),
    "missing calibration file": lambda t, m, txt: (["--calib", str(t / "none.txt")], "neither a file"),
}


def run_bad(args_over, model, out, text, capsys):
    base = compress_args(model, out, text)
    # replace the positional model or an option with the override
    if args_over and not args_over[0].startswith("--"):
        base[1] = args_over[0]
        args_over = args_over[1:]
    for i in range(0, len(args_over), 2):
        base[base.index(args_over[i]) + 1] = args_over[i + 1]
    return cli(base, capsys)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(case, tiny_llama, text_file, tmp_path, capsys):
    over, msg = BAD[case](tmp_path, tiny_llama, text_file)
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, err = run_bad(over, tiny_llama, out, text_file, capsys)
    assert code not in (0, None)
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("slimkit: error:") and msg in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written beside it either


def test_existing_output_is_refused_and_untouched(tiny_llama, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = cli(compress_args(tiny_llama, out, text_file), capsys)
    assert code == 2 and "already exists" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_output_inside_input_refused(tiny_llama, text_file, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    before = sorted(p.name for p in model.iterdir())
    code, _, err = cli(compress_args(model, model / "out", text_file), capsys)
    assert code == 2 and "inside the input" in err
    assert sorted(p.name for p in model.iterdir()) == before


def test_unknown_architecture(tiny_llama, text_file, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel
    model = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=320)).save_pretrained(model)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama / f, model / f)
    code, _, err = cli(compress_args(model, tmp_path / "out", text_file), capsys)
    assert code == 2 and "unsupported architecture 'gpt2'" in err
    assert not (tmp_path / "out").exists()


def test_corrupt_weights(tiny_llama, text_file, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 3])
    code, _, err = cli(compress_args(model, tmp_path / "out", text_file), capsys)
    assert code == 2 and "cannot load the weights" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_no_traceback_from_the_real_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "slimkit", "compress", str(tmp_path / "missing"), "--recipe",
                        "gptq-w4-g64", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"slimkit: error: model path '{tmp_path / 'missing'}' does not exist"]


def test_saved_model_reproduces_logits(tiny_llama, text_file, tmp_path):
    """The saved folder computes exactly what the compressed in-memory model computes."""
    from transformers import AutoModelForCausalLM

    from slimkit.api import compress
    from slimkit.calib import compress_model
    from slimkit.data import calibration_ids
    from slimkit.models import layout_for, load_model
    from slimkit.recipe import load_recipe

    out = tmp_path / "o"
    compress(str(tiny_llama), "wanda-2of4-rtn-w4", out, calib=str(text_file), nsamples=4, seqlen=32,
             eval_data=None, progress=False)
    saved = AutoModelForCausalLM.from_pretrained(out)
    mem, tok, _ = load_model(str(tiny_llama))
    compress_model(mem, layout_for(mem), load_recipe("wanda-2of4-rtn-w4"),
                   calibration_ids(str(text_file), tok, 4, 32, 0), progress=False)
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        a, b = saved(input_ids=ids).logits, mem(input_ids=ids).logits
        dense = load_model(str(tiny_llama))[0](input_ids=ids).logits
    assert torch.equal(a, b) and not torch.equal(a, dense)


# runs the CLI with a pause (marker file written, then a long sleep) right after the checkpoint is
# opened (no block finished yet) or right after block 0 is committed, so SIGTERM always lands there
PAUSED_CLI = """
import pathlib, sys, time
from slimkit.calib.checkpoint import Checkpoint
marker, where = pathlib.Path(sys.argv[1]), sys.argv[2]
real = getattr(Checkpoint, where)

def paused(self, *a, **k):
    r = real(self, *a, **k)
    marker.touch()
    time.sleep(600)
    return r

setattr(Checkpoint, where, paused)
from slimkit.cli import main
main(sys.argv[3:])
"""


@pytest.mark.parametrize("block_finished", [False, True])
def test_sigterm_leaves_no_finished_looking_output(tiny_llama, text_file, tmp_path, block_finished):
    """A terminated run never creates --out; its hidden temporary folder is removed when no block
    was finished, and kept with a one-line hint once one was; --resume then completes the run."""
    import signal
    import time
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    out = run_dir / "out"
    partial = run_dir / ".out.partial"
    marker = tmp_path / "paused"
    script = tmp_path / "paused_cli.py"
    script.write_text(PAUSED_CLI)
    args = compress_args(tiny_llama, out, text_file, "gptq-w4-g64")[:-1]  # progress bars on, too
    with open(tmp_path / "stderr.txt", "w") as errf:
        p = subprocess.Popen([sys.executable, str(script), str(marker), "commit" if block_finished else "open", *args],
                             stderr=errf, stdout=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and not marker.exists() and p.poll() is None:
            time.sleep(0.05)
        assert marker.exists() and p.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
        assert partial.is_dir() and not out.exists()  # paused mid-run: only the hidden folder exists
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
    err = (tmp_path / "stderr.txt").read_text()
    lines = [l for l in err.splitlines() if l.startswith("slimkit:")]  # (progress bars are on, too)
    assert p.returncode == 143 and len(lines) == 1 and lines[0].startswith("slimkit: terminated"), err
    assert not out.exists()
    if not block_finished:  # nothing worth resuming: nothing left behind
        assert lines[0] == "slimkit: terminated", err
        assert list(run_dir.iterdir()) == []
        return
    assert lines[0] == f"slimkit: terminated; progress kept in {partial}: rerun the same command with --resume " \
                       "to continue", err
    assert json.loads((partial / "checkpoint" / "progress.json").read_text())["done"] == 1
    r = subprocess.run([sys.executable, "-m", "slimkit", *args, "--resume"], capture_output=True, text=True)
    assert r.returncode == 0 and out.is_dir() and not partial.exists(), r.stderr
    assert json.loads((out / "report.json").read_text())["compression"]["layers"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["out"]
