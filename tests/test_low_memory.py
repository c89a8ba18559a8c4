"""--low-memory (blocks streamed from disk, output written block by block) and
--offload-activations: the same model as the in-memory path, at most two blocks alive."""
import gc
import json
import signal
import weakref

import pytest
import torch
from safetensors.torch import load_file

from slimkit.api import compress
from slimkit.models.streaming import StreamedModel
from slimkit.state_io import load_state
from test_resume import assert_same_files, four_blocks, run  # noqa: F401  (fixture)


def weights(folder):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def test_low_memory_writes_the_same_model(four_blocks, text_file, tmp_path):  # noqa: F811
    kw = dict(calib=str(text_file), nsamples=8, seqlen=32, eval_data=str(text_file), eval_tokens=128,
              progress=False)
    eager = compress(str(four_blocks), "sparsegpt-2of4-gptq-w4", tmp_path / "eager", **kw)
    low = compress(str(four_blocks), "sparsegpt-2of4-gptq-w4", tmp_path / "low", low_memory=True,
                   offload_activations=True, **kw)
    a, b = weights(tmp_path / "eager"), weights(tmp_path / "low")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    (sa, ma), (sb, mb) = load_state(tmp_path / "eager"), load_state(tmp_path / "low")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ma["layers"] == mb["layers"]
    assert low["eval"]["ppl"] == pytest.approx(eager["eval"]["ppl"], rel=1e-5)
    assert len(list((tmp_path / "low").glob("model-*-of-00005.safetensors"))) == 5
    assert not (tmp_path / "low" / ".activations").exists() and not (tmp_path / "low" / "checkpoint").exists()
    # the exporters read a block-by-block state like a single file
    from slimkit.export import export
    export(tmp_path / "low", "native", tmp_path / "native")
    assert (tmp_path / "native").is_dir()


def test_at_most_two_blocks_alive(four_blocks, text_file, tmp_path, monkeypatch):  # noqa: F811
    """The streamed blocks are dropped once written: when block i is fetched, blocks < i-1 are gone."""
    alive: list[weakref.ref] = []
    seen = []
    original = StreamedModel.get

    def get(self, index):
        gc.collect()
        seen.append(sum(r() is not None for r in alive[1:]))  # block 0 is the shell's own
        block = original(self, index)
        alive.append(weakref.ref(block))
        return block

    monkeypatch.setattr(StreamedModel, "get", get)
    compress(str(four_blocks), "gptq-w4-g64", tmp_path / "o", calib=str(text_file), nsamples=8, seqlen=32,
             eval_data=None, progress=False, low_memory=True)
    assert len(seen) == 4 and max(seen) <= 1, seen  # 4 blocks (the capture only peeks); at most the previous one alive


def test_low_memory_resume_after_sigkill(four_blocks, text_file, tmp_path):  # noqa: F811
    ref = run(four_blocks, "gptq-w4-g64", tmp_path / "ref", text_file, "--low-memory")
    assert ref.returncode == 0, ref.stderr
    killed = run(four_blocks, "gptq-w4-g64", tmp_path / "out", text_file, "--low-memory",
                 env={"SLIMKIT_FAULT_KILL_AFTER_BLOCK": "1"})
    assert killed.returncode == -signal.SIGKILL
    ckpt = tmp_path / ".out.partial" / "checkpoint"
    assert json.loads((ckpt / "progress.json").read_text())["done"] == 2
    assert load_file(str(ckpt / "block_0.safetensors")) == {}  # the weights live in the output shard only
    for i in range(2):  # and the records in the output's record shard, which the checkpoint links
        shard, linked = tmp_path / ".out.partial" / f"slimkit_state-{i:05d}.safetensors", ckpt / f"payload_{i}.safetensors"
        assert linked.stat().st_ino == shard.stat().st_ino and load_file(str(linked))
    again = run(four_blocks, "gptq-w4-g64", tmp_path / "out", text_file, "--low-memory", "--resume",
                env={"SLIMKIT_FAULT_KILL_AFTER_BLOCK": "2"})  # killed again, after one more block
    assert again.returncode == -signal.SIGKILL
    for i in range(3):  # the restored blocks' record shards were kept, not written again beside their links
        shard, linked = tmp_path / ".out.partial" / f"slimkit_state-{i:05d}.safetensors", ckpt / f"payload_{i}.safetensors"
        assert linked.stat().st_ino == shard.stat().st_ino
    resumed = run(four_blocks, "gptq-w4-g64", tmp_path / "out", text_file, "--low-memory", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_files(tmp_path / "ref", tmp_path / "out")


def test_low_memory_refusals(tiny_llama, text_file, tmp_path):
    from slimkit.errors import SlimkitError
    with pytest.raises(SlimkitError, match="fine-tune"):
        compress(str(tiny_llama), "slim-ft", tmp_path / "a", calib=str(text_file), low_memory=True)
    (tmp_path / "g").mkdir()
    gguf = tmp_path / "g" / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(SlimkitError, match="safetensors folder"):
        compress(str(gguf), "rtn-w4-g64", tmp_path / "b", calib=str(text_file), low_memory=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_resume_in_the_other_mode_is_refused_and_kept(four_blocks, text_file, tmp_path):  # noqa: F811
    killed = run(four_blocks, "gptq-w4-g64", tmp_path / "out", text_file, env={"SLIMKIT_FAULT_KILL_AFTER_BLOCK": "1"})
    assert killed.returncode == -signal.SIGKILL
    other = run(four_blocks, "gptq-w4-g64", tmp_path / "out", text_file, "--low-memory", "--resume")
    assert other.returncode == 2 and "low_memory" in other.stderr, other.stderr
    assert (tmp_path / ".out.partial" / "checkpoint" / "progress.json").is_file()
