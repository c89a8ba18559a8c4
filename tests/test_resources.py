"""Resources and writers (issue 17, classes 3, 4, 6): a full disk, absurd sizes, two runs into one
output, windows longer than the model's positions, file modes. Each refusal: exit 2, one line on
stderr, no traceback, nothing created at or beside --out (parent folders included), input untouched."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SMALL = ["--nsamples", "4", "--seqlen", "32", "--eval-tokens", "128", "-q"]


def _args(model, out, text, *extra, recipe="gptq-w4-g64"):
    return ["compress", str(model), "--recipe", recipe, "--out", str(out), "--calib", str(text),
            "--eval", str(text), *SMALL, *extra]


def _cli(*args, env=None, script=None):
    cmd = [sys.executable, *(["-c", script] if script else ["-m", "slimkit"]), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _one_line(r, *words):
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("slimkit: error:"), r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def _snapshot(path: Path):
    return sorted((str(p.relative_to(path)), p.read_bytes()) for p in path.rglob("*") if p.is_file())


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs (root only), to fill up for real."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()

    def mount(size: str):
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        return mnt
    yield mount
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_not_enough_disk_refused_up_front(tiny_llama, text_file, tmpfs):
    mnt = tmpfs("128k")
    before = _snapshot(tiny_llama)
    t = time.time()
    r = _cli(*_args(tiny_llama, mnt / "a" / "b" / "out", text_file))
    _one_line(r, "not enough free disk space", "free", "(model ", "state records", "checkpoint")
    assert time.time() - t < 60
    assert list(mnt.iterdir()) == []  # no parent folders, no partial folder
    assert _snapshot(tiny_llama) == before


# the up-front check patched away: the disk fills during the run itself
UNCHECKED = """
import sys
import slimkit.api as api
api.check_resources = lambda *a, **k: None
from slimkit.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("offload", [False, True])
def test_disk_full_during_the_run_is_one_line(tiny_llama, text_file, tmpfs, offload):
    """ENOSPC while writing the output (safetensors' writer) or allocating offloaded activations
    (no SIGBUS): one line, exit 2, the partial folder and the parent folders it created removed."""
    mnt = tmpfs("300k" if not offload else "64k")
    extra = ["--offload-activations", "--nsamples", "64"] if offload else []
    r = _cli(*_args(tiny_llama, mnt / "a" / "out", text_file, *extra), script=UNCHECKED)
    _one_line(r, "No space left on device")
    assert list(mnt.iterdir()) == []


def test_absurd_calibration_size_refused_quickly(tiny_llama, text_file, tmp_path):
    t = time.time()
    r = _cli(*_args(tiny_llama, tmp_path / "x" / "out", text_file, "--nsamples", "100000000", "--seqlen", "256"))
    _one_line(r, "--nsamples", "available")
    assert time.time() - t < 60
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cmd", ["compress", "eval"])
def test_seqlen_beyond_positions_refused(tiny_llama, text_file, tmp_path, cmd):
    if cmd == "compress":
        r = _cli(*_args(tiny_llama, tmp_path / "out", text_file, "--seqlen", "512"))
    else:
        r = _cli("eval", tiny_llama, "--data", text_file, "--seqlen", "512", "-q")
    _one_line(r, "--seqlen 512", "256 positions")
    assert list(tmp_path.iterdir()) == []


PAUSED = """
import pathlib, sys, time
from slimkit.calib.checkpoint import Checkpoint
marker, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
real = Checkpoint.open
def paused(self, *a, **k):
    r = real(self, *a, **k)
    marker.touch()
    while not go.exists():
        time.sleep(0.05)
    return r
Checkpoint.open = paused
from slimkit.cli import main
main(sys.argv[3:])
"""


def test_second_writer_refused_while_first_runs(tiny_llama, text_file, tmp_path):
    """Two real processes into one --out: the second (and a --resume) is refused with one line while
    the first holds the partial folder's lock; the first then finishes untouched."""
    out = tmp_path / "run" / "out"
    marker, go = tmp_path / "paused", tmp_path / "go"
    a = subprocess.Popen([sys.executable, "-c", PAUSED, str(marker), str(go), *_args(tiny_llama, out, text_file)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not marker.exists() and a.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), a.stderr.read() if a.poll() is not None else "timeout"
        partial = out.parent / ".out.partial"
        before = _snapshot(partial)
        for extra in ([], ["--resume"]):
            r = _cli(*_args(tiny_llama, out, text_file, *extra))
            _one_line(r, "another slimkit run is writing")
            assert _snapshot(partial) == before and not out.exists()
        go.touch()
        assert a.wait(timeout=300) == 0, a.stderr.read()
    finally:
        go.touch()
        a.kill() if a.poll() is None else None
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
    assert (out / "report.json").is_file() and not (out / ".lock").exists()


def test_racing_starts_one_wins(tiny_llama, text_file, tmp_path):
    """Started together (no pause): exactly one run writes --out, the other is refused in one line."""
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "slimkit", *_args(tiny_llama, out, text_file)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes == [0, 2], results
    err = next(e for c, e in results if c == 2)
    assert "another slimkit run is writing" in err or "an unfinished run" in err or "already exists" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_files_follow_the_umask(tiny_llama, text_file, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(["sh", "-c", 'umask 022 && exec "$@"', "sh", sys.executable, "-m", "slimkit",
                        *_args(tiny_llama, out, text_file)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes and all(m == 0o644 for m in modes.values()), modes
    assert out.stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize("spec,words", [("someone/some-model", ["cannot be reached"]),
                                        ("models/sub/llama", ["does not exist"]),
                                        ("my model", ["does not exist"])])
def test_unreachable_hub_and_missing_paths_are_one_quick_line(text_file, tmp_path, spec, words):
    """Offline, a hub id is refused at once (the hub asked once, no retries); a name that cannot be a
    hub id is a missing path."""
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9")  # a closed port: unreachable on any machine
    t = time.time()
    r = _cli(*_args(spec, tmp_path / "out", text_file), env=env)
    _one_line(r, repr(spec), *words)
    assert time.time() - t < 30
    assert list(tmp_path.iterdir()) == []


def test_partial_folder_lock_states(tmp_path):
    """The partial folder's lock, state by state: held by a live run (refused), left by a dead run
    (its leftovers cleared, the lock taken), a folder without a lock file (being created: refused);
    the finished output holds no lock file."""
    import fcntl

    from slimkit.api import LOCK, atomic_dir, partial_dir
    from slimkit.errors import SlimkitError
    out = tmp_path / "out"
    tmp = partial_dir(out)
    tmp.mkdir()
    (tmp / "junk").write_text("x")
    fd = os.open(tmp / LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a live run (another open file description: flock conflicts)
    with pytest.raises(SlimkitError, match="another slimkit run"):
        with atomic_dir(out):
            pass
    assert (tmp / "junk").exists()
    os.close(fd)  # the run died
    with atomic_dir(out) as t:
        assert t == tmp and not (t / "junk").exists()
        (t / "a").write_text("done")
    assert sorted(p.name for p in out.iterdir()) == ["a"] and not tmp.exists()
    tmp.mkdir()  # created by another run that has not taken its lock yet
    with pytest.raises(SlimkitError, match="another slimkit run"):
        with atomic_dir(tmp_path / "out"):
            pass


def test_output_finished_by_another_run_meanwhile(tmp_path):
    """A run that passed the output check while another was finishing: refused once it holds its
    lock, before any work, its partial folder removed."""
    from slimkit.api import atomic_dir, partial_dir
    from slimkit.errors import SlimkitError
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("the other run's")
    ran = []
    with pytest.raises(SlimkitError, match="already exists"):
        with atomic_dir(out):
            ran.append(1)
    assert not ran and not partial_dir(out).exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """A llama whose blocks outweigh its embedding (hidden 256, MLP 512, 3 blocks, tied head): its
    blocks' 7 MiB in fp32 are what a checkpoint may or may not copy."""
    from transformers import AutoModelForCausalLM

    from helpers import family_config, make_tokenizer
    path = tmp_path_factory.mktemp("wide") / "llama"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(family_config("llama", layers=3, hidden_size=256, intermediate_size=512,
                                                   head_dim=64, tie_word_embeddings=True)).save_pretrained(path)
    make_tokenizer(path)
    return path


@pytest.mark.parametrize("recipe,low_memory", [
    ("rtn-w4-g64", False), ("rtn-w4-g64", True), ("sparsegpt-2of4-gptq-w4", True), ("slim", False),
    ("gptaq-w4-g64", True), ("rotate-gptq-w4-g64", False), ("slim-llm-3bit", False), ("rtn-gguf-q4_k_m", True),
    ("reallm-2bit", False), ("slim-ft", False), ("rtn-w4-g64", "no links")])
def test_disk_estimate_bounds_the_peak(wide_llama, text_file, tmp_path, monkeypatch, recipe, low_memory):
    """The disk check's estimate is at least what the run holds on disk at its peak (the output
    written, the checkpoint not yet removed), and not far above it: a resident model's checkpoint
    holds every compressed block and the state records, a streamed one's neither (its blocks are in
    the output's shards, and it links the output's record shards); the dense model's inputs are checkpointed too under a dense target (gptaq),
    and a rotation unties the head of a model with tied embeddings; a fine-tuning recipe checkpoints
    the base weights of its adapters; where the file system makes no hard links ("no links": os.link
    fails), the streamed checkpoint copies the record shards and the estimate counts them. The allowance for the reports
    (256 KiB and 2 KiB per Linear) is most of the slack on a model this small."""
    import slimkit.api as api
    from slimkit.calib.checkpoint import Checkpoint

    seen = {}
    need, remove = api.disk_need, Checkpoint.remove
    monkeypatch.setattr(api, "disk_need", lambda *a, **k: seen.setdefault("parts", need(*a, **k)))

    def measured(self):
        seen["peak"] = api.bytes_on_disk(self.dir.parent)
        remove(self)
    monkeypatch.setattr(Checkpoint, "remove", measured)
    if low_memory == "no links":
        def no_link(*a, **k):
            raise OSError("no hard links here")
        monkeypatch.setattr(os, "link", no_link)
    api.compress(str(wide_llama), recipe, tmp_path / "out", calib=str(text_file), nsamples=4, seqlen=32,
                 eval_data=None, progress=False, low_memory=bool(low_memory))
    seen["estimate"] = sum(seen["parts"].values())
    # ReALLM: counts the fp32 base weight that a rank above 0 would keep (this run chose rank 0)
    assert seen["peak"] <= seen["estimate"] <= (2 if "reallm" in recipe else 1.15) * seen["peak"] + 2**19, seen


def test_bytes_on_disk_counts_a_linked_file_once(tmp_path):
    """What a resumed run holds already (subtracted from its need): the checkpoint's hard link to an
    output shard is one file on disk, not two."""
    from slimkit.api import bytes_on_disk

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "shard").write_bytes(b"x" * 1000)
    (tmp_path / "d" / "other").write_bytes(b"y" * 10)
    os.link(tmp_path / "d" / "shard", tmp_path / "d" / "link")
    assert bytes_on_disk(tmp_path / "d") == 1010
    assert bytes_on_disk(tmp_path / "missing") == 0


def test_disk_estimate_counts_only_the_files_copied_beside_the_weights():
    """The tokenizer and configuration files of the model's folder are copied into the output;
    weights in other formats (TF, Flax, ONNX), their index, a README or an image are not."""
    from slimkit.api import _copied_beside

    copied = ["tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json", "vocab.txt",
              "merges.txt", "tokenizer.model", "chat_template.jinja", "special_tokens_map.json"]
    not_copied = ["tf_model.h5", "flax_model.msgpack", "rust_model.ot", "model.onnx", "model.safetensors",
                  "model.safetensors.index.json", "pytorch_model.bin", "README.md", "diagram.png", "model.gguf"]
    assert [n for n in copied if not _copied_beside(n)] == []
    assert [n for n in not_copied if _copied_beside(n)] == []
