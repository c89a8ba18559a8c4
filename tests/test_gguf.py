"""GGUF block types as grids (ops/gguf.py), the GGUF stages, llama-quantize's type choice, and
`slimkit export --format gguf`."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import TEXT, family_config, make_tokenizer
from slimkit.errors import RecipeError
from slimkit.ops.gguf import TYPES, BlockGrid, dequantize_data, encode_rtn, llama_type

gguf = pytest.importorskip("gguf")


def weights(rows=48, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.02
    W[0] = 0  # an all-zero row
    W[1, :32] = 0  # an all-zero block
    W[2, 5] = 0.9  # an outlier
    W[3] = W[3].abs()  # a row without negative values (asymmetric types: min clamped to 0)
    W[4] = -W[4].abs()
    return W


@pytest.mark.parametrize("name", list(TYPES))
def test_values_are_what_gguf_dequantizes_from_the_bytes(name):
    t = TYPES[name]
    W = weights()
    enc = encode_rtn(W, t)
    assert enc.data.dtype == torch.uint8 and enc.data.shape == (48, 512 // t.block * t.type_size)
    assert torch.equal(dequantize_data(enc.data, t, 512), enc.values)  # bit for bit
    err = (enc.values - W).norm() / W.norm()
    assert err < {8: 0.01, 6: 0.03, 5: 0.06, 4: 0.12, 3: 0.2, 2: 0.35}[t.code_bits]


@pytest.mark.parametrize("name", ["Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1"])
def test_rounding_is_no_worse_than_the_reference_quantizer(name):
    t = TYPES[name]
    W = weights(seed=1)
    ref = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(W.numpy(), t.qtype), t.qtype))
    assert (encode_rtn(W, t).values - W).norm() <= (ref - W).norm() * 1.0001


@pytest.mark.parametrize("name", list(TYPES))
def test_file_round_trip_is_bit_exact(tmp_path, name):
    t = TYPES[name]
    W = weights(rows=8, seed=2)
    enc = encode_rtn(W, t)
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_tensor("x", enc.data.numpy(), raw_dtype=t.qtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    rt = gguf.GGUFReader(str(tmp_path / "t.gguf")).tensors[0]
    assert rt.tensor_type == t.qtype and list(rt.shape) == [512, 8]
    back = gguf.quants.dequantize(np.asarray(rt.data), rt.tensor_type).reshape(8, 512)
    assert torch.equal(torch.from_numpy(back.copy()), enc.values)


@pytest.mark.parametrize("name", ["Q8_0", "Q5_0", "Q4_0", "Q6_K", "Q3_K"])
def test_symmetric_types_hold_an_exact_zero_for_pruned_weights(name):
    t = TYPES[name]
    W = weights(rows=8)
    grid = BlockGrid(t, 8, 512)
    keep = torch.rand(8, 512, generator=torch.Generator().manual_seed(0)) > 0.5
    vals = []
    for gi in range(512 // t.block):
        sl = slice(gi * t.block, (gi + 1) * t.block)
        grid.fit_block(gi, W[:, sl] * keep[:, sl])
        vals.append(grid.columns(gi, torch.arange(t.block), W[:, sl], keep[:, sl]))
    vals = torch.cat(vals, 1)
    assert torch.all(vals[~keep] == 0)
    assert torch.equal(dequantize_data(grid.data(), t, 512), vals)


def test_importance_weighted_fit_lowers_weighted_error():
    t = TYPES["Q4_K"]
    W = weights(seed=3)
    imp = torch.exp(2 * torch.randn(512, generator=torch.Generator().manual_seed(4)))
    plain, weighted = encode_rtn(W, t), encode_rtn(W, t, imp)
    err = lambda v: (((v - W) ** 2) * imp).sum()  # noqa: E731
    assert err(weighted.values) < err(plain.values)


def test_llama_quantize_type_choice():
    # SmolLM2-135M: 30 blocks, rows of 576 (q, k, v, o, gate, up, the tied embedding) and 1536 (down)
    n = 30
    assert llama_type("Q4_K_M", "attn_q", 576, 3, n) == "Q5_0"  # Q4_K does not fit 576: fallback
    assert llama_type("Q4_K_M", "ffn_down", 1536, 2, n) == "Q6_K"  # use_more_bits: the first n/8
    assert llama_type("Q4_K_M", "ffn_down", 1536, 3, n) == "Q4_K"
    assert llama_type("Q4_K_M", "ffn_down", 1536, 5, n) == "Q6_K"  # (5 - 3) % 3 == 2
    assert llama_type("Q4_K_M", "attn_v", 576, 0, n) == "Q8_0"  # Q6_K -> Q8_0
    assert llama_type("Q4_K_M", "output", 576) == "Q8_0"
    assert llama_type("Q4_K_M", "output", 4096) == "Q6_K"
    assert llama_type("Q3_K_M", "ffn_down", 1536, 0, n) == "Q5_K"  # first n/16
    assert llama_type("Q3_K_M", "ffn_down", 1536, 2, n) == "Q4_K"
    assert llama_type("Q3_K_M", "attn_output", 4096, 9, n) == "Q4_K"
    assert llama_type("Q3_K_M", "attn_q", 4096, 9, n) == "Q3_K"
    assert llama_type("Q2_K", "attn_v", 4096, 9, n, n_gqa=3) == "Q3_K"
    assert llama_type("Q2_K", "attn_v", 4096, 9, n, n_gqa=4) == "Q4_K"
    assert llama_type("Q2_K", "attn_q", 576, 9, n) == "Q4_0"  # Q2_K -> Q4_0
    assert llama_type("Q4_0", "ffn_down", 1536, 2, n, has_imatrix=True) == "Q4_1"  # first n/8 with imatrix
    assert llama_type("Q4_0", "ffn_down", 1536, 2, n) == "Q4_0"
    assert llama_type("Q4_K_M", "ffn_down", 1536, 2, n, pure=True) == "Q4_K"
    with pytest.raises(RecipeError, match="fit no GGUF block type"):
        llama_type("Q4_0", "attn_q", 100)
    with pytest.raises(RecipeError, match="unknown llama.cpp file type"):
        llama_type("Q4_K_X", "attn_q", 256)


# ----- end to end on a tiny model ---------------------------------------------------------------

@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """A tiny llama whose Linears have 256 and 512 input columns (K-quants fit without fallback)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("gguf-model")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config("llama", layers=2, hidden_size=256,
                                                           intermediate_size=512, head_dim=64))
    model.save_pretrained(root / "m")
    make_tokenizer(root / "m")
    (root / "calib.txt").write_text(TEXT)
    return root


def run(root, recipe):
    from slimkit.api import compress

    out = root / recipe
    if not out.exists():
        compress(str(root / "m"), recipe, out, calib=str(root / "calib.txt"), nsamples=8, seqlen=64,
                 eval_data=None, progress=False)
    return out


@pytest.mark.parametrize("ftype", ["q4_k_m", "q3_k_m", "q4_0"])
def test_gptq_beats_rtn_on_every_linear(wide_llama, ftype):
    rtn = json.loads((run(wide_llama, f"rtn-gguf-{ftype}") / "report.json").read_text())
    gptq = json.loads((run(wide_llama, f"gptq-gguf-{ftype}") / "report.json").read_text())
    a = {lr["name"]: lr for lr in rtn["compression"]["layers"]}
    for lr in gptq["compression"]["layers"]:
        assert lr["grid"] == a[lr["name"]]["grid"]  # the same block type, layer by layer
        assert lr["rel_error"] < a[lr["name"]]["rel_error"], lr["name"]


def test_written_weights_are_the_recorded_blocks(wide_llama):
    from slimkit.pack.source import SlimkitFolder

    folder = SlimkitFolder(run(wide_llama, "gptq-gguf-q3_k_m"))
    types = set()
    for rec in folder.records():
        assert rec.form.name == "gguf"
        t = TYPES[rec.meta["gguf"]["type"]]
        types.add(t.name)
        assert torch.equal(dequantize_data(rec.tensors["gguf_blocks"], t, rec.shape[1]), rec.effective.float())
        assert rec.meta["bits"]["values"] + rec.meta["bits"]["scales"] == rec.tensors["gguf_blocks"].numel() * 8
    assert {"Q3_K", "Q4_K", "Q5_K"} <= types


def test_sparse_gguf_keeps_exact_zeros(wide_llama):
    from slimkit.pack.source import SlimkitFolder

    folder = SlimkitFolder(run(wide_llama, "sparsegpt-2of4-gguf-q4_0"))
    for rec in folder.records():
        W = dequantize_data(rec.tensors["gguf_blocks"], TYPES["Q4_0"], rec.shape[1])
        assert torch.equal(W, rec.effective.float())
        assert bool((W.reshape(W.shape[0], -1, 4) != 0).sum(-1).le(2).all())  # 2:4 in the file


def test_other_formats_refuse_gguf_layers_by_name(wide_llama, tmp_path):
    from slimkit.export import export
    from slimkit.pack.source import PackError

    src = run(wide_llama, "rtn-gguf-q4_0")
    for fmt in ("native", "compressed-tensors"):
        with pytest.raises(PackError, match="stored as GGUF Q4_0 blocks.*use --format gguf"):
            export(src, fmt, tmp_path / fmt)
        assert not (tmp_path / fmt).exists()


def test_widths_that_fit_no_block_are_refused_before_work(text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config("llama", layers=1, hidden_size=48, intermediate_size=96,
                                                           head_dim=12))
    model.save_pretrained(tmp_path / "m")
    make_tokenizer(tmp_path / "m")
    before = sorted(p.name for p in (tmp_path / "m").iterdir())
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "slimkit", "compress", str(tmp_path / "m"), "--recipe",
                        "gptq-gguf-q4_k_m", "--out", str(out), "--calib", str(text_file), "--nsamples", "2",
                        "--seqlen", "16", "-q"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "model.layers.0.self_attn.q_proj: rows of 48 columns fit no GGUF block type" in r.stderr, r.stderr
    assert not out.exists() and sorted(p.name for p in (tmp_path / "m").iterdir()) == before


# ----- export --format gguf ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol_llama(tmp_path_factory):
    """A tiny llama (rows of 256 and 512 columns, tied embeddings) with the default model's
    tokenizer (a BPE tokenizer llama.cpp's converter knows: pre-tokenizer "smollm")."""
    from transformers import AutoModelForCausalLM

    from slimkit.models.loading import load_tokenizer

    root = tmp_path_factory.mktemp("gguf-export")
    tok = load_tokenizer("default")
    cfg = family_config("llama", layers=2, hidden_size=256, intermediate_size=512, head_dim=64,
                        vocab_size=len(tok), tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "m")
    tok.save_pretrained(root / "m")
    (root / "calib.txt").write_text(TEXT)
    return root


def test_export_writes_the_recorded_blocks_that_llama_cpp_reads(smol_llama, tmp_path):
    from slimkit.export import export
    from slimkit.export.gguf_meta import llama_permutation
    from slimkit.pack.source import SlimkitFolder

    src = run(smol_llama, "gptq-gguf-q4_k_m")
    out = export(src, "gguf", tmp_path / "g")
    assert sorted(p.name for p in out.iterdir()) == ["model.gguf"]
    r = gguf.GGUFReader(str(out / "model.gguf"))
    field = lambda k: r.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "llama" and field("llama.block_count") == 2
    assert field("llama.embedding_length") == 256 and field("llama.attention.head_count_kv") == 2
    assert field("general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "smollm"
    assert len(r.fields["tokenizer.ggml.tokens"].data) == 49152
    tensors = {t.name: t for t in r.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q6_K  # the output rule
    folder = SlimkitFolder(src)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for rec in folder.records():
        i, hf = rec.name.split(".")[2], ".".join(rec.name.split(".")[3:])
        t = tensors[f"blk.{i}.{names[hf]}.weight"]
        assert t.tensor_type.name == rec.meta["gguf"]["type"]
        data = rec.tensors["gguf_blocks"]
        if hf in ("self_attn.q_proj", "self_attn.k_proj"):  # llama.cpp's rope layout: rows permuted
            data = data[llama_permutation(data.shape[0], 4 if hf == "self_attn.q_proj" else 2)]
        assert np.array_equal(np.asarray(t.data).reshape(data.shape), data.numpy())  # no re-rounding
    from slimkit.export.info import folder_info
    from slimkit.pack.source import PackError

    info = folder_info(out)["gguf"][0]
    assert info["file_type"] == "Q4_K_M" and info["types"]["Q6_K"] >= 2 and info["types"]["F32"] >= 5
    assert folder_info(src)["packs_as"] == "gguf"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.gguf").write_bytes((out / "model.gguf").read_bytes()[:5000])
    with pytest.raises(PackError, match="not a readable GGUF file"):
        folder_info(tmp_path / "bad")


def test_exported_file_computes_what_the_compressed_folder_computes(smol_llama, tmp_path):
    """transformers reads the .gguf (undoing the q/k permutation, dequantizing every block): its
    logits equal the compressed folder's once the embedding is the file's quantized one."""
    from transformers import AutoModelForCausalLM

    from slimkit.export import export

    src = run(smol_llama, "gptq-gguf-q4_k_m")
    out = export(src, "gguf", tmp_path / "g")
    r = gguf.GGUFReader(str(out / "model.gguf"))
    emb = next(t for t in r.tensors if t.name == "token_embd.weight")
    E = torch.from_numpy(gguf.quants.dequantize(np.asarray(emb.data), emb.tensor_type).reshape(49152, 256).copy())
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ref.model.embed_tokens.weight.data.copy_(E)
    got = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(input_ids=ids).logits, got(input_ids=ids).logits
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()


def test_gguf_export_refusals(compressed, tiny_models, text_file, tmp_path):
    from slimkit.export import export
    from slimkit.pack.source import PackError

    with pytest.raises(PackError, match="stored as W4 g64 asym grid, which a GGUF file cannot hold"):
        export(compressed, "gguf", tmp_path / "a")
    opt = tmp_path / "opt"
    from slimkit.api import compress

    compress(str(tiny_models["opt"]), "rtn-gguf-q8_0", opt, calib=str(text_file), nsamples=2, seqlen=16,
             eval_data=None, progress=False)
    r = subprocess.run([sys.executable, "-m", "slimkit", "export", str(opt), "--format", "gguf", "--out",
                        str(tmp_path / "b")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "opt" in r.stderr, r.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_scales_beyond_fp16_are_refused_not_written_as_inf():
    from slimkit.errors import NumericalError

    with pytest.raises(NumericalError, match="beyond fp16's range"):
        encode_rtn(torch.full((2, 32), 1e5), TYPES["Q4_1"])
    big = torch.randn(4, 256, generator=torch.Generator().manual_seed(0)) * 1e3
    for t in TYPES.values():  # large but storable: still bit for bit
        enc = encode_rtn(big, t)
        assert torch.equal(dequantize_data(enc.data, t, 256), enc.values)


def test_pure_skips_the_output_rule_too():
    assert llama_type("Q4_K_M", "output", 4096, pure=True) == "Q4_K"
    assert llama_type("Q4_K_M", "output", 4096) == "Q6_K"


def test_a_gguf_stage_stands_alone():
    from slimkit.recipe import Recipe

    for stages in ([{"method": "rtn_gguf", "ftype": "Q4_0"}, {"method": "rtn", "bits": 4}],
                   [{"method": "wanda", "sparsity": "2:4"}, {"method": "gptq_gguf", "ftype": "Q4_0"}]):
        with pytest.raises(RecipeError, match="must be the recipe's only stage"):
            Recipe.from_dict({"stages": stages})


def test_export_refuses_blocks_that_are_not_the_model(wide_llama, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from slimkit.export import export
    from slimkit.pack.source import PackError

    src = tmp_path / "edited"
    shutil.copytree(run(wide_llama, "rtn-gguf-q4_0"), src)
    w = load_file(str(src / "model.safetensors"))
    w["model.layers.1.mlp.up_proj.weight"][0, 0] += 1e-3
    save_file(w, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(PackError, match="model.layers.1.mlp.up_proj: its recorded GGUF Q4_0 blocks do not reproduce"):
        export(src, "gguf", tmp_path / "g")
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "Q3_K"])
def test_act_order_with_static_blocks_stays_exact_and_lowers_the_error(name):
    from helpers import correlated_inputs

    from slimkit.ops.obs import inverse_hessian, obs_sweep

    k = 512
    X = correlated_inputs(4096, k, seed=1)
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(64, k, generator=torch.Generator().manual_seed(5)) * 0.02
    t = TYPES[name]
    err = {}
    for ao in (False, True):
        grid = BlockGrid(t, 64, k, H.diagonal().clone())
        r = obs_sweep(W, inverse_hessian(H, actorder=ao), block_grid=grid)
        assert torch.equal(dequantize_data(grid.data(), t, k), r.W)  # every value on the format's grid
        D = r.W - W
        err[ao] = torch.einsum("ij,jk,ik->", D, H, D).item()
    assert err[True] < 0.9 * err[False]


def test_a_rotated_model_exports_to_gguf(smol_llama, tmp_path):
    """rotate + GPTQ into Q8_0 blocks: the rotated model is an ordinary llama (its head untied by
    the rotation, since the final norm is given a real scale here), which llama.cpp's layout takes;
    transformers reads the file back to the folder's logits once the embedding and head are the
    file's own roundings."""
    from transformers import AutoModelForCausalLM

    from slimkit.api import compress
    from slimkit.export import export
    from slimkit.recipe import Recipe

    dense = tmp_path / "dense"
    shutil.copytree(smol_llama / "m", dense)
    m = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    with torch.no_grad():
        m.model.norm.weight.uniform_(0.5, 1.5)
    m.save_pretrained(dense)
    rec = Recipe.from_dict({"name": "rot-q8", "stages": [{"method": "rotate"}, {"method": "gptq_gguf", "ftype": "Q8_0"}]})
    src = tmp_path / "c"
    report = compress(str(dense), rec, src, calib=str(smol_llama / "calib.txt"), nsamples=8, seqlen=64,
                      eval_data=None, progress=False)
    assert report["transforms"]["rotate"]["untied_head"]
    out = export(src, "gguf", tmp_path / "g")
    r = gguf.GGUFReader(str(out / "model.gguf"))
    tensors = {t.name: t for t in r.tensors}
    assert "output.weight" in tensors  # untied now: its own tensor
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    for name, param in (("token_embd.weight", ref.model.embed_tokens.weight), ("output.weight", ref.lm_head.weight)):
        t = tensors[name]
        param.data.copy_(torch.from_numpy(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
                                          .reshape(param.shape).copy()))
    got = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(input_ids=ids).logits, got(input_ids=ids).logits
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()
