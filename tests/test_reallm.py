"""ReALLM: k-means VQ, the LQ alternation, per-matrix budgets, bit accounting against the bytes
written, the decoder variant, and low-rank fine-tuning on block output MSE."""
import logging

import pytest
import torch
from safetensors.torch import load_file

from slimkit.errors import RecipeError
from slimkit.methods import LinearState, LinearStats, build_stage
from slimkit.ops import decoder as dec
from slimkit.ops.vq import (VQCode, VQConfig, VectorQuantizer, assign, decode, index_bits, kmeans, lq_alternate,
                            pack_bits, unpack_bits)
from slimkit.state_io import STATE_FILE, StateRecorder

from helpers import correlated_inputs


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: thread start-up costs more than it saves on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def stats_for(X):
    s = LinearStats(X.shape[-1], want_hessian=False)
    s.add(X.reshape(8, -1, X.shape[-1]))
    s.finalize()
    return s


def structured_weight(out=64, k=128, rank=4, seed=0):
    """Low rank plus noise with a few strong columns, as real weights roughly are."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, rank, generator=g) @ torch.randn(rank, k, generator=g) + 0.3 * torch.randn(out, k, generator=g)


@pytest.mark.parametrize("d,K", [(2, 16), (4, 64), (3, 8)])
def test_kmeans_codes_are_nearest_centroids(d, K):
    g = torch.Generator().manual_seed(d)
    V = torch.randn(3000, d, generator=g)
    w = torch.rand(3000, d, generator=g) + 0.1
    C = kmeans(V, K, iters=8, seed=1)
    brute = torch.cdist(V, C).argmin(1)
    assert torch.equal(assign(V, C), brute)
    Cw = kmeans(V, K, w, iters=8, seed=1)
    brute_w = (w[:, None, :] * (V[:, None, :] - Cw[None]).square()).sum(-1).argmin(1)  # (n, K) -> (n,)
    assert torch.equal(assign(V, Cw, w), brute_w)
    assert torch.equal(Cw, kmeans(V, K, w, iters=8, seed=1))  # seeded: deterministic
    # Lloyd steps do not increase the distortion
    d0 = (V - kmeans(V, K, iters=1, seed=1)[assign(V, kmeans(V, K, iters=1, seed=1))]).square().sum()
    d1 = (V - C[assign(V, C)]).square().sum()
    assert d1 <= d0


@pytest.mark.parametrize("nbits", [1, 3, 5, 8, 11])
def test_pack_roundtrip(nbits):
    v = torch.randint(0, 2**nbits, (1001,), generator=torch.Generator().manual_seed(nbits))
    p = pack_bits(v, nbits)
    assert p.dtype == torch.uint8 and p.numel() == -(-1001 * nbits // 8)
    assert torch.equal(unpack_bits(p, nbits, 1001), v)


def test_alternation_error_never_increases_and_keeps_the_previous_iterate():
    W = structured_weight()
    cfg = VQConfig(2, 3, 32)
    vq = VectorQuantizer(cfg, tuple(W.shape), iters=6)
    res = lq_alternate(W, 4, lambda X: vq.encode(X, iters=2), iters=8, tol=0)
    assert len(res.history) >= 2
    assert all(b <= a for a, b in zip(res.history, res.history[1:]))
    assert res.error == res.history[-1]
    assert res.error < (W - VectorQuantizer(cfg, tuple(W.shape), iters=6).encode(W)[1]).norm() / W.norm()

    # a quantizer that gets worse from its third call on: the loop stops and returns iterate 2
    calls = []

    def worsening(X):
        calls.append(1)
        code, Q = vq.encode(X, iters=2)
        if len(calls) >= 3:
            Q = Q + 0.5 * torch.randn(X.shape, generator=torch.Generator().manual_seed(0))
        return len(calls), Q

    res = lq_alternate(W, 4, worsening, iters=8, tol=0)
    assert res.code == 2 and res.rejected is not None and res.rejected > res.error
    assert len(calls) == 3 and len(res.history) == 2 and res.history[1] <= res.history[0]


def test_activation_weighting_lowers_the_weighted_error():
    W = structured_weight(seed=1)
    X = correlated_inputs(2048, 128, seed=1)
    D = stats_for(X).act_norm
    D = (D / D.mean()).sqrt()
    cfg = VQConfig(2, 3, 32)

    def weighted_err(res):
        return ((W - res.A @ res.B - res.Q) * D).norm().item()

    plain = lq_alternate(W, 4, VectorQuantizer(cfg, tuple(W.shape)).encode)
    weighted = lq_alternate(W, 4, VectorQuantizer(cfg, tuple(W.shape), D.square()).encode, D)
    assert weighted_err(weighted) < weighted_err(plain)


@pytest.mark.parametrize("cfg", [
    {"bits": 6.0, "ranks": [4], "permute": True},
    {"bits": 2.5, "ranks": [0], "vector_dims": [3], "block_sizes": [48], "permute": False},
])
def test_bits_match_the_bytes_written(tmp_path, cfg):
    """Storage convention: the stage's own tensors (codes, codebook, 8-bit block scales, fp32 group
    maxima, permutation) are written at exactly the bits counted; the fp16 low-rank factors are
    counted at 16 bits, their values are fp16-exact, and state_io writes them as fp32 (2x)."""
    W = structured_weight(48, 144, seed=2)
    X = correlated_inputs(2048, 144, seed=2)
    s = build_stage({"method": "reallm", **cfg}).run(LinearState.from_weight("m.q_proj", W), stats_for(X))
    rec = StateRecorder()
    rec(s)
    rec.save(tmp_path, {})
    written = load_file(str(tmp_path / STATE_FILE))
    bits = s.bits()
    own = {k.split(".", 2)[-1]: v for k, v in written.items() if k.split(".")[-1].startswith(("vq_", "dec_"))}
    assert set(own) == set(s.tensors) and own
    assert sum(v.numel() * v.element_size() for v in own.values()) * 8 == sum(
        v for k, v in bits.items() if k != "adapters")
    if s.rank:
        L, R = written["m.q_proj.L"], written["m.q_proj.R"]
        assert bits["adapters"] == (L.numel() + R.numel()) * 16
        assert torch.equal(L.half().float(), L) and torch.equal(R.half().float(), R)
    assert sum(bits.values()) <= cfg["bits"] * W.numel()
    # the persisted tensors alone rebuild the base weight
    vcfg = VQConfig(s.notes["reallm"]["d"], index_bits(s.notes["reallm"]["K"]), s.notes["reallm"]["block"])
    code = VQCode(vcfg, tuple(W.shape), own["vq_codes"], own["vq_codebook"], own["vq_scale_q"],
                  own["vq_scale_max"], own.get("vq_perm"))
    assert torch.allclose(decode(code), s.weight, atol=1e-6)
    assert ("vq_perm" in own) == cfg.get("permute", True)


@pytest.mark.parametrize("shape,bits", [((48, 128), 3.0), ((192, 576), 2.0), ((96, 64), 4.0)])
def test_budget_is_met_per_matrix(shape, bits):
    st = build_stage({"method": "reallm", "bits": bits})
    assert st.candidates(*shape)
    for r, cfg, total in st.candidates(*shape):
        assert total <= bits * shape[0] * shape[1]


def test_candidate_bits_hand_counted():
    """Stored bits worked out by hand (not with the code's formula) on small matrices.

    48 x 128 at 3 bits/weight (budget 18,432), d = 2, blocks 32 / 64, permutation stored (128
    indices x 7 bits = 896), double-quantized scales (8 bits per block + one fp32 per 256 blocks):
    rank 0: 2^5 centroids, block 64: codes 3,072 x 5 = 15,360 + codebook 32 x 2 x 16 = 1,024 +
      scales 96 x 8 + 32 = 800 + 896 = 18,080 (block 32 would be 18,848 > budget; 2^6: 18,432
      for the codes alone);
    rank 4: fp16 factors 4 x (48 + 128) x 16 = 11,264; 2^1 centroids: codes 3,072 + codebook 64
      + 896 + scales 192 x 8 + 32 = 1,568 (block 32; the smallest block that fits wins)
      = 5,600 -> 16,864 (2^2 with block 64 would be 7,968 + 11,264 > budget).
    10 x 20 at 6 bits (budget 1,200), d = 3, block 48, no permutation: padded to 240 values,
    80 vectors, codebooks of at most 80 / 4 -> 16 centroids: codes 80 x 4 = 320 + codebook
    16 x 3 x 16 = 768 + scales 5 x 8 + 32 = 72 = 1,160."""
    st = build_stage({"method": "reallm", "bits": 3.0, "ranks": [0, 4], "vector_dims": [2], "block_sizes": [32, 64]})
    assert st.candidates(48, 128) == [(0, VQConfig(2, 5, 64, 256), 18080), (4, VQConfig(2, 1, 32, 256), 16864)]
    assert VQConfig(2, 5, 64, 256).bits(48, 128, True) == {"codes": 15360, "codebook": 1024, "scales": 800,
                                                           "perm": 896}
    st = build_stage({"method": "reallm", "bits": 6.0, "ranks": [0], "vector_dims": [3], "block_sizes": [48],
                      "permute": False})
    assert st.candidates(10, 20) == [(0, VQConfig(3, 4, 48, 256), 1160)]
    assert VQConfig(3, 4, 48, 256).bits(10, 20, False) == {"codes": 320, "codebook": 768, "scales": 72, "perm": 0}


def test_impossible_budget_is_refused():
    st = build_stage({"method": "reallm", "bits": 0.5, "ranks": [0]})
    with pytest.raises(RecipeError, match="fits 0.5 bits"):
        st.check_layer("model.layers.0.k_proj", 8, 16)


@pytest.mark.parametrize("cfg,msg", [
    ({"bits": 0.1}, "bits"), ({"ranks": []}, "ranks"), ({"vector_dims": [0]}, "vector_dims"),
    ({"vector_dims": [3], "block_sizes": [64]}, "multiple"), ({"max_code_bits": 20}, "max_code_bits"),
    ({"ft_lr": 2}, "ft_lr"), ({"decoder_tile": 0}, "tile"), ({"iters": 0}, "iters"),
])
def test_bad_configs(cfg, msg):
    with pytest.raises(RecipeError, match=msg):
        build_stage({"method": "reallm", **cfg})


def test_refuses_a_pruned_weight():
    W = structured_weight()
    X = correlated_inputs(2048, 128)
    s = build_stage({"method": "wanda", "sparsity": 0.5}).run(LinearState.from_weight("x", W), stats_for(X))
    with pytest.raises(RecipeError, match="first"):
        build_stage({"method": "reallm"}).run(s, stats_for(X))


def test_decoder_shapes_and_determinism():
    X = structured_weight(20, 36, seed=3)  # ragged: not multiples of the tile
    t = dec.to_tiles(X, 8)
    assert t.shape == (3 * 5, 64)
    assert torch.equal(dec.from_tiles(t, (20, 36), 8), X)
    cfg = dec.DecoderConfig(tile=8, latent_bits=4, hidden=16, steps=40, seconds=60)
    a = dec.fit_decoder(X, cfg, e=6)
    b = dec.fit_decoder(X, cfg, e=6)
    assert a.X_hat.shape == X.shape and torch.isfinite(a.X_hat).all()
    assert torch.equal(a.X_hat, b.X_hat) and torch.equal(a.latents, b.latents)
    assert torch.allclose(dec.decode(a), a.X_hat)  # rebuilt from the stored tensors only
    assert sum(v.numel() * v.element_size() for v in a.tensors().values()) * 8 == sum(a.bits().values())
    assert ((a.X_hat - X).norm() / X.norm()) < 1  # it learned something
    budget = sum(a.bits().values())
    assert dec.latent_dim((20, 36), cfg, budget) == 6


@pytest.mark.parametrize("decoder_wins", [True, False])
def test_decoder_is_used_only_when_it_wins(caplog, monkeypatch, decoder_wins):
    """The decision is forced either way: the fitted decoder's output is replaced by the exact
    residual (error 0, it must be used) or by the residual plus a large offset (it must lose to
    the VQ). ranks [0]: the residual is W itself."""
    from slimkit.methods import reallm

    W = structured_weight(64, 128, seed=4)
    X = correlated_inputs(2048, 128, seed=4)
    real_fit = reallm.fit_decoder

    def forced_fit(Res, *a, **k):
        fit = real_fit(Res, *a, **k)
        fit.X_hat = Res.clone() if decoder_wins else Res + 10 * Res.abs().max()
        return fit

    monkeypatch.setattr(reallm, "fit_decoder", forced_fit)
    cfg = {"method": "reallm", "bits": 3.0, "ranks": [0], "decoder": True, "decoder_steps": 5,
           "decoder_hidden": 16}
    with caplog.at_level(logging.INFO, logger="slimkit.methods.reallm"):
        s = build_stage(cfg).run(LinearState.from_weight("m.o_proj", W), stats_for(X))
    msgs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("m.o_proj: decoder")]
    assert len(msgs) == 1, caplog.text
    assert sum(s.bits().values()) <= 3.0 * W.numel()
    dec_tensors = sorted(k for k in s.tensors if k.startswith("dec_"))
    vq_tensors = sorted(k for k in s.tensors if k.startswith("vq_"))
    if decoder_wins:
        assert s.notes["reallm"]["decoder"] is True and s.notes["grid"].startswith("decoder t8 ")
        assert " beats VQ: 0 < " in msgs[0]
        assert torch.equal(s.weight, W)  # the (forced) decoder output is what the model gets
        assert dec_tensors and not vq_tensors and "vq" not in s.notes
    else:
        assert s.notes["reallm"]["decoder"] is False and s.notes["grid"].startswith("VQ d")
        assert "loses to VQ at the same bits" in msgs[0] and msgs[0].endswith("keeping VQ")
        assert vq_tensors and not dec_tensors and "vq" in s.notes
        assert 0 < ((s.weight - W).norm() / W.norm()).item() < 1  # the VQ, not the offset decoder output
        vcfg = VQConfig(s.notes["vq"]["d"], s.notes["vq"]["code_bits"], s.notes["vq"]["block"],
                        s.notes["vq"]["scale_group"])
        code = VQCode(vcfg, tuple(W.shape), s.tensors["vq_codes"], s.tensors["vq_codebook"],
                      s.tensors["vq_scale_q"], s.tensors["vq_scale_max"], s.tensors.get("vq_perm"))
        assert torch.allclose(decode(code), s.weight, atol=1e-6)  # the stored VQ gives the weight


def test_finetuning_the_low_rank_parts_end_to_end(tiny_llama, text_file):
    from slimkit.calib import compress_model
    from slimkit.data import calibration_ids
    from slimkit.models import layout_for, load_model
    from slimkit.recipe import Recipe

    results = {}
    for ft in (False, True):
        model, tok, _ = load_model(str(tiny_llama))
        ids = calibration_ids(str(text_file), tok, 8, 32, seed=0)
        rec = Recipe.from_dict({"name": "t", "stages": [
            {"method": "reallm", "bits": 6.0, "ranks": [4], "vector_dims": [2], "block_sizes": [32], "iters": 2,
             "kmeans_iters": 4, "finetune": ft, "ft_steps": 15,
             "ft_lr": 1e-3, "ft_sequences": 2}]})
        res = compress_model(model, layout_for(model), rec, ids, batch_size=4, progress=False)
        assert all(l.rank == 4 for l in res.layers) and res.bits_per_weight() <= 6.0
        results[ft] = res
    assert "refine:reallm" in results[True].timings
    # block 0 sees identical inputs in both runs: tuning can only lower its output error
    assert results[True].blocks[0].rel_error < results[False].blocks[0].rel_error


def test_end_to_end_finetuning_trains_only_the_low_rank_parts(tiny_llama, text_file, tmp_path):
    """After the block-wise tuning, the recipe's ``finetune:`` section trains the low-rank parts on
    the causal-LM loss through the whole model; the VQ bases stay exactly what was stored."""
    from slimkit.api import compress
    from slimkit.pack import SlimkitFolder
    from slimkit.recipe import Recipe

    stage = {"method": "reallm", "bits": 6.0, "ranks": [4], "vector_dims": [2], "block_sizes": [32], "iters": 2,
             "kmeans_iters": 4, "finetune": True, "ft_steps": 3}
    folders = {}
    for ft in (False, True):
        rec = Recipe.from_dict({"name": "t", "stages": [stage],
                                **({"finetune": {"steps": 6, "lr": 1e-3, "warmup": 1}} if ft else {})})
        out = tmp_path / f"ft{ft}"
        rep = compress(str(tiny_llama), rec, out, calib=str(text_file), nsamples=4, seqlen=32, eval_data=None,
                       progress=False)
        folders[ft] = SlimkitFolder(out)
    loss = rep["finetune"]["loss"]
    assert len(loss) == 6 and all(torch.isfinite(torch.tensor(loss)))
    moved = 0
    for name in folders[True].layer_names():
        a, b = folders[False].record(name), folders[True].record(name)
        assert torch.equal(a.tensors["vq_codes"], b.tensors["vq_codes"]) and torch.equal(a.base_weight(), b.base_weight())
        moved += not torch.equal(a.tensors["L"], b.tensors["L"])
        assert b.exact()  # stored base + tuned L R reproduce the saved weight
    assert moved == len(folders[True].layer_names())
