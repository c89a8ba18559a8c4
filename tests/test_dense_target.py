"""Dense-target calibration (GPTAQ's asymmetric objective): GPTQ aims at the dense model's outputs
on the dense model's own inputs, through W + W D H^-1 (D the paired cross statistic)."""
import pytest
import torch

from helpers import correlated_inputs, make_tokenizer
from slimkit.calib import compress_model
from slimkit.data import calibration_ids
from slimkit.errors import NumericalError
from slimkit.methods.base import DENSE_CROSS, HESSIAN, LinearState, LinearStats, build_stage
from slimkit.models import layout_for, load_model
from slimkit.ops.obs import dense_target, inverse_hessian
from slimkit.recipe import Recipe
from test_resume import four_blocks  # noqa: F401  (fixture)


def test_the_cross_statistic_pairs_the_two_streams_token_by_token():
    xt = correlated_inputs(96, 16, seed=1)  # the compressed model's inputs
    x = xt + 0.1 * correlated_inputs(96, 16, seed=2)  # the dense model's, for the same tokens
    st = LinearStats(16, want_hessian=True, want_cross=True)
    for s in range(0, 96, 32):  # batches of (2, 16, 16): the shape a Linear sees
        st.add(xt[s:s + 32].reshape(2, 16, 16), dense=x[s:s + 32].reshape(2, 16, 16))
    st.finalize("t")
    torch.testing.assert_close(st.dense_cross, 2 / 96 * (x - xt).T @ xt, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(st.hessian, 2 / 96 * xt.T @ xt, rtol=1e-4, atol=1e-5)
    with pytest.raises(NumericalError, match="token by token"):
        LinearStats(16, True, want_cross=True).add(xt[:8], dense=x[:7])
    with pytest.raises(NumericalError, match="token by token"):
        LinearStats(16, True, want_cross=True).add(xt[:8])
    with pytest.raises(RuntimeError, match="dense model's inputs"):
        LinearStats(16, True).dense_cross


@pytest.mark.parametrize("actorder", [False, True])
def test_dense_target_is_the_least_squares_weight(actorder):
    """Without damping, W + W D H^-1 is the weight whose outputs on x~ best match W x (lstsq)."""
    xt = correlated_inputs(400, 24, seed=3)
    x = xt + 0.2 * correlated_inputs(400, 24, seed=4)
    x[:, 5] = xt[:, 5] = 0  # a dead input: its column stays as it was
    W = torch.randn(10, 24, generator=torch.Generator().manual_seed(5))
    st = LinearStats(24, want_hessian=True, want_cross=True)
    st.add(xt, dense=x)
    st.finalize()
    got = dense_target(W, st.dense_cross, inverse_hessian(st.hessian, 0.0, actorder))
    live = torch.arange(24) != 5
    want = torch.linalg.lstsq(xt[:, live].double(), (x @ W.T).double()).solution.T.float()
    torch.testing.assert_close(got[:, live], want, rtol=1e-3, atol=1e-3)
    assert torch.equal(got[:, 5], W[:, 5])
    # GPTAQ's partial correction: alpha of the way from W to the least-squares weight
    quarter = dense_target(W, st.dense_cross, inverse_hessian(st.hessian, 0.0, actorder), alpha=0.25)
    torch.testing.assert_close(quarter, W + 0.25 * (got - W), rtol=1e-4, atol=1e-5)
    # the same inputs on both sides: nothing to correct
    same = LinearStats(24, want_hessian=True, want_cross=True)
    same.add(xt, dense=xt)
    same.finalize()
    assert torch.equal(dense_target(W, same.dense_cross, inverse_hessian(same.hessian, 0.01, actorder)), W)


def test_gptq_asks_for_the_cross_statistic_only_when_told():
    assert build_stage({"method": "gptq"}).needs == {HESSIAN}
    assert build_stage({"method": "gptq", "dense_target": True}).needs == {HESSIAN, DENSE_CROSS}
    with pytest.raises(Exception, match="dense_target"):
        build_stage({"method": "gptq", "dense_target": "yes"})
    for bad in (0, 1.5, True):
        with pytest.raises(Exception, match="dense_alpha must be"):
            build_stage({"method": "gptq", "dense_target": True, "dense_alpha": bad})
    with pytest.raises(Exception, match="set dense_target"):
        build_stage({"method": "sparsegpt", "sparsity": "2:4", "dense_alpha": 0.5})


def _output_error(path, text_file, stage: dict) -> float:
    model, tok, _ = load_model(str(path))
    ids = calibration_ids(str(text_file), tok, 16, 32, seed=0)
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    compress_model(model, layout_for(model), Recipe.from_dict({"name": "t", "stages": [stage]}), ids, batch_size=4,
                   progress=False)
    with torch.no_grad():
        got = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    return float((got - ref).norm() / ref.norm())


@pytest.mark.parametrize("stage", [{"method": "gptq", "bits": 2, "group_size": 32},
                                   {"method": "gptq", "bits": 3, "group_size": 32, "actorder": True},
                                   {"method": "sparsegpt", "sparsity": "2:4", "bits": 4, "group_size": 32}])
def test_dense_target_tracks_the_dense_model_better(four_blocks, text_file, stage):  # noqa: F811
    """The last hidden state of the compressed model is closer to the dense model's on the
    calibration data when each Linear aims at the dense model's outputs."""
    plain = _output_error(four_blocks, text_file, stage)
    aimed = _output_error(four_blocks, text_file, stage | {"dense_target": True})
    assert aimed < 0.95 * plain, (aimed, plain)


def test_low_rank_stages_fit_the_aimed_weight():
    """After a dense-target sweep, adapters and re-fits approximate the aimed weight, not the
    original: full-rank fp16 adapters without re-fit reproduce it exactly."""
    xt = correlated_inputs(256, 32, seed=6)
    x = xt + 0.3 * correlated_inputs(256, 32, seed=7)
    W = torch.randn(24, 32, generator=torch.Generator().manual_seed(8))
    st = LinearStats(32, want_hessian=True, want_cross=True)
    st.add(xt, dense=x)
    st.finalize()
    aimed = dense_target(W, st.dense_cross, inverse_hessian(st.hessian, 0.01, False), alpha=0.5)
    assert (aimed - W).norm() > 0.05 * W.norm()
    for first in ({"method": "gptq", "bits": 2, "group_size": 16},
                  {"method": "sparsegpt", "sparsity": "2:4", "bits": 2, "group_size": 16}):
        state = LinearState.from_weight("l", W)
        for d in (first | {"dense_target": True, "dense_alpha": 0.5},
                  {"method": "slim_lora", "rank": 24, "adapter_bits": None, "saliency": "hessian", "refit": False,
                   "pad_to": 1}):
            state = build_stage(d).run(state, st)
        torch.testing.assert_close(state.aimed, aimed)
        torch.testing.assert_close(state.effective_weight(), aimed, rtol=1e-3, atol=1e-3)


def test_a_killed_dense_target_run_resumes_to_the_same_files(four_blocks, text_file, tmp_path):
    """The checkpoint carries the dense model's activations too: kill after block 1, resume, and
    the files are those of an uninterrupted run."""
    import yaml
    from test_resume import assert_same_files, run

    rec = tmp_path / "aimed.yaml"
    rec.write_text(yaml.safe_dump({"name": "aimed", "stages": [{"method": "gptq", "bits": 3, "group_size": 32,
                                                                "actorder": True, "dense_target": True}]}))
    whole = run(four_blocks, rec, tmp_path / "whole", text_file)
    assert whole.returncode == 0, whole.stderr
    killed = run(four_blocks, rec, tmp_path / "out", text_file, env={"SLIMKIT_FAULT_KILL_AFTER_BLOCK": "1"})
    assert killed.returncode != 0
    resumed = run(four_blocks, rec, tmp_path / "out", text_file, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_files(tmp_path / "whole", tmp_path / "out")


def test_mixture_of_experts_is_refused_before_any_work(tmp_path, text_file):
    """The dense and the compressed model route tokens to different experts: the inputs of an
    expert cannot be paired, and the run says so before it compresses anything."""
    from transformers import AutoModelForCausalLM

    from helpers import family_config
    from slimkit.api import compress
    from slimkit.errors import SlimkitError

    path = tmp_path / "moe"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(family_config("qwen2_moe")).save_pretrained(path)
    make_tokenizer(path)
    rec = Recipe.from_dict({"name": "t", "stages": [{"method": "gptq", "bits": 4, "group_size": 32,
                                                     "dense_target": True}]})
    with pytest.raises(SlimkitError, match="mixture-of-experts"):
        compress(str(path), rec, tmp_path / "out", calib=str(text_file), nsamples=4, seqlen=32, eval_data=None,
                 progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]  # no output, no partial folder


def test_low_memory_and_offloaded_activations_give_the_same_model(four_blocks, text_file, tmp_path):
    """Both activation streams live in memory-mapped files with --offload-activations, and the
    blocks stream from disk with --low-memory: the same weights as the in-memory run."""
    from slimkit.api import compress
    from test_low_memory import weights

    rec = Recipe.from_dict({"name": "t", "stages": [{"method": "gptq", "bits": 3, "group_size": 32,
                                                     "dense_target": True}]})
    kw = dict(calib=str(text_file), nsamples=8, seqlen=32, eval_data=None, progress=False)
    compress(str(four_blocks), rec, tmp_path / "eager", **kw)
    compress(str(four_blocks), rec, tmp_path / "low", low_memory=True, offload_activations=True, **kw)
    a, b = weights(tmp_path / "eager"), weights(tmp_path / "low")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bits", [2, 4])
def test_builtin_gptaq_recipes_track_the_dense_model_better_than_gptq(four_blocks, text_file, bits):  # noqa: F811
    """`gptaq-w<b>-g64` (act-order, the |e|^3 weighted range search, the dense target) ends closer to
    the dense model than the built-in `gptq-w<b>-g64` on the same grid, and aims at the dense target."""
    from slimkit.recipe import load_recipe

    (stage,) = load_recipe(f"gptaq-w{bits}-g64").to_dict()["stages"]
    (base,) = load_recipe(f"gptq-w{bits}-g64").to_dict()["stages"]
    assert stage["dense_target"] and {k: stage[k] for k in ("bits", "group_size", "symmetric")} == \
        {k: base[k] for k in ("bits", "group_size", "symmetric")}
    aimed = _output_error(four_blocks, text_file, stage)
    plain = _output_error(four_blocks, text_file, base)
    assert aimed < 0.9 * plain, (aimed, plain)
