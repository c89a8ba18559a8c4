"""Calibration split across 2 gloo workers (torchrun) against a single process.

Stated tolerance: the workers all-reduce fp32/fp64 sums of partial statistics, so a summation
order differs from one process; quantization codes may then differ in at most 0.5% of entries
and every saved weight tensor within 1e-3 relative (Frobenius). On the tiny models here the
results are in fact identical."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

CODE_TOL, WEIGHT_TOL = 0.005, 1e-3


def compress(model, text, out, recipe, workers=1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={workers}"] \
        if workers > 1 else [sys.executable]
    args = [*launcher, "-m", "slimkit", "compress", str(model), "--recipe", recipe, "--out", str(out),
            "--calib", str(text), "--eval", str(text), "--nsamples", "8", "--seqlen", "32", "--batch-size", "2",
            "--eval-tokens", "128", "-q"]
    r = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("recipe", ["sparsegpt-2of4-gptq-w4", "slim"])
def test_two_gloo_workers_match_one_process(recipe, tiny_llama, text_file, tmp_path):
    one = compress(tiny_llama, text_file, tmp_path / "one", recipe)
    two = compress(tiny_llama, text_file, tmp_path / "two", recipe, workers=2)
    assert two["workers"] == 2 and "workers" not in one
    assert two["compression"]["calib_sequences"] == one["compression"]["calib_sequences"] == 8
    for f in ("slimkit_state.safetensors", "model.safetensors"):
        a, b = load_file(str(tmp_path / "one" / f)), load_file(str(tmp_path / "two" / f))
        assert a.keys() == b.keys()
        for k in a:
            if k.endswith((".codes", ".mask")):
                assert (a[k] != b[k]).float().mean().item() <= CODE_TOL, k
            else:
                rel = ((a[k].double() - b[k].double()).norm() / a[k].double().norm().clamp_min(1e-30)).item()
                assert rel <= WEIGHT_TOL, (k, rel)
    assert abs(two["eval"]["ppl"] - one["eval"]["ppl"]) <= 1e-3 * one["eval"]["ppl"]
    for la, lb in zip(one["compression"]["layers"], two["compression"]["layers"]):
        assert la["name"] == lb["name"] and la["bits"] == lb["bits"]


def test_worker_shards_cover_the_calibration_set():
    from slimkit import dist
    # no process group here: one worker takes everything
    assert dist.shard(10) == slice(0, 10) and dist.world_size() == 1 and dist.rank() == 0
    t = torch.arange(6.0)
    assert torch.equal(dist.all_reduce_sum(t.clone()), t) and torch.equal(dist.gather_rows(t, 4), t[:4])
