"""Bad input matrix for the CLI (on top of test_cli.BAD): every case exits non-zero with ONE line
``slimkit: error: ...`` naming the problem, no traceback, no --out folder, nothing new written
beside it, and the input model / compressed folder left exactly as it was."""
import errno
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import transformers

import slimkit.pack.native
import slimkit.state_io
from helpers import tiny_config
from test_cli import cli, compress_args

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # "No space left on device"


# ---------------------------------------------------------------- builders (all under c.t = tmp_path)

def write(c, name, data):
    p = c.t / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data) if isinstance(data, bytes) else p.write_text(data)
    return p


def R(text, msg):
    """A case: compress with the recipe file ``text``, failing with ``msg``."""
    return lambda c: (compress(c, recipe=write(c, "r.yaml", text)), msg, [])


def compress(c, model=None, recipe="gptq-w4-g64", **options):
    """compress_args with some option values replaced: compress(c, nsamples=0) -> --nsamples 0."""
    args = compress_args(model or c.model, c.out, c.text, recipe)
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        args[args.index(flag) + 1] = str(value)
    return args


def model_copy(c, files=None):
    """A copy of the tiny llama (only ``files`` if given) in c.t / 'model'."""
    dst = c.t / "model"
    if files is None:
        shutil.copytree(c.model, dst)
    else:
        dst.mkdir()
        for f in files:
            shutil.copy2(c.model / f, dst / f)
    return dst


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def broken_config(c):
    dst = model_copy(c)
    (dst / "config.json").write_text("{'model_type': llama,")
    return dst


def mismatched_tokenizer(c):
    """The tiny llama's 320-token tokenizer on a model whose embedding has only 256 rows."""
    from transformers import AutoModelForCausalLM
    cfg = tiny_config("llama")
    cfg.vocab_size = 256
    dst = c.t / "model"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(dst)
    for f in TOKENIZER_FILES:
        shutil.copy2(c.model / f, dst / f)
    return dst


def truncated_gguf(c):
    """The first KB of a real (tiny, llama-architecture) GGUF file written by the gguf package."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    path = c.t / "gguf" / "model.gguf"
    path.parent.mkdir()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((320, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    path.write_bytes(path.read_bytes()[:1024])
    return path


def disk_full(c, module, name, then=lambda c: compress(c)):
    """``module.name`` (save_pretrained, or a safetensors save_file) writes part of its file, then
    finds the disk full."""
    def fail(path):
        path.write_bytes(b"\0" * 4096)
        raise ENOSPC
    if name == "save_pretrained":
        fake = lambda self, directory, *a, **k: fail(Path(directory) / "model.safetensors")  # noqa: E731
    else:
        fake = lambda tensors, filename, *a, **k: fail(Path(filename))  # noqa: E731
    c.monkeypatch.setattr(module, name, fake)
    return then(c)


def compressed_copy(c, corrupt=None):
    """A copy of a real `slimkit compress` output in c.t / 'compressed', one file truncated."""
    dst = c.t / "compressed"
    shutil.copytree(c.compressed, dst)
    if corrupt:
        data = (dst / corrupt).read_bytes()
        (dst / corrupt).write_bytes(data[: len(data) // 3])
    return dst


def export(c, src, fmt="native"):
    return ["export", str(src), "--format", fmt, "--out", str(c.out), "-q"]


def eval_args(c, model):
    return ["eval", str(model), "--data", str(c.text), "--seqlen", "32", "--max-tokens", "128", "-q"]


# ---------------------------------------------------------------- the matrix
# name -> c -> (argv, distinctive part of the error line, folders that must stay unchanged)

CASES = {
    # models
    "truncated gguf": lambda c: (compress(c, truncated_gguf(c)), "cannot read GGUF file", [c.t / "gguf"]),
    "garbage gguf": lambda c: (compress(c, write(c, "gguf/model.gguf", b"not a gguf file\n" * 64)),
                               "cannot read GGUF file", [c.t / "gguf"]),
    "model is a plain file": lambda c: (compress(c, write(c, "in/model.bin.txt", "hello")),
                                        "neither a model folder nor a .gguf file", [c.t / "in"]),
    "folder without config.json": lambda c: (compress(c, model_copy(c, TOKENIZER_FILES)), "has no config.json",
                                             [c.t / "model"]),
    "config.json but no weights": lambda c: (compress(c, model_copy(c, ("config.json", *TOKENIZER_FILES))),
                                             "cannot load the weights", [c.t / "model"]),
    "malformed config.json": lambda c: (compress(c, broken_config(c)), "cannot read the config", [c.t / "model"]),
    "tokenizer larger than the embedding": lambda c: (compress(c, mismatched_tokenizer(c)),
                                                      "tokenizer does not match the model", [c.t / "model"]),
    # recipes
    "empty recipe file": R("", "must be a mapping"),
    "recipe is a list": R("- method: rtn\n", "must be a mapping"),
    "empty stages": R("stages: []\n", "has no stages"),
    "stages is a mapping": R("stages: {method: rtn}\n", "'stages' list"),
    "stages is a string": R("stages: rtn\n", "'stages' list"),
    "stage is not a mapping": R("stages: [rtn]\n", "must be a mapping"),
    "unknown method": R("stages: [{method: awq}]\n", "unknown method 'awq'"),
    "bits: four": R("stages: [{method: rtn, bits: four}]\n", "bits must be an integer"),
    "bits: 4.5": R("stages: [{method: gptq, bits: 4.5}]\n", "bits must be an integer"),
    "percdamp: high": R("stages: [{method: gptq, percdamp: high}]\n", "percdamp must be a number"),
    "symmetric: 'no' (a string)": R("stages: [{method: rtn, symmetric: 'no'}]\n", "symmetric must be true or false"),
    "ft_lr: 1e-4 (a string in YAML)": R("stages: [{method: reallm, ft_lr: 1e-4}]\n", "ft_lr must be a number"),
    "sparsity 1.5": R("stages: [{method: wanda, sparsity: 1.5}]\n", "strictly between 0 and 1"),
    "sparsity -0.1": R("stages: [{method: sparsegpt, sparsity: -0.1}]\n", "strictly between 0 and 1"),
    "group_size 0": R("stages: [{method: rtn, group_size: 0}]\n", "group_size must be a positive integer"),
    "group_size -64": R("stages: [{method: gptq, group_size: -64}]\n", "group_size must be a positive integer"),
    "pruning twice": R("stages: [{method: magnitude}, {method: wanda}]\n", "prunes more than once"),
    # calibration / evaluation text
    "jsonl without text field": lambda c: (compress(c, calib=write(c, "c.jsonl", '{"txt": "to be"}\n')),
                                           "has no 'text' string", []),
    "malformed jsonl line": lambda c: (compress(c, calib=write(c, "c.jsonl", '{"text": "a"}\n{"text": \n')),
                                       "line 2 is not JSON", []),
    "json that is not a list": lambda c: (compress(c, calib=write(c, "c.json", '{"text": "a"}')),
                                          "must hold a list", []),
    "calibration folder without .txt": lambda c: (compress(c, calib=write(c, "texts/a.md", "x").parent),
                                                  "has no .txt files", []),
    "missing eval file": lambda c: (compress(c, eval=c.t / "none.txt"), "neither a file", []),
    "eval text shorter than a window": lambda c: (compress(c, eval=write(c, "short.txt", "to be")),
                                                  "one window needs", []),
    # command line
    "--nsamples 0": lambda c: (compress(c, nsamples=0), "--nsamples: must be positive", []),
    "--seqlen -5": lambda c: (compress(c, seqlen=-5), "--seqlen: must be positive", []),
    "--eval-tokens abc": lambda c: (compress(c, eval_tokens="abc"), "'abc' is not a number", []),
    "missing --recipe": lambda c: ([a for a in compress(c) if a not in ("--recipe", "gptq-w4-g64")],
                                   "required: --recipe", []),
    # disk full: the partial output is removed
    "disk full while saving the weights": lambda c: (
        disk_full(c, transformers.PreTrainedModel, "save_pretrained"), "No space left on device", []),
    "disk full while saving the state": lambda c: (
        disk_full(c, slimkit.state_io, "save_file"), "No space left on device", []),
    # export
    "export of a plain HF folder": lambda c: (export(c, model_copy(c)), "not a slimkit output folder",
                                              [c.t / "model"]),
    "export of a missing folder": lambda c: (export(c, c.t / "nowhere"), "is not a folder", []),
    "export with truncated state": lambda c: (export(c, compressed_copy(c, "slimkit_state.safetensors")),
                                              "is corrupt", [c.t / "compressed"]),
    "export with truncated slimkit.json": lambda c: (export(c, compressed_copy(c, "slimkit.json"), "peft"),
                                                     "is corrupt", [c.t / "compressed"]),
    "export to an unknown format": lambda c: (export(c, compressed_copy(c), "onnx"), "invalid choice: 'onnx'",
                                              [c.t / "compressed"]),
    "export with the disk full": lambda c: (
        disk_full(c, slimkit.pack.native, "save_file", lambda c: export(c, compressed_copy(c))),
        "No space left on device", [c.t / "compressed"]),
    # eval
    "eval of a missing path": lambda c: (eval_args(c, c.t / "missing" / "model"), "does not exist", []),
    "eval with a mismatched tokenizer": lambda c: (eval_args(c, mismatched_tokenizer(c)),
                                                   "tokenizer does not match the model", [c.t / "model"]),
}

def snapshot(folder: Path) -> list:
    """Every file below ``folder`` with its size and modification time."""
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in folder.rglob("*"))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_matrix(case, request, tiny_llama, text_file, tmp_path, monkeypatch, capsys, caplog):
    compressed = request.getfixturevalue("compressed") if case.startswith("export") else None
    c = SimpleNamespace(t=tmp_path, out=tmp_path / "out", model=tiny_llama, text=text_file,
                        compressed=compressed, monkeypatch=monkeypatch)
    args, msg, inputs = CASES[case](c)
    inputs = [tiny_llama, *inputs]  # the shared tiny llama is never touched either
    before = sorted(p.name for p in tmp_path.iterdir())
    inputs_before = [snapshot(p) for p in inputs]
    capsys.readouterr()  # drop what building the case printed (e.g. save_pretrained's progress bar)
    caplog.clear()
    caplog.set_level(logging.INFO)  # the CLI logs INFO and up to stderr as "slimkit: ..." lines

    code, _, err = cli([str(a) for a in args], capsys)

    assert code not in (0, None)
    logged = [f"slimkit: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.INFO]
    lines = [line for line in err.splitlines() if line.strip()] + logged
    assert len(lines) == 1, lines
    assert lines[0].startswith("slimkit: error:") and msg in lines[0], err
    assert "Traceback" not in err
    assert not c.out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no .out.partial or anything else
    assert [snapshot(p) for p in inputs] == inputs_before
