"""Everything of a GGUF file but the encoding of its big Linear weights, as llama.cpp's converter writes it.

llama.cpp (b11434) loads a GGUF by its metadata: the architecture's hyper-parameters, the whole
tokenizer (tokens, scores, types, merges, the pre-tokenizer's name, special ids, chat template)
and each tensor under llama.cpp's own name, some of them rearranged. This module reproduces what
``convert_hf_to_gguf.py`` of that tree (with its own ``gguf-py``) writes for the families below, key
for key and value for value, so that an exporter only has to choose how to encode each tensor:

* :func:`check_supported` refuses, in one line and before any work, a model or a tokenizer this
  module cannot write exactly as the converter would (or that the converter would mis-write);
* :func:`tensor_plan` maps every Hugging Face tensor to its GGUF name, its transform (llama's
  q/k row permutation, gemma's norm + 1) and llama.cpp's tensor category;
* :func:`new_writer` returns a ``gguf.GGUFWriter`` holding all the metadata and the tokenizer
  (and, for llama3 RoPE scaling, the generated ``rope_freqs`` tensor the converter adds first);
  the caller adds ``general.file_type`` and the tensors, then writes the file.

Every rule here names the converter's place it copies (``conversion/base.py``, ``llama.py``,
``qwen.py``, ``gemma.py``, ``gguf-py/gguf/vocab.py``).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from hashlib import sha256
from pathlib import Path
from typing import Any, Callable, Iterable

import gguf
import numpy as np
import torch

from ..pack.source import PackError

log = logging.getLogger(__name__)

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma")

# model_type -> (llama.cpp architecture, the Hugging Face classes the converter's class takes for it)
_FAMILIES: dict[str, tuple[gguf.MODEL_ARCH, tuple[str, ...]]] = {
    "llama": (gguf.MODEL_ARCH.LLAMA, ("LlamaForCausalLM", "MistralForCausalLM")),
    "mistral": (gguf.MODEL_ARCH.LLAMA, ("MistralForCausalLM", "LlamaForCausalLM")),
    "qwen2": (gguf.MODEL_ARCH.QWEN2, ("Qwen2ForCausalLM",)),
    "qwen3": (gguf.MODEL_ARCH.QWEN3, ("Qwen3ForCausalLM",)),
    "gemma": (gguf.MODEL_ARCH.GEMMA, ("GemmaForCausalLM",)),
}
_PERMUTE_QK = ("llama", "mistral")  # LlamaModel.undo_permute

# The converter's check string (TextModel.get_vocab_base_pre): its tokenization's sha256 names the
# pre-tokenizer. Written with escapes so that no editor can normalise it; sha256 of its UTF-8 is
# a36179c1e2b1cfcfbfad1dc779addad2ffc778201e4cf0d538bddeafa2c526da (checked by the tests).
CHKTXT = (
    '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f '
    '(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 '
    '3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785'
    '\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= '
    '\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 '
    '\'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? '
    '\'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'
)

# The subset of the converter's hash table (get_vocab_base_pre) for tokenizers of these families
# (the llama, mistral and qwen BPE tokenizers and the llama-architecture models the table names).
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # abacusai/Smaug-Llama-3-70B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen/Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen/Qwen3-Embedding-0.6B
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",  # R1-Distill-Qwen-1.5B
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # mistralai/Mistral-Nemo-Base-2407
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",  # mistral-community/pixtral-12b
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",  # tiiuae/Falcon3-7B-Base
    "d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1": "megrez",  # Infinigence/Megrez-3B-Instruct
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",  # deepseek-llm-7b-base
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",  # deepseek-coder-6.7b-base
    "d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec": "seed-coder",  # ByteDance-Seed/Seed-Coder-8B
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",  # evilfreelancer/ruGPT3XL
}

# llama.cpp's categories of the block tensors an exporter encodes (GGUF base name -> category)
_CATEGORIES = ("token_embd", "output", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# names the converter never writes (ModelBase.prepare_tensors; TextModel.filter_tensors skips multimodal parts)
_DROPPED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")
_MULTIMODAL_PREFIXES = ("mlp", "vit.", "vpm.", "siglip2.", "conformer.", "merger.", "resampler.", "sound_encoder.",
                        "sound_projection.", "speech_embeddings.")
_MULTIMODAL_PARTS = ("visual.", "vision.", "audio.", "talker.", "vision_", "audio_", "token2wav.", "code2wav.",
                     "projector.", "pre_mm_projector_norm", "image_newline", "view_seperator", "patch_embed",
                     "patch_embedding", "patch_merger.", "patch_merge_mlp.", "model.connector.")
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok", "num_experts_per_token",
             "top_k_experts", "n_group", "topk_group")

# SentencePiece piece types as the converter writes them (SentencePieceTokenTypes == gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = (
    int(gguf.TokenType.NORMAL), int(gguf.TokenType.UNKNOWN), int(gguf.TokenType.CONTROL),
    int(gguf.TokenType.USER_DEFINED), int(gguf.TokenType.UNUSED), int(gguf.TokenType.BYTE))


@dataclass
class TensorPlan:
    """Where one Hugging Face tensor goes in the GGUF file and what happens to it on the way."""
    hf_name: str
    gguf_name: str
    transform: Callable[[torch.Tensor], torch.Tensor] | None  # None: written as is
    row_permutation: torch.Tensor | None  # p with transform(W) == W[p] (llama q/k), else None
    category: str  # llama.cpp's role: token_embd, output, attn_q, ..., ffn_down, norm (any 1-D), other
    layer: int | None  # block index, None outside the blocks


# ----------------------------------------------------------------------------------- configuration

def _family(config: dict) -> str:
    mt = config.get("model_type")
    if mt not in _FAMILIES:
        raise PackError(f"model_type {mt!r} cannot be written as GGUF; supported: {', '.join(SUPPORTED)}")
    return mt


def _hparams(config: dict, folder: Path | None = None) -> dict:
    """The config as the converter reads it: AutoConfig.from_pretrained(folder).to_dict(), i.e. with
    the defaults of transformers' config class filled in (head_dim, rope_parameters, ...)."""
    from transformers import CONFIG_MAPPING

    try:
        hp = CONFIG_MAPPING[config["model_type"]].from_dict(dict(config)).to_dict()
    except Exception as e:  # a malformed config.json
        raise PackError(f"config.json of model_type {config['model_type']!r} cannot be read: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if folder is not None:
        hp["_name_or_path"] = str(folder)
    return hp


def _find(hp: dict, keys: Iterable[str]) -> Any:
    """ModelBase.find_hparam(optional=True): the value of the first of ``keys`` present (even None)."""
    key = next((k for k in keys if k in hp), None)
    return None if key is None else hp[key]


def _rope_parameters(hp: dict) -> dict:
    """TextModel.__init__: rope_parameters (or rope_scaling) with the top-level rope keys mirrored in."""
    rp = dict(hp.get("rope_parameters", hp.get("rope_scaling")) or {})
    theta = _find(hp, ["global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta", "rotary_emb_base"])
    local = _find(hp, ["local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta",
                       "rope_local_base_freq"])
    partial = _find(hp, ["partial_rotary_factor", "rope_pct", "rope_percent"])
    orig_ctx = _find(hp, ["original_max_position_embeddings"])
    if "full_attention" not in rp and "sliding_attention" not in rp:
        if local is not None:
            rp["sliding_attention"] = {"rope_theta": local}
        if "rope_theta" not in rp and theta is not None:
            rp["rope_theta"] = theta
        if "rope_type" not in rp and rp.get("type") is not None:
            rp["rope_type"] = rp["type"]
        if "partial_rotary_factor" not in rp and partial is not None:
            rp["partial_rotary_factor"] = partial
        if "original_max_position_embeddings" not in rp and orig_ctx is not None:
            rp["original_max_position_embeddings"] = orig_ctx
    return rp


def _block_count(hp: dict) -> int:
    n = _find(hp, ["n_layers", "num_hidden_layers", "n_layer", "num_layers"])
    if not isinstance(n, int) or n < 1:
        raise PackError(f"config.json has no valid num_hidden_layers ({n!r})")
    return n


def _check_config(family: str, config: dict, hp: dict, folder: Path) -> None:
    arches = config.get("architectures") or []
    want = _FAMILIES[family][1]
    if not arches or arches[0] not in want:
        raise PackError(f"architecture {arches[0] if arches else None!r} of model_type {family!r} cannot be written "
                        f"as GGUF; supported: {', '.join(want)}")
    moe = [k for k in _MOE_KEYS if hp.get(k) is not None]
    if moe:
        raise PackError(f"mixture-of-experts configs ({', '.join(moe)}) cannot be written as GGUF here")
    if "text_config" in hp or "draft_vocab_size" in hp:
        raise PackError("multimodal or draft-model configs (text_config, draft_vocab_size) cannot be written "
                        "as GGUF here")
    if hp.get("is_causal") is False or hp.get("use_bidirectional_attention"):
        raise PackError("non-causal (bidirectional) models cannot be written as GGUF here")
    if hp.get("classifier_pooling") is not None or (folder / "modules.json").is_file():
        raise PackError("sentence-transformers / pooling models (modules.json, classifier_pooling) cannot be "
                        "written as GGUF here")
    if family == "qwen3" and _is_qwen3_reranker(hp, folder):
        raise PackError("Qwen3 reranker models cannot be written as GGUF here")
    _block_count(hp)
    window = hp.get("sliding_window")
    if window and (family == "mistral" or hp.get("use_sliding_window")) and window < hp["max_position_embeddings"]:
        # the converter writes no window for these architectures: llama.cpp attends to the whole context
        log.warning("gguf: the sliding window of %d tokens is not written (as llama.cpp's converter does); "
                    "llama.cpp attends over the whole context", window)
    rp = _rope_parameters(hp)
    if "mrope_section" in rp or "full_attention" in rp or "sliding_attention" in rp:
        raise PackError("per-layer-type or multimodal RoPE parameters cannot be written as GGUF here")
    rope = rp.get("rope_type")
    if family == "gemma":
        # GemmaModel.set_gguf_parameters writes no RoPE key: llama.cpp's defaults (theta 10000, no scaling)
        if rope not in (None, "default") or rp.get("rope_theta", 10000.0) != 10000.0:
            raise PackError(f"gemma with RoPE {rope!r} / theta {rp.get('rope_theta')!r}: llama.cpp's converter "
                            f"writes no RoPE keys for gemma (theta 10000 unscaled only)")
    elif rope not in (None, "default"):
        ok = (rope in ("linear", "yarn") and rp.get("factor") is not None) \
            or (rope.lower() == "llama3" and family in _PERMUTE_QK)
        if rope == "yarn" and "original_max_position_embeddings" not in rp:
            ok = False
        if not ok:
            raise PackError(f"RoPE scaling {rope!r} of {family} cannot be written as GGUF; "
                            f"supported: linear, yarn{', llama3' if family in _PERMUTE_QK else ''} (with a factor)")


def _is_qwen3_reranker(hp: dict, folder: Path) -> bool:
    """Qwen3Model._is_qwen3_reranker: the converter turns those into a pooling model."""
    readme = folder / "README.md"
    text = readme.read_text(encoding="utf-8", errors="replace").lower() if readme.is_file() else ""
    if "# qwen3-reranker" in text or "# qwen3-vl-reranker" in text:
        return True
    arch = ((hp.get("architectures") or [None])[0] or "")
    hints = [folder.name, str(hp.get("_name_or_path", "")), str(hp.get("model_type", "")), arch]
    if any("qwen3-reranker" in h.lower() or "qwen3-vl-reranker" in h.lower() for h in hints if h):
        return True
    return "sequenceclassification" in arch.lower()


# ---------------------------------------------------------------------------------------- tensors

def _heads(hp: dict) -> tuple[int, int, int]:
    n_head = _find(hp, ["n_heads", "num_attention_heads"])
    n_kv = _find(hp, ["n_kv_heads", "num_key_value_heads"]) or n_head
    head_dim = hp.get("head_dim") or hp["hidden_size"] // n_head
    return n_head, n_kv, head_dim


def llama_permutation(rows: int, n_head: int) -> torch.Tensor:
    """The row order of LlamaModel.permute for ``n_head`` heads: out = W[p] (llama.cpp's RoPE takes
    the two rotated halves of a head interleaved, Hugging Face's are its first and second half)."""
    if rows % (2 * n_head):
        raise PackError(f"{rows} rows cannot be split into {n_head} heads of pairs")
    return torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


def _permute(p: torch.Tensor, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def transform(t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] != p.numel():
            raise PackError(f"{name}: {t.shape[0]} rows, the config's heads make {p.numel()}")
        return t[p]
    return transform


def _gemma_norm(t: torch.Tensor) -> torch.Tensor:
    """GemmaModel.modify_tensors: llama.cpp multiplies by the weight, Gemma by (1 + weight). The add
    happens in the dtype the converter holds (f16/f32 as stored, anything else as float32)."""
    if t.dtype not in (torch.float16, torch.float32):
        t = t.to(torch.float32)
    return t + 1


def _category(gguf_name: str) -> tuple[str, int | None]:
    parts = gguf_name.split(".")
    layer = int(parts[1]) if parts[0] == "blk" and len(parts) > 2 and parts[1].isdecimal() else None
    base = parts[2] if layer is not None else parts[0]
    if gguf_name.endswith(".bias") or base.endswith("_norm") or base == "rope_freqs":
        return "norm", layer
    return (base if base in _CATEGORIES else "other"), layer


def tensor_plan(config: dict, names: Iterable[str]) -> list[TensorPlan]:
    """Every Hugging Face tensor of the model -> its GGUF name and transform, in the order given.
    Tensors the converter drops (rotary inv_freq, gemma's lm_head, multimodal parts) are left out;
    a tied lm_head is absent from the checkpoint and stays absent (llama.cpp reuses token_embd);
    a tensor with no GGUF name is a PackError naming it."""
    family = _family(config)
    hp = _hparams(config)
    arch = _FAMILIES[family][0]
    tmap = gguf.get_tensor_name_map(arch, _block_count(hp))
    n_head, n_kv, head_dim = _heads(hp)
    perms: dict[str, torch.Tensor] = {}
    if family in _PERMUTE_QK:
        perms = {"q_proj": llama_permutation(n_head * head_dim, n_head),
                 "k_proj": llama_permutation(n_kv * head_dim, n_kv)}
    plan = []
    for hf_name in names:
        name = hf_name
        if name.startswith(_MULTIMODAL_PREFIXES) or any(p in name for p in _MULTIMODAL_PARTS):
            continue
        name = name.replace("language_model.", "")
        if family in _PERMUTE_QK:
            name = name.replace("text_model.", "")
        if name.endswith(_DROPPED_SUFFIXES) or (family == "gemma" and name == "lm_head.weight"):
            log.debug("gguf: %s is not written (the converter drops it)", hf_name)
            continue
        gguf_name = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise PackError(f"tensor {hf_name!r} has no GGUF name in llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} layout")
        transform, perm = None, None
        proj = next((k for k in perms if name.endswith((f"{k}.weight", f"{k}.bias"))), None)
        if proj is not None:
            perm = perms[proj]
            transform = _permute(perm, hf_name)
        elif family == "gemma" and name.endswith("norm.weight"):
            transform = _gemma_norm
        category, layer = _category(gguf_name)
        plan.append(TensorPlan(hf_name, gguf_name, transform, perm, category, layer))
    return plan


def _llama3_rope_freqs(hp: dict, rp: dict) -> np.ndarray:
    """LlamaModel.generate_extra_tensors: per-frequency factors of llama3 RoPE scaling."""
    base = rp.get("rope_theta", 10000.0)
    dim = hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rp.get("factor", 8.0)
    low, high = rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old_ctx = rp.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32).numpy()


# -------------------------------------------------------------------------------------- tokenizer

def _tokenizer_kind(family: str, folder: Path) -> str:
    """'spm' (tokenizer.model, tokenizer model "llama") or 'bpe' (tokenizer.json, "gpt2"), chosen in
    the converter's order (LlamaModel / Qwen2Model / GemmaModel.set_vocab); PackError otherwise."""
    spm, tj, tc = folder / "tokenizer.model", folder / "tokenizer.json", folder / "tokenizer_config.json"
    if family in _PERMUTE_QK:
        if (folder / "tekken.json").is_file() and not tj.is_file():
            raise PackError("Mistral tekken.json tokenizers cannot be written as GGUF here (need tokenizer.json)")
        if tc.is_file() and _read_json(tc).get("tokenizer_class") == "HybridDNATokenizer":
            raise PackError("HybridDNATokenizer tokenizers cannot be written as GGUF here")
    if spm.is_file():
        return "spm"
    if family == "gemma":
        raise PackError(f"gemma needs a SentencePiece tokenizer.model, none in {str(folder)!r}")
    if not tj.is_file():
        raise PackError(f"no tokenizer (tokenizer.json or tokenizer.model) in {str(folder)!r}")
    tokenizer = _read_json(tj)
    model, decoder = tokenizer.get("model") or {}, tokenizer.get("decoder")
    if model.get("type") != "BPE":
        raise PackError(f"tokenizer.json of type {model.get('type')!r} cannot be written as GGUF; "
                        f"supported: BPE tokenizer.json or SentencePiece tokenizer.model")
    if family in _PERMUTE_QK and model.get("byte_fallback", False) \
            and isinstance(decoder, dict) and decoder.get("type") == "Sequence":
        # LlamaHfVocab: a SentencePiece-style BPE ("llama" tokenizer model) read from tokenizer.json
        raise PackError("SentencePiece-style byte-fallback tokenizer.json without tokenizer.model cannot be "
                        "written as GGUF here")
    return "bpe"


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PackError(f"{path.name} cannot be read: {str(e).splitlines()[0]}") from None
    return value if isinstance(value, dict) else {}


def _sentencepiece():
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise PackError("a SentencePiece tokenizer.model needs the package sentencepiece: "
                        "pip install sentencepiece") from None
    return SentencePieceProcessor


@lru_cache(maxsize=2)
def _auto_tokenizer(folder: str, stamp: tuple):
    from transformers import AutoTokenizer

    del stamp  # part of the cache key only: a rewritten tokenizer is read again
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise PackError(f"the tokenizer of {folder!r} cannot be loaded: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _load_tokenizer(folder: Path):
    stamp = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.glob("*.json")))
    return _auto_tokenizer(str(folder.resolve()), stamp)


def pre_tokenizer_name(tokenizer) -> str:
    """TextModel.get_vocab_base_pre: the name llama.cpp knows this BPE pre-tokenizer by, from the
    sha256 of the tokenization of CHKTXT; PackError for a hash not in PRE_TOKENIZERS."""
    chkhsh = sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    name = PRE_TOKENIZERS.get(chkhsh)
    if name is None:
        raise PackError(f"BPE pre-tokenizer not recognised (chkhsh {chkhsh}); known: "
                        f"{', '.join(sorted(set(PRE_TOKENIZERS.values())))}")
    return name


def _looks_special(token: str) -> bool:
    """TextModel.does_token_look_special: added tokens some models forget to mark special."""
    return token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") \
        or (token.startswith("<|") and token.endswith("|>")) \
        or (token.startswith("<\uff5c") and token.endswith("\uff5c>")) \
        or (token.startswith("<unused") and token.endswith(">"))


def _bpe_vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """TextModel.get_vocab_base: tokens by id ([PADi] for holes), added tokens normalised and typed."""
    reverse = {i: t for t, i in tokenizer.vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:  # llama.cpp takes control / user tokens as pre-normalised
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                types.append(_CONTROL)
            else:
                token = token.replace("\u2581", " ")  # pre-normalise user-defined spaces
                types.append(_USER_DEFINED)
        else:
            types.append(_NORMAL)
        tokens.append(token)
    return tokens, types


def _spm_vocab(folder: Path, hp: dict) -> tuple[list[bytes], list[float], list[int]]:
    """TextModel._create_vocab_sentencepiece: pieces, scores and types of tokenizer.model, with the
    added tokens of added_tokens.json and tokenizer_config.json over them."""
    sp = _sentencepiece()()
    sp.LoadFromFile(str(folder / "tokenizer.model"))
    vocab_size = _find(hp, ["vocab_size_per_layer_input", "vocab_size"]) or sp.vocab_size()
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [_UNUSED] * vocab_size
    for i in range(sp.vocab_size()):
        if i >= vocab_size:
            log.warning("gguf: tokenizer.model has pieces from id %d past vocab_size %d; ignored", i, vocab_size)
            break
        kind = _NORMAL
        if sp.IsUnknown(i):
            kind = _UNKNOWN
        elif sp.IsControl(i):
            kind = _CONTROL
        elif sp.IsUnused(i):
            kind = _UNUSED
        elif sp.IsByte(i):
            kind = _BYTE
        tokens[i], scores[i], types[i] = sp.IdToPiece(i).encode("utf-8"), sp.GetScore(i), kind
    if (folder / "added_tokens.json").is_file():
        for key, i in _read_json(folder / "added_tokens.json").items():
            if i >= vocab_size:
                log.warning("gguf: added token %d is past vocab_size %d; ignored", i, vocab_size)
                continue
            tokens[i], scores[i], types[i] = key.encode("utf-8"), -1000.0, _USER_DEFINED
    if (folder / "tokenizer_config.json").is_file():
        for key, data in (_read_json(folder / "tokenizer_config.json").get("added_tokens_decoder") or {}).items():
            i, token = int(key), data["content"]
            if i >= vocab_size:
                log.warning("gguf: added token %d is past vocab_size %d; ignored", i, vocab_size)
                continue
            if data.get("special") or _looks_special(token):
                types[i] = _CONTROL
            else:
                token = token.replace("\u2581", " ")
                types[i] = _USER_DEFINED
            scores[i], tokens[i] = -1000.0, token.encode("utf-8")
    return tokens, scores, types


class _SpecialVocab(gguf.SpecialVocab):
    """gguf.SpecialVocab with the rules of the gguf-py that llama.cpp b11434's converter runs with,
    which the gguf package on PyPI (0.19.0) predates: a ByteLevel post-processor means no BOS/EOS
    is added, a TemplateProcessing's leading token becomes BOS/CLS when none is configured, the
    post-processor wins over tokenizer_config's add_*_token, and the normalizer's lowercase /
    strip_accents flags are written."""

    def __init__(self, path: Path, load_merges: bool = False, special_token_types: Iterable[str] | None = None,
                 n_vocab: int | None = None):
        self.normalizer_lowercase: bool | None = None
        self.normalizer_strip_accents: bool | None = None
        super().__init__(path, load_merges=load_merges, special_token_types=special_token_types, n_vocab=n_vocab)

    def add_to_gguf(self, gw: gguf.GGUFWriter, quiet: bool = False) -> None:
        if self.merges:
            gw.add_token_merges(self.merges)
        elif self.load_merges:
            log.warning("gguf: merges requested but tokenizer.json has none; the tokenizer may not work")
        for typ, tokid in self.special_token_ids.items():
            handler = getattr(gw, f"add_{typ}_token_id", None)
            if handler is None:
                log.debug("gguf: no GGUF key for special token %s (id %d); skipped", typ, tokid)
                continue
            handler(tokid)
        for typ, value in self.add_special_token.items():
            handler = getattr(gw, f"add_add_{typ}_token", None)
            if handler is None:
                log.debug("gguf: no GGUF key for add_%s_token; skipped", typ)
                continue
            handler(value)
        keys = gguf.Keys.Tokenizer
        if self.normalizer_lowercase is not None:
            gw.add_bool(getattr(keys, "NORMALIZER_LOWERCASE", "tokenizer.ggml.normalizer.lowercase"),
                        self.normalizer_lowercase)
        if self.normalizer_strip_accents is not None:
            gw.add_bool(getattr(keys, "NORMALIZER_STRIP_ACCENTS", "tokenizer.ggml.normalizer.strip_accents"),
                        self.normalizer_strip_accents)
        if self.chat_template is not None:
            gw.add_chat_template(self.chat_template)

    def _parse_normalizer(self, normalizer: dict) -> None:
        kind = normalizer.get("type")
        if kind == "Lowercase":
            self.normalizer_lowercase = True
        elif kind == "StripAccents":
            self.normalizer_strip_accents = True
        elif kind == "BertNormalizer":
            if "lowercase" in normalizer:
                self.normalizer_lowercase = normalizer["lowercase"]
            if "strip_accents" in normalizer:
                self.normalizer_strip_accents = normalizer["strip_accents"]
        elif kind == "Sequence":
            for sub in normalizer.get("normalizers", []):
                self._parse_normalizer(sub)

    def _merges(self, merges: Any) -> None:
        if not isinstance(merges, list) or not merges:
            return
        if isinstance(merges[0], str):
            self.merges = merges
        elif isinstance(merges[0], list) and len(merges[0]) == 2 and isinstance(merges[0][0], str):
            # pairs (transformers >= 4.45); a space inside a part is written as U+0120 + 256 like llama.cpp
            self.merges = [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
                           for pair in merges]
        else:
            raise PackError("tokenizer.json has merges in an unknown format")

    def _try_load_from_tokenizer_json(self, path: Path) -> bool:
        tokenizer, added_tokens = None, []
        if (path / "tokenizer.json").is_file():
            tokenizer = _read_json(path / "tokenizer.json")
            if self.load_merges:
                self._merges((tokenizer.get("model") or {}).get("merges"))
            if normalizer := tokenizer.get("normalizer"):
                self._parse_normalizer(normalizer)
            added_tokens = tokenizer.get("added_tokens", {})
        config = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else None
        if tokenizer:
            self._read_post_processor(tokenizer, config)
        if not config:
            return True
        self._read_chat_template(path, config)
        for typ in self.special_token_types:
            add = config.get(f"add_{typ}_token")
            if isinstance(add, bool) and typ not in self.add_special_token:
                self.add_special_token[typ] = add  # the post-processor, when it says, wins
            entry = config.get(f"{typ}_token")
            content = entry.get("content") if isinstance(entry, dict) else entry
            if not isinstance(content, str):
                continue
            self._set_special_token(typ, next((a.get("id") for a in added_tokens if a.get("content") == content), None))
        return True

    def _read_chat_template(self, path: Path, config: dict) -> None:
        alt = None
        if (path / "chat_template.jinja").is_file():
            alt = (path / "chat_template.jinja").read_text(encoding="utf-8")
            extra = sorted((path / "additional_chat_templates").glob("*.jinja"))
            if extra:
                alt = [{"name": "default", "template": alt}] + [
                    {"name": p.stem, "template": p.read_text(encoding="utf-8")} for p in extra]
        elif (path / "chat_template.json").is_file():
            alt = _read_json(path / "chat_template.json").get("chat_template")
        template = config.get("chat_template", alt)
        if template is None or isinstance(template, (str, list)):
            self.chat_template = template
        else:
            log.warning("gguf: chat_template of tokenizer_config.json is neither text nor a list; ignored")

    def _read_post_processor(self, tokenizer: dict, config: dict | None) -> None:
        """gguf-py's crude reading of the post-processor: which of BOS / EOS / SEP tokenization adds."""
        cfg = config or {}
        bos, cls, eos, sep = (cfg.get(f"{k}_token") for k in ("bos", "cls", "eos", "sep"))
        if not bos and cls and config:
            config["bos_token"] = bos = cls
        if not eos and sep and config:
            config["eos_token"] = eos = sep
        post = tokenizer.get("post_processor")
        if not post:
            return
        for proc in post.get("processors", [post]):
            kind = proc.get("type")
            if kind == "ByteLevel":
                self.add_special_token.setdefault("bos", False)
                self.add_special_token.setdefault("eos", False)
            elif kind == "RobertaProcessing":
                self.add_special_token.update(bos=True, eos=True, sep=True)
                if not cls and config:
                    config["cls_token"] = cls = proc.get("cls", [bos])[0]
                if not sep and config:
                    config["sep_token"] = sep = proc.get("sep", [eos])[0]
            elif kind == "TemplateProcessing":
                bos, cls, eos, sep = self._read_template(proc, config, bos, cls, eos, sep)

    def _read_template(self, proc: dict, config: dict | None, bos, cls, eos, sep):
        single, pair = proc.get("single", []), proc.get("pair", [])
        first = last = None
        if len(single) > 1:
            if first := single[0].get("SpecialToken", {}).get("id"):
                if not config:
                    bos = first
                elif first not in (bos, cls):
                    if not bos:
                        config["bos_token"] = bos = first
                    if not cls:
                        config["cls_token"] = cls = first
                self.add_special_token["bos"] = first in (bos, cls)
            if last := single[-1].get("SpecialToken", {}).get("id"):
                if not config:
                    eos = last
                elif last != eos:
                    if "eot" not in self.special_token_types:
                        self.special_token_types = tuple(self.special_token_types) + ("eot",)
                        config["eot_token"] = eos
                    elif "eom" not in self.special_token_types:
                        self.special_token_types = tuple(self.special_token_types) + ("eom",)
                        config["eom_token"] = eos
                    config["eos_token"] = eos = last
                self.add_special_token["eos"] = last == eos
        if pair:
            start = 1 if first and pair[0].get("SpecialToken", {}).get("id") == first else 0
            stop = -1 if last and pair[-1].get("SpecialToken", {}).get("id") == last else None
            pair = pair[slice(start, stop)]
            if pair:
                a, b = pair[0].get("Sequence", {}).get("id"), pair[-1].get("Sequence", {}).get("id")
                if a == "A" and b == "B" and (middle := pair[1:-1]):
                    add_sep = False
                    if entry := middle[0].get("SpecialToken", {}).get("id"):
                        if entry in (sep, eos) and not last:
                            add_sep = True
                    if len(middle) == 2:
                        if entry := middle[1].get("SpecialToken", {}).get("id"):
                            if entry in (sep, eos):
                                add_sep = True
                    self.add_special_token["sep"] = add_sep
                    if add_sep and not sep and config:
                        config["sep_token"] = eos
        return bos, cls, eos, sep


def _write_vocab(gw: gguf.GGUFWriter, family: str, hp: dict, folder: Path) -> None:
    """set_vocab of LlamaModel / Qwen2Model / Qwen3Model / GemmaModel."""
    kind = _tokenizer_kind(family, folder)
    if family in _PERMUTE_QK and (folder / "tokenizer_config.json").is_file():
        add_prefix_space = _read_json(folder / "tokenizer_config.json").get("add_prefix_space")
        if add_prefix_space is not None:
            gw.add_add_space_prefix(add_prefix_space)
    if kind == "spm":
        tokens, scores, types = _spm_vocab(folder, hp)
        gw.add_tokenizer_model("llama")
        gw.add_tokenizer_pre("default")
        gw.add_token_list(tokens)
        gw.add_token_scores(scores)
        gw.add_token_types(types)
        _SpecialVocab(folder, n_vocab=len(tokens)).add_to_gguf(gw)
    else:
        tokenizer = _load_tokenizer(folder)
        vocab_size = hp.get("vocab_size", len(tokenizer.vocab))
        pre = pre_tokenizer_name(tokenizer)
        tokens, types = _bpe_vocab(tokenizer, vocab_size)
        gw.add_tokenizer_model("gpt2")
        gw.add_tokenizer_pre(pre)
        gw.add_token_list(tokens)
        gw.add_token_types(types)
        _SpecialVocab(folder, load_merges=True).add_to_gguf(gw)
    if family in _PERMUTE_QK:
        if hp.get("vocab_size", 32000) == 32016:  # CodeLlama's infill tokens
            special = _SpecialVocab(folder, special_token_types=["prefix", "suffix", "middle", "eot"])
            for typ, tid in (("prefix", 32007), ("suffix", 32008), ("middle", 32009), ("eot", 32010)):
                special._set_special_token(typ, tid)
            special.add_to_gguf(gw)
        if hp.get("vocab_size", 32000) == 49152:  # the converter's rule for granite-sized vocabularies
            gw.add_add_bos_token(False)
    elif family == "gemma":
        special = _SpecialVocab(folder, special_token_types=["prefix", "suffix", "middle", "fsep", "eot"])
        for typ, tid in (("prefix", 67), ("suffix", 69), ("middle", 68), ("fsep", 70), ("eot", 107)):
            special._set_special_token(typ, tid)
        special.chat_template = None  # written once already
        special.add_to_gguf(gw)
        gw.add_add_space_prefix(False)


def _check_tokenizer(family: str, hp: dict, folder: Path) -> None:
    kind = _tokenizer_kind(family, folder)
    if kind == "spm":
        sp = _sentencepiece()()
        try:
            sp.LoadFromFile(str(folder / "tokenizer.model"))
        except (OSError, RuntimeError) as e:
            raise PackError(f"tokenizer.model cannot be read: {str(e).splitlines()[0] if str(e) else e!r}") from None
        return
    tokenizer = _load_tokenizer(folder)
    vocab = getattr(tokenizer, "vocab", None)
    if not isinstance(vocab, dict) or not vocab:
        raise PackError("the tokenizer has no vocabulary to write as GGUF")
    vocab_size = hp.get("vocab_size", len(vocab))
    if max(vocab.values()) >= vocab_size:
        raise PackError(f"the tokenizer has ids up to {max(vocab.values())}, past the model's vocab_size {vocab_size}")
    pre_tokenizer_name(tokenizer)


# ------------------------------------------------------------------------------------ the writer

def check_supported(config: dict, folder: Path) -> None:
    """PackError (one line) before any work if the model or its tokenizer cannot be written exactly
    as llama.cpp's converter writes it."""
    folder = Path(folder)
    family = _family(config)
    hp = _hparams(config, folder)
    _check_config(family, config, hp, folder)
    _check_tokenizer(family, hp, folder)


def _total_params(family: str, config: dict, folder: Path, extra: int) -> int:
    """The parameter count the converter's size label comes from: the elements of every tensor it
    writes, from the shapes in the checkpoint's safetensors headers (0 when there are none)."""
    from safetensors import safe_open

    files = sorted(p for p in folder.iterdir() if p.name.startswith("model") and p.name.endswith(".safetensors"))
    shapes: dict[str, list[int]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            shapes.update({k: st.get_slice(k).get_shape() for k in st.keys()})
    if not shapes:
        log.info("gguf: no model*.safetensors in %s, so no size label", folder)
        return 0
    return extra + sum(math.prod(shapes[p.hf_name]) for p in tensor_plan(config, shapes))


def _write_parameters(gw: gguf.GGUFWriter, family: str, hp: dict) -> None:
    """set_gguf_parameters of TextModel + LlamaModel / Qwen2Model, or GemmaModel's own (without
    general.file_type, which the caller writes)."""
    if family == "gemma":
        gw.add_context_length(hp["max_position_embeddings"])
        gw.add_embedding_length(hp["hidden_size"])
        gw.add_block_count(_block_count(hp))
        gw.add_feed_forward_length(hp["intermediate_size"])
        gw.add_head_count(hp["num_attention_heads"])
        gw.add_head_count_kv(hp["num_key_value_heads"] if "num_key_value_heads" in hp else hp["num_attention_heads"])
        gw.add_layer_norm_rms_eps(hp["rms_norm_eps"])
        gw.add_key_length(hp["head_dim"])
        gw.add_value_length(hp["head_dim"])
        return
    gw.add_block_count(_block_count(hp))
    if (n_ctx := _find(hp, ["max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length",
                            "model_max_length"])) is not None:
        gw.add_context_length(n_ctx)
    if (n_embd := _find(hp, ["hidden_size", "n_embd", "dim"])) is not None:
        gw.add_embedding_length(n_embd)
    if (n_ff := _find(hp, ["prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size",
                           "n_inner", "hidden_dim"])) is not None:
        gw.add_feed_forward_length(n_ff)
    if (n_head := _find(hp, ["num_attention_heads", "n_head", "n_heads"])) is not None:
        gw.add_head_count(n_head)
    if (n_kv := _find(hp, ["num_key_value_heads", "n_kv_heads"])) is not None:
        gw.add_head_count_kv(n_kv)
    rp = _rope_parameters(hp)
    rope = rp.get("rope_type")
    if rope == "linear":
        gw.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        gw.add_rope_scaling_factor(rp["factor"])
    elif rope == "yarn":
        gw.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        gw.add_rope_scaling_factor(rp["factor"])
        gw.add_rope_scaling_orig_ctx_len(rp["original_max_position_embeddings"])
        if (v := rp.get("extrapolation_factor")) is not None:
            gw.add_rope_scaling_yarn_ext_factor(v)
        if (v := rp.get("attention_factor", rp.get("attn_factor"))) is not None:
            gw.add_rope_scaling_yarn_attn_factor(v)
        if (v := rp.get("beta_fast")) is not None:
            gw.add_rope_scaling_yarn_beta_fast(v)
        if (v := rp.get("beta_slow")) is not None:
            gw.add_rope_scaling_yarn_beta_slow(v)
    if (theta := rp.get("rope_theta")) is not None:
        gw.add_rope_freq_base(theta)
    if (local := rp.get("sliding_attention", {}).get("rope_theta")) is not None:
        gw.add_rope_freq_base_swa(local)
    if (eps := _find(hp, ["rms_norm_eps", "norm_eps"])) is not None:
        gw.add_layer_norm_rms_eps(eps)
    if (eps := _find(hp, ["layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"])) is not None:
        gw.add_layer_norm_eps(eps)
    if (head_dim := hp.get("head_dim")) is not None:
        gw.add_key_length(head_dim)
        gw.add_value_length(head_dim)
    if family in _PERMUTE_QK:
        gw.add_vocab_size(hp["vocab_size"])
        gw.add_rope_dimension_count(hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"])


def new_writer(path: Path, config: dict, folder: Path, *, model_name: str | None = None) -> gguf.GGUFWriter:
    """A GGUFWriter for ``path`` holding what llama.cpp's converter writes for this model besides its
    tensors and general.file_type: general.* (name, size label, ... from the folder like the
    converter's gguf.Metadata), the architecture's hyper-parameters, general.quantization_version
    and the whole tokenizer. With llama3 RoPE scaling it also holds the converter's generated
    rope_freqs.weight (F32), its first tensor. The caller adds general.file_type and the tensors of
    :func:`tensor_plan`, then writes the file (write_header_to_file, write_kv_data_to_file,
    write_tensors_to_file, close). ``model_name`` is the converter's --model-name."""
    folder = Path(folder)
    check_supported(config, folder)
    family = _family(config)
    hp = _hparams(config, folder)
    arch = _FAMILIES[family][0]
    gw = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    rp = _rope_parameters(hp)
    extra = 0
    if family in _PERMUTE_QK and (rp.get("rope_type") or "").lower() == "llama3":
        freqs = _llama3_rope_freqs(hp, rp)
        gw.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", freqs,
                      raw_dtype=gguf.GGMLQuantizationType.F32)
        extra = freqs.size
    gw.add_type(gguf.GGUFType.MODEL)
    total = _total_params(family, config, folder, extra)
    meta = gguf.Metadata.load(None, folder, model_name, total)
    gen = folder / "generation_config.json"
    if meta.sampling_penalty_repeat is None and gen.is_file():
        # the converter's gguf-py also reads transformers' name for it (PyPI's 0.19.0 does not)
        meta.sampling_penalty_repeat = _read_json(gen).get("repetition_penalty")
    if meta.name is None:
        meta.name = folder.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, total, 0, 0)
    meta.set_gguf_meta_model(gw)
    _write_parameters(gw, family, hp)
    gw.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_vocab(gw, family, hp, folder)
    log.info("gguf: %s metadata and tokenizer of %s ready (%d keys)", gguf.MODEL_ARCH_NAMES[arch], folder.name,
             len(gw.kv_data[0]))
    return gw
