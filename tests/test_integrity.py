"""Integrity of the input model and of a checkpoint (issue 17, classes 1 and 5).

A safetensors checkpoint with a tensor missing, extra, renamed or of the wrong shape, or with
NaN/Inf anywhere (not only in the decoder blocks' Linears), is refused before the first block, in
memory and with --low-memory: a SlimkitError naming the tensors, exit 2 with one line from the
CLI, nothing written beside --out, the input untouched. Resume fingerprints the model files by
content, and a checkpoint that was edited or damaged is refused with "cannot resume: ..."."""
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import slimkit.api
from helpers import make_tokenizer, tiny_config
from slimkit.errors import SlimkitError
from test_cli import cli
from test_resume import run

WEIGHTS = "model.safetensors"


# ---------------------------------------------------------------- builders

def edited_copy(src, dst, edit):
    """A copy of the model folder ``src`` in ``dst``, its weights passed through ``edit(sd)``."""
    shutil.copytree(src, dst)
    sd = load_file(str(dst / WEIGHTS))
    edit(sd)
    save_file(sd, str(dst / WEIGHTS), metadata={"format": "pt"})
    return dst


def poison(key, index, value):
    def edit(sd):
        sd[key] = sd[key].clone()
        sd[key][index] = value
    return edit


def rename(old, new):
    return lambda sd: sd.__setitem__(new, sd.pop(old))


def computed_buffer(src, dst):
    """rope_theta 0 in config.json: the rotary inv_freq buffer, built from it, holds Inf."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.setdefault("rope_parameters", {"rope_type": "default"})["rope_theta"] = 0.0
    cfg["rope_theta"] = 0.0
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


UP = "model.layers.1.mlp.up_proj.weight"
Q = "model.layers.0.self_attn.q_proj.weight"

# case -> (how the copy is made, the names the error line must hold)
CASES = {
    "a Linear weight removed": (lambda s, d: edited_copy(s, d, lambda sd: sd.pop(UP)), [UP, "missing"]),
    "the untied lm_head removed": (lambda s, d: edited_copy(s, d, lambda sd: sd.pop("lm_head.weight")),
                                   ["lm_head.weight", "missing"]),
    "a tensor renamed": (lambda s, d: edited_copy(s, d, rename(Q, Q.replace("weight", "weigth"))),
                         [Q, Q.replace("weight", "weigth"), "missing", "unexpected"]),
    "a tensor of the wrong shape": (lambda s, d: edited_copy(s, d, lambda sd: sd.__setitem__(
        "model.norm.weight", torch.ones(32))), ["model.norm.weight", "(32,)", "wrong shape"]),
    "NaN in lm_head": (lambda s, d: edited_copy(s, d, poison("lm_head.weight", (5, 3), float("nan"))),
                       ["lm_head.weight (NaN)"]),
    "NaN in the final norm": (lambda s, d: edited_copy(s, d, poison("model.norm.weight", 7, float("nan"))),
                              ["model.norm.weight (NaN)"]),
    "NaN in an embedding row": (lambda s, d: edited_copy(
        s, d, poison("model.embed_tokens.weight", 311, float("nan"))), ["model.embed_tokens.weight (NaN)"]),
    "Inf in a computed buffer": (computed_buffer, ["model.rotary_emb.inv_freq (Inf)"]),
}


def digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_blocks(monkeypatch):
    """Reaching the engine (the first block) fails the test: every refusal comes before."""
    def reached(*a, **k):
        raise AssertionError("the run reached the blocks")
    monkeypatch.setattr(slimkit.api, "compress_model", reached)


def args(model, out, text, low_memory):
    return ["compress", str(model), "--recipe", "rtn-w4-g64", "--out", str(out), "--calib", str(text), "--no-eval",
            "--nsamples", "4", "--seqlen", "32", "-q", *(["--low-memory"] if low_memory else [])]


# ---------------------------------------------------------------- damaged input models

@pytest.mark.parametrize("low_memory", [False, True], ids=["in-memory", "low-memory"])
@pytest.mark.parametrize("case", list(CASES))
def test_damaged_model_refused_by_the_api(case, low_memory, tiny_llama, text_file, tmp_path, no_blocks):
    make, needles = CASES[case]
    model = make(tiny_llama, tmp_path / "model")
    before, names = digest(model), sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SlimkitError) as e:
        slimkit.api.compress(str(model), "rtn-w4-g64", tmp_path / "out", calib=str(text_file), nsamples=4, seqlen=32,
                             eval_data=None, progress=False, low_memory=low_memory)
    msg = str(e.value)
    assert all(n in msg for n in needles), msg
    assert "\n" not in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == names  # no out, no .out.partial
    assert digest(model) == before


@pytest.mark.parametrize("low_memory", [False, True], ids=["in-memory", "low-memory"])
@pytest.mark.parametrize("case", list(CASES))
def test_damaged_model_refused_by_the_cli(case, low_memory, tiny_llama, text_file, tmp_path, no_blocks, capsys,
                                          caplog):
    make, needles = CASES[case]
    model = make(tiny_llama, tmp_path / "model")
    before, names = digest(model), sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    caplog.clear()
    caplog.set_level(logging.INFO)  # the CLI logs INFO and up to stderr as "slimkit: ..." lines
    code, _, err = cli(args(model, tmp_path / "out", text_file, low_memory), capsys)
    logged = [f"slimkit: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.INFO]
    lines = [line for line in err.splitlines() if line.strip()] + logged
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("slimkit: error:"), lines
    assert all(n in lines[0] for n in needles), lines[0]
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    assert digest(model) == before


def test_many_damaged_tensors_are_named_a_few(tiny_llama, tmp_path):
    from slimkit.models.loading import load_model

    def edit(sd):
        for k in [k for k in sd if k.endswith("mlp.down_proj.weight") or k.endswith("layernorm.weight")]:
            sd[k] = torch.full_like(sd[k], float("nan"))
    model = edited_copy(tiny_llama, tmp_path / "model", edit)
    with pytest.raises(SlimkitError, match=r"NaN/Inf in 6 tensors: .+, .+, .+ and 3 more$"):
        load_model(str(model))


def test_real_entry_point_low_memory(tiny_llama, text_file, tmp_path):
    """``python -m slimkit``: exit 2, one line on stderr naming the tensor."""
    model = edited_copy(tiny_llama, tmp_path / "model", poison("lm_head.weight", (0, 0), float("inf")))
    r = subprocess.run([sys.executable, "-m", "slimkit", *args(model, tmp_path / "out", text_file, True)],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"slimkit: error: the input model {str(model)!r} contains NaN/Inf in 1 tensor: lm_head.weight (Inf)"], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_scan_reads_pieces_and_sees_the_last_one(tiny_llama):
    """The streamed scan reads a tensor in pieces of whole rows; the finiteness check looks at every piece."""
    from slimkit.models.loading import check_finite, nonfinite_kinds
    from slimkit.models.streaming import TensorStore

    store = TensorStore(tiny_llama)
    key = "model.embed_tokens.weight"
    pieces = list(store.pieces(key, elements=1000))  # 64 columns: 15 rows a piece
    assert len(pieces) == 22 and torch.equal(torch.cat(pieces), load_file(str(tiny_llama / WEIGHTS))[key])
    t = torch.zeros(1000)
    t[-1] = float("nan")
    assert nonfinite_kinds(t, chunk=64) == {"NaN"}
    t[0] = float("-inf")
    assert nonfinite_kinds(t, chunk=64) == {"NaN", "Inf"}
    with pytest.raises(SlimkitError, match=r"in 1 tensor: w \(NaN and Inf\)$"):
        check_finite("m", [("w", t[:500]), ("w", t[500:])])


# ---------------------------------------------------------------- legitimate models still load

@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("tied") / "llama"
    cfg = tiny_config("llama")
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    make_tokenizer(path)
    return path


@pytest.mark.parametrize("low_memory", [False, True], ids=["in-memory", "low-memory"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_sound_models_compress_and_reload(tied, low_memory, tiny_llama, tied_llama, text_file, tmp_path):
    from slimkit.models.loading import load_model

    model = tied_llama if tied else tiny_llama
    slimkit.api.compress(str(model), "rtn-w4-g64", tmp_path / "out", calib=str(text_file), nsamples=4, seqlen=32,
                         eval_data=None, progress=False, low_memory=low_memory)
    m = load_model(str(tmp_path / "out"), with_tokenizer=False)[0]  # the output passes the same checks
    assert (m.lm_head.weight is m.model.embed_tokens.weight) == tied


def default_gguf():
    from slimkit.errors import ModelError
    from slimkit.models.loading import default_gguf_path
    try:
        return default_gguf_path()
    except ModelError as e:
        pytest.skip(str(e))


@pytest.mark.slow
def test_default_gguf_loads():
    """The embedded default model, read from its GGUF file, passes the checks (its own tensors, finite)."""
    from slimkit.models.loading import load_model

    model, tok, _ = load_model(str(default_gguf()))
    assert model.config.tie_word_embeddings and tok is not None


@pytest.mark.slow
def test_nan_in_a_gguf_file_is_named(tmp_path):
    """A NaN written into the GGUF file's final norm (an F32 tensor) is refused, named by the model's name."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    from slimkit.errors import NumericalError
    from slimkit.models.loading import load_model

    src = default_gguf()
    path = tmp_path / "model.gguf"
    shutil.copyfile(src, path)
    norm = next(t for t in gguf.GGUFReader(str(src)).tensors if t.name == "output_norm.weight")
    assert norm.tensor_type == gguf.GGMLQuantizationType.F32
    with open(path, "r+b") as f:
        f.seek(int(norm.data_offset) + 4 * 5)
        f.write(np.array([np.nan], dtype=np.float32).tobytes())
    with pytest.raises(NumericalError, match=r"in 1 tensor: model\.norm\.weight \(NaN\)$"):
        load_model(str(path))


# ---------------------------------------------------------------- fingerprints by content

def test_file_digest_depends_on_content(tmp_path):
    from slimkit.calib.checkpoint import SAMPLE_BYTES, SAMPLES, file_digest

    big = tmp_path / "model.gguf"
    data = bytearray(os.urandom(5 << 20))
    big.write_bytes(data)
    first = file_digest(big)
    middle = 7 * (len(data) - SAMPLE_BYTES) // (SAMPLES - 1) + 100  # in the 8th of the sampled chunks
    for offset in (0, middle, len(data) - 1):  # a byte in the first, a middle and the last chunk
        changed = bytearray(data)
        changed[offset] ^= 0xFF
        big.write_bytes(changed)
        assert file_digest(big) != first, offset
    big.write_bytes(data)
    assert file_digest(big) == first
    # safetensors: the header names every tensor; a rename of the same length changes the digest
    sd = {f"t{i}": torch.zeros(64, 1024) for i in range(8)}  # 2 MiB of zeros: the samples alike
    save_file(sd, str(tmp_path / "a.safetensors"))
    sd["t9"] = sd.pop("t7")
    save_file(sd, str(tmp_path / "b.safetensors"))
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert a.stat().st_size == b.stat().st_size and file_digest(a) != file_digest(b)


# ---------------------------------------------------------------- resume

@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A 4-block tiny llama (its own copy) and a run of it SIGKILLed after block 1 (2 blocks committed)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("killed")
    model = root / "llama4"
    cfg = tiny_config("llama")
    cfg.num_hidden_layers = 4
    cfg.intermediate_size = 256  # weights over 1 MiB: fingerprinted by samples, not whole
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(model)
    make_tokenizer(model)
    text = root / "calib.txt"
    from helpers import TEXT
    text.write_text(TEXT)
    r = run(model, "rtn-w4-g64", root / "run" / "out", text, env={"SLIMKIT_FAULT_KILL_AFTER_BLOCK": "1"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert json.loads((root / "run" / ".out.partial" / "checkpoint" / "progress.json").read_text())["done"] == 2
    return root


def resume_copy(killed, tmp_path):
    """The killed run's partial output copied beside tmp_path / 'out' (the fingerprint does not
    hold the output's path; it does hold the model's: the resumed run reads the same folder)."""
    shutil.copytree(killed / "run" / ".out.partial", tmp_path / ".out.partial")
    return tmp_path / ".out.partial" / "checkpoint"


def assert_refused(r, tmp_path, *needles):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and all(n in lines[0] for n in needles), r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
    assert (tmp_path / ".out.partial" / "checkpoint" / "progress.json").is_file()  # kept for the user to judge


def test_resume_refuses_a_model_file_of_same_size_and_time(killed, tmp_path):
    from slimkit.calib.checkpoint import SAMPLE_BYTES, SAMPLES

    resume_copy(killed, tmp_path)
    f = killed / "llama4" / WEIGHTS
    st, original = f.stat(), f.read_bytes()
    assert st.st_size > SAMPLES * SAMPLE_BYTES  # the sampled path, as for a real model
    try:
        sd = load_file(str(f))
        save_file({k: -v for k, v in sd.items()}, str(f), metadata={"format": "pt"})  # same header, other values
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert (f.stat().st_size, f.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
        assert f.read_bytes() != original
        r = run(killed / "llama4", "rtn-w4-g64", tmp_path / "out", killed / "calib.txt", "--resume")
    finally:  # the model folder is the module's: put it back as it was, its time included
        f.write_bytes(original)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert_refused(r, tmp_path, "different run", "model_files")


def test_resume_of_an_untouched_checkpoint_still_works(killed, tmp_path):
    resume_copy(killed, tmp_path)
    r = run(killed / "llama4", "rtn-w4-g64", tmp_path / "out", killed / "calib.txt", "--resume")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out" / "report.json").read_text())["resumed_from_block"] == 2


def _drop_layers(ckpt):
    p = json.loads((ckpt / "progress.json").read_text())
    del p["layers"]
    (ckpt / "progress.json").write_text(json.dumps(p))


def _more_done(ckpt):
    p = json.loads((ckpt / "progress.json").read_text())
    p["done"] = 3
    (ckpt / "progress.json").write_text(json.dumps(p))


def _other_report(ckpt):
    """Well-formed, but not what was committed: a layer's reported error changed."""
    p = json.loads((ckpt / "progress.json").read_text())
    p["layers"][0]["rel_error"] = 0.0
    (ckpt / "progress.json").write_text(json.dumps(p))


def _truncate(name):
    def edit(ckpt):
        data = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(data[: len(data) // 2])
    return edit


def _other_values(ckpt):
    """block_0's weights replaced by others of the same size: loads fine, would mix two runs."""
    sd = load_file(str(ckpt / "block_0.safetensors"))
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}, str(ckpt / "block_0.safetensors"))


DAMAGE = {
    "progress.json without 'layers'": (_drop_layers, "progress.json"),
    "progress.json with another 'done'": (_more_done, "progress.json"),
    "progress.json with another report": (_other_report, "progress.json was edited"),
    "progress.json truncated": (_truncate("progress.json"), "unreadable"),
    "fingerprint.json truncated": (_truncate("fingerprint.json"), "unreadable"),
    "block_0 truncated": (_truncate("block_0.safetensors"), "block_0.safetensors"),
    "block_0 other values": (_other_values, "block_0.safetensors"),
    "inputs missing": (lambda ckpt: (ckpt / "inputs_1.safetensors").unlink(), "inputs_1.safetensors is missing"),
}


def test_block_that_does_not_fit_is_refused_without_a_resume_hint(killed, tmp_path):
    """Past the digests (rewritten here as a commit would): block_0 lacks a tensor. Refused when
    it is restored (after the "resuming after block 1" log line), with an error line that does not
    invite a --resume which would fail again."""
    from slimkit.calib.checkpoint import _progress_digest, file_digest

    ckpt = resume_copy(killed, tmp_path)
    sd = load_file(str(ckpt / "block_0.safetensors"))
    sd.pop(next(k for k in sd if k.endswith("mlp.up_proj.weight")))
    save_file(sd, str(ckpt / "block_0.safetensors"))
    p = json.loads((ckpt / "progress.json").read_text())
    p["files"]["block_0.safetensors"] = file_digest(ckpt / "block_0.safetensors")
    p["digest"] = _progress_digest(p)
    (ckpt / "progress.json").write_text(json.dumps(p))
    r = run(killed / "llama4", "rtn-w4-g64", tmp_path / "out", killed / "calib.txt", "--resume")
    errors = [line for line in r.stderr.splitlines() if line.startswith("slimkit: error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "cannot resume: block 0 of the checkpoint does not fit the model" in errors[0]
    assert "rerun the same command with --resume" not in r.stderr  # it would fail again
    assert not (tmp_path / "out").exists() and (ckpt / "progress.json").is_file()


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_cannot_resume(damage, killed, tmp_path):
    edit, needle = DAMAGE[damage]
    ckpt = resume_copy(killed, tmp_path)
    edit(ckpt)
    r = run(killed / "llama4", "rtn-w4-g64", tmp_path / "out", killed / "calib.txt", "--resume")
    assert_refused(r, tmp_path, "cannot resume: ", needle)
