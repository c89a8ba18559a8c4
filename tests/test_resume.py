"""Resume after a kill, and byte-identical output: a run SIGKILLed after a block and resumed
writes exactly the files of an uninterrupted run (the reports hold timings and differ)."""
import json
import os
import signal
import subprocess
import sys

import pytest
import yaml

from helpers import make_tokenizer, tiny_config
from slimkit.recipe import load_recipe

TIMED = {"report.json", "report.md"}  # wall-clock times and RSS: the only files allowed to differ


@pytest.fixture(scope="module")
def four_blocks(tmp_path_factory):
    """A tiny llama with 4 blocks, so that a kill lands in the middle."""
    import torch
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("four") / "llama4"
    cfg = tiny_config("llama")
    cfg.num_hidden_layers = 4
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    make_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def ft_recipe(tmp_path_factory):
    """SparseGPT+GPTQ, quantized adapters and a few fine-tuning steps: every kind of state a
    checkpoint must carry (masks, grids, adapters with their base weight, the RNG)."""
    rec = load_recipe("slim-plus").to_dict()
    rec["finetune"] = {"steps": 3, "batch_size": 2, "lr": 1e-2, "warmup": 1}
    p = tmp_path_factory.mktemp("recipe") / "ft.yaml"
    p.write_text(yaml.safe_dump(rec))
    return p


def run(model, recipe, out, text, *extra, env=None):
    args = [sys.executable, "-m", "slimkit", "compress", str(model), "--recipe", str(recipe), "--out", str(out),
            "--calib", str(text), "--no-eval", "--nsamples", "8", "--seqlen", "32", "--batch-size", "4", "-q",
            *extra]
    return subprocess.run(args, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_files(a, b):
    fa, fb = files(a), files(b)
    assert sorted(fa) == sorted(fb)
    differ = [name for name in fa if name not in TIMED and fa[name] != fb[name]]
    assert not differ, f"files differ: {differ}"


def test_sigkill_then_resume_gives_byte_identical_files(four_blocks, ft_recipe, text_file, tmp_path):
    ref = run(four_blocks, ft_recipe, tmp_path / "ref", text_file)
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "out"
    killed = run(four_blocks, ft_recipe, out, text_file, env={"SLIMKIT_FAULT_KILL_AFTER_BLOCK": "1"})
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists()  # nothing that looks finished
    partial = tmp_path / ".out.partial"
    assert json.loads((partial / "checkpoint" / "progress.json").read_text())["done"] == 2

    again = run(four_blocks, ft_recipe, out, text_file)  # without --resume: refused, progress untouched
    assert again.returncode == 2 and "--resume" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert (partial / "checkpoint" / "progress.json").is_file()

    resumed = run(four_blocks, ft_recipe, out, text_file, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert not partial.exists() and not (out / "checkpoint").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_from_block"] == 2
    assert [b["index"] for b in report["compression"]["blocks"]] == [0, 1, 2, 3]
    assert len(report["compression"]["layers"]) == 4 * 7
    assert_same_files(tmp_path / "ref", out)


def test_resume_refuses_a_different_run(four_blocks, text_file, tmp_path):
    out = tmp_path / "out"
    killed = run(four_blocks, "gptq-w4-g64", out, text_file, env={"SLIMKIT_FAULT_KILL_AFTER_BLOCK": "0"})
    assert killed.returncode == -signal.SIGKILL
    other = run(four_blocks, "rtn-w4-g64", out, text_file, "--resume")
    assert other.returncode == 2
    lines = other.stderr.strip().splitlines()
    assert len(lines) == 1 and "different run" in lines[0] and "recipe" in lines[0], other.stderr
    seeds = run(four_blocks, "gptq-w4-g64", out, text_file, "--resume", "--seed", "1")
    assert seeds.returncode == 2 and "calibration" in seeds.stderr
    threads = run(four_blocks, "gptq-w4-g64", out, text_file, "--resume", env={"OMP_NUM_THREADS": "2"})
    assert threads.returncode == 2 and "threads" in threads.stderr, threads.stderr  # another summation order
    assert (tmp_path / ".out.partial" / "checkpoint" / "progress.json").is_file()  # the other run's progress kept
    ok = run(four_blocks, "gptq-w4-g64", out, text_file, "--resume")
    assert ok.returncode == 0, ok.stderr


def test_resume_without_a_checkpoint_starts_afresh(four_blocks, text_file, tmp_path):
    r = run(four_blocks, "rtn-w4-g64", tmp_path / "out", text_file, "--resume")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out" / "report.json").read_text())["resumed_from_block"] == 0


def test_same_inputs_give_byte_identical_files(tiny_llama, text_file, tmp_path):
    for name in ("a", "b"):
        r = run(tiny_llama, "sparsegpt-2of4-gptq-w4", tmp_path / name, text_file)
        assert r.returncode == 0, r.stderr
    assert_same_files(tmp_path / "a", tmp_path / "b")


def test_finetuning_an_unquantized_base_checkpoints(four_blocks, text_file, tmp_path):  # noqa: F811
    """Wanda + fp16 adapters + fine-tuning: the base weight is both a state record and the
    fine-tuning payload; the checkpoint must hold it once (safetensors refuses shared tensors)."""
    rec = {"stages": [{"method": "wanda", "sparsity": "2:4"},
                      {"method": "slim_lora", "rank": 8, "adapter_bits": None, "pad_to": None}],
           "finetune": {"steps": 2, "batch_size": 2, "lr": 1e-3, "warmup": 0}}
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(rec))
    ref = run(four_blocks, p, tmp_path / "ref", text_file)
    assert ref.returncode == 0, ref.stderr
    killed = run(four_blocks, p, tmp_path / "out", text_file, env={"SLIMKIT_FAULT_KILL_AFTER_BLOCK": "2"})
    assert killed.returncode == -signal.SIGKILL
    resumed = run(four_blocks, p, tmp_path / "out", text_file, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_files(tmp_path / "ref", tmp_path / "out")


@pytest.fixture(scope="module")
def four_blocks_bf16(tmp_path_factory, four_blocks):
    """The same 4-block llama stored in bf16 (compressed in its own dtype, computed in fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("four16") / "llama4-bf16"
    AutoModelForCausalLM.from_pretrained(four_blocks, dtype=torch.bfloat16).save_pretrained(path)
    make_tokenizer(path)
    return path


def test_bf16_sigkill_then_resume_gives_byte_identical_files(four_blocks_bf16, ft_recipe, text_file, tmp_path):
    """Resume stays byte-identical when the model is bf16 (blocks onloaded to fp32 and back,
    adapters fine-tuned on an fp32 view, output written in bf16)."""
    ref = run(four_blocks_bf16, ft_recipe, tmp_path / "ref", text_file)
    assert ref.returncode == 0, ref.stderr
    assert json.loads((tmp_path / "ref" / "config.json").read_text())["dtype"] == "bfloat16"
    out = tmp_path / "out"
    killed = run(four_blocks_bf16, ft_recipe, out, text_file, env={"SLIMKIT_FAULT_KILL_AFTER_BLOCK": "1"})
    assert killed.returncode == -signal.SIGKILL
    resumed = run(four_blocks_bf16, ft_recipe, out, text_file, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "report.json").read_text())["resumed_from_block"] == 2
    assert_same_files(tmp_path / "ref", out)
