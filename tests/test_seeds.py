"""compress --seeds: one run per calibration seed, mean and spread."""
import json
import math
import subprocess
import sys

import pytest

from slimkit.errors import SlimkitError
from slimkit.seeds import compress_seeds, parse_seeds, spread

KW = dict(nsamples=4, seqlen=32, eval_tokens=256, progress=False)


def test_seeds_give_the_mean_of_separate_runs(tiny_llama, text_file, tmp_path):
    from slimkit.api import compress

    summary = compress_seeds(str(tiny_llama), "gptq-w3-g64", tmp_path / "s", [0, 1, 2], calib=str(text_file),
                             eval_data=str(text_file), **KW)
    alone = [compress(str(tiny_llama), "gptq-w3-g64", tmp_path / f"a{s}", seed=s, calib=str(text_file),
                      eval_data=str(text_file), **KW)["eval"] for s in (0, 1, 2)]
    ppl = [e["ppl"] for e in alone]
    assert [r["ppl"] for r in summary["seeds"]] == ppl
    assert len(set(ppl)) == 3  # the seeds really draw different calibration windows
    assert summary["ppl"]["mean"] == pytest.approx(sum(ppl) / 3, rel=1e-12)
    assert summary["ppl"]["std"] == pytest.approx(math.sqrt(sum((p - sum(ppl) / 3) ** 2 for p in ppl) / 2), rel=1e-9)
    assert summary["kl"]["mean"] == pytest.approx(sum(e["kl"] for e in alone) / 3, rel=1e-12)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["seed-0", "seed-1", "seed-2", "seeds.json", "seeds.md"]
    assert json.loads((tmp_path / "s" / "seeds.json").read_text())["ppl"] == summary["ppl"]
    assert "± is the sample standard deviation" in (tmp_path / "s" / "seeds.md").read_text()


def test_resume_keeps_finished_seeds(tiny_llama, text_file, tmp_path):
    compress_seeds(str(tiny_llama), "rtn-w4-g64", tmp_path / "s", [0, 1], calib=str(text_file),
                   eval_data=str(text_file), **KW)
    stamp = (tmp_path / "s" / "seed-0" / "report.json").stat().st_mtime_ns
    import shutil
    shutil.rmtree(tmp_path / "s" / "seed-1")
    (tmp_path / "s" / "seeds.json").unlink()
    summary = compress_seeds(str(tiny_llama), "rtn-w4-g64", tmp_path / "s", [0, 1], calib=str(text_file),
                             eval_data=str(text_file), resume=True, **KW)
    assert (tmp_path / "s" / "seed-0" / "report.json").stat().st_mtime_ns == stamp
    assert [r["seed"] for r in summary["seeds"]] == [0, 1]
    (tmp_path / "s" / "other.txt").write_text("x")
    with pytest.raises(SlimkitError, match="holds other files"):
        compress_seeds(str(tiny_llama), "rtn-w4-g64", tmp_path / "s", [0, 1], calib=str(text_file), resume=True,
                       **KW)
    with pytest.raises(SlimkitError, match="already exists and is not empty"):
        compress_seeds(str(tiny_llama), "rtn-w4-g64", tmp_path / "s", [0, 1], calib=str(text_file), **KW)


def test_parse_and_spread():
    assert parse_seeds("0,1, 2") == [0, 1, 2]
    for bad in ("0", "a,b", "1,1", "-1,2"):
        with pytest.raises(SlimkitError):
            parse_seeds(bad)
    s = spread([1.0, 2.0, 6.0])
    assert s["mean"] == 3.0 and s["std"] == pytest.approx(math.sqrt(7)) and (s["min"], s["max"]) == (1.0, 6.0)
    assert spread([1.0, None]) is None


def test_same_seed_and_threads_give_the_same_bytes_and_the_report_says_how_many(tiny_llama, text_file, tmp_path):
    """The same command is bit-reproducible for a fixed thread count (the thread count changes the
    summation order of matrix products, hence the result: it is recorded)."""
    import hashlib
    import os

    def go(out, threads):
        r = subprocess.run([sys.executable, "-m", "slimkit", "compress", str(tiny_llama), "--recipe", "gptq-w4-g64",
                            "--out", str(out), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32",
                            "--no-eval", "-q"], capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        assert r.returncode == 0, r.stderr
        return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest(), \
            json.loads((out / "report.json").read_text())
    (h1, r1), (h2, _), (_, r3) = go(tmp_path / "a", 1), go(tmp_path / "b", 1), go(tmp_path / "c", 2)
    assert h1 == h2
    assert (r1["threads"], r3["threads"]) == (1, 2)
    assert "(1 CPU thread)" in (tmp_path / "a" / "report.md").read_text()


def test_cli_seeds(tiny_llama, text_file, tmp_path):
    r = subprocess.run([sys.executable, "-m", "slimkit", "compress", str(tiny_llama), "--recipe", "rtn-w4-g64",
                        "--out", str(tmp_path / "s"), "--calib", str(text_file), "--eval", str(text_file),
                        "--nsamples", "4", "--seqlen", "32", "--eval-tokens", "256", "--seeds", "3,4", "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "s" / "seeds.json").read_text())
    assert [row["seed"] for row in summary["seeds"]] == [3, 4]
    assert "perplexity (mean ± std)" in r.stdout and "seed 3" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "slimkit", "compress", str(tiny_llama), "--recipe", "rtn-w4-g64",
                          "--out", str(tmp_path / "t"), "--seeds", "1,x"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--seeds takes integers" in bad.stderr and not (tmp_path / "t").exists()
