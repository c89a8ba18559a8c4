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


WORKER = """
import sys
import torch
from slimkit import dist
from slimkit.methods import LinearStats

dist.setup()  # joins the group that RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT describe
assert dist.active()
r, w = dist.rank(), dist.world_size()
res = {"rank": r, "world": w, "shards": {n: dist.shard(n) for n in (7, 8, 10)}}
res["sum"] = dist.all_reduce_sum(torch.arange(4, dtype=torch.float64) * (r + 1))
res["rows"] = dist.gather_rows(torch.full((r + 2, 3), float(r)), 6)
# one Linear's statistics over 8 calibration windows, each worker adding its share as the engine does
X = torch.randn(8, 16, 24, generator=torch.Generator().manual_seed(0))
st = LinearStats(24, want_hessian=True, sample_rows=40)
mine = X[dist.shard(8)]
for i in range(0, mine.shape[0], 2):
    st.add(mine[i:i + 2])
st.all_reduce()
st.finalize()
res["stats"] = (st.nsamples, st.ntokens, st.act_norm, st.hessian, st.sample)
torch.save(res, sys.argv[1])
"""


def run_workers(tmp_path, world):
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = []
    for r in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path / f"r{r}.pt")], env=env,
                                      stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    return [torch.load(tmp_path / f"r{r}.pt", weights_only=False) for r in range(world)]


@pytest.mark.parametrize("world", [2, 3])
def test_worker_shards_cover_the_calibration_set(world, tmp_path):
    """Real gloo process groups of 2 and 3 workers (the environment torchrun sets): the shares
    are contiguous, in worker order and cover every window once; sums and row gathers combine
    every worker; one Linear's statistics split across workers equal those of one process."""
    from slimkit import dist
    from slimkit.methods import LinearStats

    # no process group here: one worker takes everything
    assert dist.shard(10) == slice(0, 10) and dist.world_size() == 1 and dist.rank() == 0
    t = torch.arange(6.0)
    assert torch.equal(dist.all_reduce_sum(t.clone()), t) and torch.equal(dist.gather_rows(t, 4), t[:4])

    res = run_workers(tmp_path, world)
    assert [x["rank"] for x in res] == list(range(world)) and all(x["world"] == world for x in res)
    # worker r of w takes windows [r n / w, (r + 1) n / w), worked out by hand
    expected = {2: {7: [(0, 3), (3, 7)], 8: [(0, 4), (4, 8)], 10: [(0, 5), (5, 10)]},
                3: {7: [(0, 2), (2, 4), (4, 7)], 8: [(0, 2), (2, 5), (5, 8)], 10: [(0, 3), (3, 6), (6, 10)]}}[world]
    for n, spans in expected.items():
        assert [(x["shards"][n].start, x["shards"][n].stop) for x in res] == spans
    total = torch.arange(4, dtype=torch.float64) * sum(range(1, world + 1))  # (1 + 2 + ... + w) * [0, 1, 2, 3]
    rows = torch.cat([torch.full((r + 2, 3), float(r)) for r in range(world)])[:6]  # 2 rows of 0, 3 of 1, ...
    for x in res:
        assert torch.equal(x["sum"], total) and torch.equal(x["rows"], rows)

    X = torch.randn(8, 16, 24, generator=torch.Generator().manual_seed(0))
    one = LinearStats(24, want_hessian=True, sample_rows=40)
    for i in range(0, 8, 2):
        one.add(X[i:i + 2])
    one.finalize()
    for x in res:  # every worker ends with the statistics of the whole set
        nsamples, ntokens, act_norm, hessian, sample = x["stats"]
        assert (nsamples, ntokens) == (one.nsamples, one.ntokens) == (8, 128)
        assert torch.allclose(act_norm, one.act_norm, rtol=1e-6, atol=0)
        assert torch.allclose(hessian, one.hessian, rtol=1e-5, atol=1e-6)
        assert torch.equal(sample, one.sample) and torch.equal(sample, X.reshape(-1, 24)[:40])
