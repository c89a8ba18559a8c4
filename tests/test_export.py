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
    # nothing half-written: no "x", no hidden ".x.partial" beside it (the refusals come from the
    # writers, inside the temporary folder), nothing else either
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "w3"]


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


# -- devices ---------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_kernel_ops_choice_and_cuda_int4_layout():
    """The CPU keeps its kernels; devices without int4 kernels get none (exact path); the CUDA
    packing (checked through the ops' meta shapes, no GPU needed) takes (N, K/2) uint8 with the
    even column in the high nibble and yields tinygemm's (N/8, K/(16 t), 32, t/2) int32 tiles."""
    from slimkit.pack.runtime import _pack_int4_cuda, cuda_inner_k_tiles, cuda_int4_bytes, kernel_ops

    cpu = kernel_ops("cpu")
    assert cpu.device_type == "cpu" and not cpu.verify
    assert cpu.mm is torch.ops.aten._weight_int4pack_mm_for_cpu
    assert kernel_ops("meta") is None
    codes = torch.randint(0, 16, (16, 64), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    b = cuda_int4_bytes(codes)
    assert b.dtype == torch.uint8 and b.shape == (16, 32)
    assert torch.equal(b >> 4, codes[:, 0::2]) and torch.equal(b & 15, codes[:, 1::2])
    assert [cuda_inner_k_tiles(k) for k in (32, 64, 96, 128, 4096)] == [2, 4, 2, 8, 8]
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # the ops' shape and dtype checks, on meta tensors
        packed = _pack_int4_cuda(torch.empty(48, 192, dtype=torch.uint8, device="meta"))
        assert packed.dtype == torch.int32 and packed.shape == (6, 192 // (16 * 4), 32, 2)
        y = torch.ops.aten._weight_int4pack_mm(torch.empty(3, 192, dtype=torch.bfloat16, device="meta"), packed,
                                               64, torch.empty(3, 48, 2, dtype=torch.bfloat16, device="meta"))
        assert y.shape == (3, 48) and y.dtype == torch.bfloat16


def test_load_on_cpu_device_equals_the_default(sparse_w4, tmp_path, ids):
    out = export(sparse_w4, "native", tmp_path / "n", device="cpu")
    for kw in ({"mode": "kernel"}, {"mode": "dequant"}, {"head": "int8"}, {"runtime": "dense"}):
        a, b = load(out, **kw), load(out, device="cpu", **kw)
        assert torch.equal(_logits(a, ids), _logits(b, ids)), kw
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), kw
    kern = load(out, mode="kernel", device="cpu")
    assert {m.kernel_device for m in kern.modules() if isinstance(m, PackedLinear)} == {"cpu"}
    plain = load(sparse_w4, device="cpu")
    assert torch.equal(_logits(plain, ids), _logits(load(sparse_w4), ids))


def test_cpu_kernel_falls_back_to_exact_on_another_device_type(sparse_w4, tmp_path, ids):
    """A CPU-packed kernel weight is never fed to another device's kernel: on inputs of another
    device type the layer takes the exact dequantize path (shown here with a CPU layer whose
    kernel claims to be CUDA's)."""
    out = export(sparse_w4, "native", tmp_path / "n")
    kern, exact = load(out, mode="kernel"), load(out, mode="dequant")
    for m in kern.modules():
        if isinstance(m, PackedLinear):
            m.kernel_device = "cuda"
    assert (_logits(kern, ids) - _logits(exact, ids)).abs().max() < EXACT_TOL


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where torch sees no CUDA device")
def test_cuda_without_cuda_is_one_slimkit_error(sparse_w4, tmp_path):
    from slimkit.errors import SlimkitError
    from slimkit.pack.generate import generate

    out = export(sparse_w4, "native", tmp_path / "n")
    for call in (lambda: load(out, device="cuda"), lambda: load(sparse_w4, device="cuda:1"),
                 lambda: generate(out, "hi", max_new_tokens=1, device="cuda"),
                 lambda: export(sparse_w4, "native", tmp_path / "x", device="cuda")):
        with pytest.raises(SlimkitError) as e:
            call()
        assert "CUDA" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "x").exists()
    with pytest.raises(SlimkitError, match="unknown device"):
        load(out, device="tpu")
    assert load(out, device="auto").device.type == "cpu"


def test_generate_on_cpu_device(sparse_w4, tmp_path):
    from slimkit.pack.generate import generate

    out = export(sparse_w4, "native", tmp_path / "n")
    a = generate(out, "hello", max_new_tokens=3)
    b = generate(out, "hello", max_new_tokens=3, device="cpu")
    assert a["text"] == b["text"] and b["new_tokens"] == 3


@needs_cuda
def test_packed_runtime_on_cuda_matches_dense(sparse_w4, tmp_path, ids):
    """The CUDA int4 kernel (where the device has one) against the dense runtime's logits; the
    exact path on CUDA against the same to fp32 tolerance."""
    from slimkit.pack.generate import generate
    from slimkit.pack.runtime import kernel_ops

    out = export(sparse_w4, "native", tmp_path / "n", device="cuda")
    dense = load(out, runtime="dense", device="cuda")
    assert dense.device.type == "cuda"
    cuda_ids = ids.to("cuda")
    want = _logits(dense, cuda_ids).float()
    exact = load(out, mode="dequant", device="cuda")
    assert (_logits(exact, cuda_ids) - want).abs().max() < EXACT_TOL
    kern = load(out, mode="kernel", device="cuda")
    lins = [m for m in kern.modules() if isinstance(m, PackedLinear)]
    assert all(b.device.type == "cuda" for b in kern.buffers())
    if kernel_ops("cuda") is not None:  # compute capability >= 8.0: every layer of this model qualifies
        assert {(m.kernel, m.kernel_device) for m in lins} == {("int4", "cuda")}
    got = _logits(kern, cuda_ids).float()
    rel = float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want))
    assert rel < 1e-2, rel
    assert (got - want).abs().max() < KERNEL_REL_TOL * want.abs().max()
    auto = load(out, device="cuda")  # 12 tokens: kernel; 24 tokens: exact path
    assert (_logits(auto, torch.cat([cuda_ids, cuda_ids], 1)) - _logits(dense, torch.cat([cuda_ids, cuda_ids], 1))
            ).abs().max() < EXACT_TOL
    q = load(out, head="int8", device="cuda")  # int8 head on CUDA: the exact dequantize path
    assert q.get_output_embeddings().kernel is None
    assert (_logits(q, cuda_ids) - want).abs().max() < KERNEL_REL_TOL * want.abs().max()
    r = generate(out, "hello", max_new_tokens=3, device="cuda")
    assert r["new_tokens"] == 3


def test_int4_load_check_keeps_a_right_kernel_and_drops_a_swapped_nibble_order(sparse_w4, tmp_path, monkeypatch):
    """The per-layer check the CUDA path runs at load, exercised with the CPU kernel: the right
    packing passes; codes packed with each byte's two nibbles swapped (the layout mistake the
    CUDA path could make) are refused and the layer falls back to the exact path."""
    from slimkit.pack import runtime

    out = export(sparse_w4, "native", tmp_path / "n")
    layers, _ = decode_all(*read_native(out), effective=False)
    rec = layers["model.layers.0.mlp.up_proj"]
    cpu = runtime.kernel_ops("cpu")
    swap = lambda c: runtime._pack_int4_cpu(c.view(c.shape[0], -1, 2).flip(-1).reshape(c.shape))  # noqa: E731
    x = torch.randn(3, rec.shape[1], generator=torch.Generator().manual_seed(0))
    exact = PackedLinear(rec, mode="dequant")
    for pack, kernel in ((cpu.pack, "int4"), (swap, None)):
        monkeypatch.setattr(runtime, "kernel_ops", lambda device, pack=pack: cpu._replace(pack=pack, verify=True))
        lin = PackedLinear(rec, mode="kernel")
        assert lin.kernel == kernel
        if kernel is None:
            assert torch.equal(lin(x), exact(x))
        else:
            assert (lin(x) - exact(x)).abs().max() < KERNEL_REL_TOL * exact(x).abs().max()
