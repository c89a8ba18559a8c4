"""Exports and the packed runtime: native (bit-exact reload), compressed-tensors, PEFT, corrupt files.

Tolerances: the native format reloads the fake-quantized weights bit for bit; the packed runtime's
exact fp32 path ("dequant") and the compressed-tensors / PEFT models match the fake-quantized
model's logits to 1e-4 absolute (matmul order only); the int4/int8 kernels run on bf16 activations
and match to 2% of the logits' range.
"""
import json
import subprocess
import sys

import pytest
import torch

from slimkit.api import compress
from slimkit.export import export
from slimkit.methods.base import LinearState
from slimkit.models import layout_for, load_model
from slimkit.ops.lowrank import absmax_quantize
from slimkit.ops.quant import QuantSpec, fake_quantize_matrix, fit
from slimkit.pack import PackError, PackedLinear, SlimkitFolder, load, pack_bits, unpack_bits
from slimkit.pack.native import MANIFEST_FILE, TENSORS_FILE, decode_all, read_native
from slimkit.recipe import Recipe
from slimkit.state_io import StateRecorder

EXACT_TOL = 1e-4
KERNEL_REL_TOL = 0.02


def _compress(src, out, stages, text_file):
    rec = Recipe.from_dict({"name": "t", "stages": stages})
    compress(str(src), rec, out, calib=str(text_file), nsamples=4, seqlen=32, eval_data=None, progress=False)
    return out


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def sparse_w4(tiny_llama, text_file, tmp_path_factory):
    return _compress(tiny_llama, tmp_path_factory.mktemp("c") / "sgpt",
                     [{"method": "sparsegpt", "sparsity": "2:4", "bits": 4, "group_size": 32}], text_file)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _handmade(src, out, spec_of, adapters=False, mixed_layer=None):
    """A slimkit folder built from LinearStates we construct: per-layer grids (spec_of(name)),
    optional AbsMax-quantized low-rank adapters of per-layer rank, optional SliM-LLM-style
    per-group bits on one layer."""
    model, tok, _ = load_model(str(src))
    layout = layout_for(model)
    rec = StateRecorder()
    g = torch.Generator().manual_seed(1)
    for i in range(len(layout.blocks(model))):
        for name, lin in layout.linears(model, i).items():
            st = LinearState.from_weight(name, lin.weight)
            spec = spec_of(name)
            st.scale, st.zero = fit(st.weight, spec)
            st.quant = spec
            st.weight = fake_quantize_matrix(st.weight, st.scale, st.zero, spec)
            if name == mixed_layer:
                N, K = st.weight.shape
                G = st.scale.shape[1]
                gb = torch.tensor([2, 3, 4, 8][:G] + [4] * max(0, G - 4), dtype=torch.uint8)
                colb = gb.to(torch.int64).repeat_interleave(spec.group_size)[:K]
                codes = (torch.rand(N, K, generator=g) * (2 ** colb).float()).floor().clamp(max=255).to(torch.uint8)
                zero = (2 ** (gb.to(torch.int64) - 1)).float().expand(N, G).clone()
                st.weight = (codes.float() - zero.repeat_interleave(spec.group_size, 1)[:, :K]) * \
                    st.scale.repeat_interleave(spec.group_size, 1)[:, :K]
                st.tensors.update(group_bits=gb, codes=codes, zero=zero)
            if adapters and "mlp" in name or adapters == "all":
                N, K = st.weight.shape
                r = 4 if "down" in name else 8
                L, _ = absmax_quantize(torch.randn(K, r, generator=g) * 0.05, 4, 16)
                R, _ = absmax_quantize(torch.randn(r, N, generator=g) * 0.05, 4, 16)
                st.L, st.R, st.adapter_bits, st.adapter_group = L, R, 4, 16
            lin.weight.data.copy_(st.effective_weight())
            rec(st)
    out.mkdir()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    rec.save(out, {"format": "slimkit-fakequant", "version": 1})
    return out


def _assert_same_state(layers, folder):
    """Decoded native records hold exactly the slimkit folder's state tensors (names, values, dtypes)."""
    for name, rec in layers.items():
        orig = folder.record(name)
        assert set(rec.tensors) == set(orig.tensors), name
        for k, v in orig.tensors.items():
            assert torch.equal(rec.tensors[k], v) and rec.tensors[k].dtype == v.dtype, (name, k)


# -- bit packing ------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(1, 9))
def test_bitpack_roundtrip(bits):
    v = torch.randint(0, 2**bits, (1001,), generator=torch.Generator().manual_seed(bits))
    p = pack_bits(v, bits)
    assert p.numel() == -(-1001 * bits // 8)
    assert torch.equal(unpack_bits(p, bits, 1001), v.to(torch.uint8))
    if bits == 4:  # two codes per byte, low nibble first
        assert int(p[0]) == int(v[0]) | int(v[1]) << 4


# -- native ----------------------------------------------------------------------------------
def test_native_roundtrip_bit_exact(sparse_w4, tmp_path, ids):
    out = export(sparse_w4, "native", tmp_path / "n")
    manifest, stored = read_native(out)
    layers, _ = decode_all(manifest, stored)
    _assert_same_state(layers, SlimkitFolder(sparse_w4))
    for name in layers:
        e = manifest["layers"][name]
        assert e["mask"]["encoding"] == "nm"
        N, K = e["shape"]
        assert stored[f"{name}.codes4"].numel() == N * K // 2 // 2  # kept half, two 4-bit codes per byte
        assert stored[f"{name}.pos"].numel() == N * K // 2 * 2 // 8  # 2-bit positions
    ref = load_model(str(sparse_w4), with_tokenizer=False)[0]
    dense = load(out, runtime="dense")
    sd = dense.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in ref.state_dict().items())
    want = _logits(ref, ids)
    packed = load(out, mode="dequant")
    assert isinstance(packed.get_submodule("model.layers.0.mlp.up_proj"), PackedLinear)
    assert (_logits(packed, ids) - want).abs().max() < EXACT_TOL
    kern = load(out, mode="kernel")
    assert {m.kernel for m in kern.modules() if isinstance(m, PackedLinear)} == {"int4"}
    assert (_logits(kern, ids) - want).abs().max() < KERNEL_REL_TOL * want.abs().max()


def test_native_adapters_and_mixed_bits(tiny_llama, tmp_path, ids):
    src = _handmade(tiny_llama, tmp_path / "h", lambda n: QuantSpec(4, 32), adapters=True,
                    mixed_layer="model.layers.1.mlp.down_proj")
    out = export(src, "native", tmp_path / "n")
    manifest, stored = read_native(out)
    o = manifest["layers"]["model.layers.1.mlp.down_proj"]
    assert o["code_bits"] == [2, 3, 4, 8] and o["column_bits"] == "group_bits"
    up = manifest["layers"]["model.layers.0.mlp.up_proj"]
    assert up["adapters"]["L"]["encoding"] == "absmax"  # quantized adapters kept as 4-bit codes
    assert stored["model.layers.0.mlp.up_proj.L.codes"].numel() == 64 * 8 // 2
    layers, _ = decode_all(manifest, stored)
    folder = SlimkitFolder(src)
    for name, rec in layers.items():
        for k, v in folder.record(name).tensors.items():
            assert torch.equal(rec.tensors[k], v), (name, k)
    ref = load_model(str(src), with_tokenizer=False)[0]
    sd = load(out, runtime="dense").state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in ref.state_dict().items())
    assert (_logits(load(out, mode="dequant"), ids) - _logits(ref, ids)).abs().max() < EXACT_TOL


def test_native_reallm_keeps_the_vq_code_not_a_dense_weight(tiny_llama, text_file, tmp_path, ids):
    src = _compress(tiny_llama, tmp_path / "r", [{"method": "reallm", "bits": 3.0, "ranks": [0, 4],
                                                   "kmeans_iters": 3}], text_file)
    out = export(src, "native", tmp_path / "n")
    manifest, stored = read_native(out)
    vq = [n for n, e in manifest["layers"].items() if e.get("base") == "vq"]
    assert len(vq) == len(manifest["layers"])  # every layer: its code, no dense weight
    assert not any(k.endswith((".weight", ".effective")) for k in stored if k.rsplit(".", 1)[0] in vq)
    layers, _ = decode_all(manifest, stored)
    _assert_same_state(layers, SlimkitFolder(src))
    ref = load_model(str(src), with_tokenizer=False)[0]
    sd = load(out, runtime="dense").state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in ref.state_dict().items())
    assert (_logits(load(out), ids) - _logits(ref, ids)).abs().max() < EXACT_TOL
    fp16 = sum(e["shape"][0] * e["shape"][1] * 16 for e in manifest["layers"].values())
    assert sum(sum(e["parts"].values()) for e in manifest["layers"].values()) < 0.35 * fp16


def test_int8_head_is_close_and_leaves_the_embedding_alone(sparse_w4, tmp_path, ids):
    out = export(sparse_w4, "native", tmp_path / "n")
    exact, q = load(out), load(out, head="int8")
    head = q.get_output_embeddings()
    assert isinstance(head, PackedLinear) and head.bits == 8 and head.group_size is None
    W = exact.get_output_embeddings().weight
    assert torch.equal(q.get_input_embeddings().weight, exact.get_input_embeddings().weight)
    deq = head.dequantize()
    # per-row symmetric 8-bit: every weight within half a step of its row's grid
    assert ((deq - W).abs() <= W.abs().amax(1, keepdim=True) / 127 / 2 + 1e-7).all()
    hidden = torch.randn(3, W.shape[1], generator=torch.Generator().manual_seed(0))
    assert torch.allclose(head(hidden[:, None])[:, 0], hidden @ deq.T, atol=0.02 * (hidden @ W.T).abs().max())
    want, got = _logits(exact, ids), _logits(q, ids)
    assert 0 < (got - want).abs().max() < KERNEL_REL_TOL * want.abs().max()
    with pytest.raises(ValueError, match="head must be"):
        load(out, head="int4")


# -- compressed-tensors ----------------------------------------------------------------------
def _ct_check(src, out, ids, dequantize=False):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    # asymmetric: transformers 5.23 + compressed-tensors 0.20 shape the PACKED zero point of the
    # compressed-run path as unpacked and refuse it; the decompress-on-load path reads it
    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, **kw)
    ref = load_model(str(src), with_tokenizer=False)[0]
    assert (_logits(model, ids) - _logits(ref, ids)).abs().max() < EXACT_TOL
    return cfg


def test_compressed_tensors_w4_group(sparse_w4, tmp_path, ids):
    pytest.importorskip("compressed_tensors")
    out = export(sparse_w4, "compressed-tensors", tmp_path / "ct")
    cfg = _ct_check(sparse_w4, out, ids, dequantize=True)
    w = cfg["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["strategy"], w["group_size"], w["symmetric"]) == (4, "group", 32, False)
    assert cfg["sparsity_config"] == {} and cfg["format"] == "pack-quantized"


def test_compressed_tensors_mixed_w8_channel_sym(tiny_llama, tmp_path, ids):
    pytest.importorskip("compressed_tensors")
    spec = lambda n: QuantSpec(8, None, symmetric=True) if "mlp" in n else QuantSpec(4, 32, symmetric=True)  # noqa: E731
    src = _handmade(tiny_llama, tmp_path / "h", spec)
    cfg = _ct_check(src, export(src, "compressed-tensors", tmp_path / "ct"), ids)
    schemes = sorted((g["weights"]["num_bits"], g["weights"]["strategy"]) for g in cfg["config_groups"].values())
    assert schemes == [(4, "group"), (8, "channel")]


def test_compressed_tensors_refusals(tiny_llama, text_file, tmp_path):
    w3 = _compress(tiny_llama, tmp_path / "w3", [{"method": "rtn", "bits": 3, "group_size": 32}], text_file)
    with pytest.raises(PackError, match="3-bit"):
        export(w3, "compressed-tensors", tmp_path / "x")
    ad = _handmade(tiny_llama, tmp_path / "ad", lambda n: QuantSpec(4, 32), adapters=True)
    with pytest.raises(PackError, match="--format peft"):
        export(ad, "compressed-tensors", tmp_path / "x")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.partial-*"))  # nothing half-written


# -- PEFT ------------------------------------------------------------------------------------
def test_peft_roundtrip(tiny_llama, tmp_path, ids):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    src = _handmade(tiny_llama, tmp_path / "h", lambda n: QuantSpec(4, 32), adapters=True)
    out = export(src, "peft", tmp_path / "p")
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == cfg["r"] == 8 and set(cfg["rank_pattern"].values()) == {4}
    base = AutoModelForCausalLM.from_pretrained(str(out / "base"), dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(out / "adapter"))
    ref = load_model(str(src), with_tokenizer=False)[0]
    assert (_logits(model, ids) - _logits(ref, ids)).abs().max() < EXACT_TOL
    plain = _handmade(tiny_llama, tmp_path / "n", lambda n: QuantSpec(4, 32))
    with pytest.raises(PackError, match="no low-rank adapters"):
        export(plain, "peft", tmp_path / "q")


# -- corrupt and truncated files --------------------------------------------------------------
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "slimkit", *args], capture_output=True, text=True)


def test_corrupt_native_one_line_errors(sparse_w4, tmp_path):
    out = export(sparse_w4, "native", tmp_path / "n")
    data = (out / TENSORS_FILE).read_bytes()
    (out / TENSORS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(PackError, match="truncated"):
        load(out)
    r = _cli("generate", str(out), "--prompt", "hi")
    assert r.returncode == 2 and r.stderr.startswith("slimkit: error:") and r.stderr.count("\n") == 1
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF
    (out / TENSORS_FILE).write_bytes(bytes(flipped))
    with pytest.raises(PackError, match="sha256"):
        load(out)
    (out / TENSORS_FILE).write_bytes(data)
    m = json.loads((out / MANIFEST_FILE).read_text())
    (out / MANIFEST_FILE).write_text(json.dumps(m | {"version": 99}))
    with pytest.raises(PackError, match="version 99"):
        load(out)
    (out / MANIFEST_FILE).write_text("{not json")
    r = _cli("info", str(out))
    assert r.returncode == 2 and "is corrupt" in r.stderr and r.stderr.count("\n") == 1


def test_cli_export_info(sparse_w4, tmp_path):
    r = _cli("export", str(sparse_w4), "--format", "native", "--out", str(tmp_path / "n"), "-q")
    assert r.returncode == 0, r.stderr
    r = _cli("info", str(tmp_path / "n"))
    assert r.returncode == 0 and "bits/weight mask" in r.stdout and "fp16 of the same layers" in r.stdout
    r = _cli("generate", str(tmp_path / "n"), "--prompt", "hi", "--max-new-tokens", "3", "--head", "int8")
    assert r.returncode == 0 and "3 tokens" in r.stderr, r.stderr
    r = _cli("export", str(sparse_w4), "--format", "native", "--out", str(tmp_path / "n"))
    assert r.returncode == 2 and "already exists" in r.stderr
