"""Builders shared by the tests: tiny random models of each family, a tiny trained tokenizer."""
from __future__ import annotations

import torch

TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
        "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles, "
        "and by opposing end them. ") * 40

VOCAB = 320


def make_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(path)
    return fast


def tiny_config(model_type: str):
    from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, max_position_embeddings=256)
    if model_type == "opt":
        return OPTConfig(ffn_dim=128, num_hidden_layers=2, word_embed_proj_dim=64, do_layer_norm_before=True,
                         **common)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[model_type]
    return cls(intermediate_size=128, num_hidden_layers=2, num_key_value_heads=2, tie_word_embeddings=False,
               **common)


def make_model(model_type: str, path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    model.save_pretrained(path)
    make_tokenizer(path)
    return path



def correlated_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Tokens with correlated, unevenly scaled features (as real activations are)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    scale = torch.exp(torch.randn(k, generator=g))
    return (torch.randn(n, k, generator=g) @ mix) * scale


# families the engine is tested on end to end (tests/test_families.py; the README lists them)
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "granite",
            "opt", "stablelm", "cohere", "qwen2_moe", "mixtral"]
MOE_FAMILIES = {"qwen2_moe", "mixtral"}


def family_config(model_type: str, layers: int = 2, **extra):
    """A tiny config of any family from transformers' own config class: hidden 64, ``layers``
    blocks, 4 heads / 2 KV heads, vocabulary VOCAB; mixture-of-experts families get 4 experts of
    which 2 are routed per token; sliding-window families a window of 16 tokens."""
    from transformers import AutoConfig

    base = AutoConfig.for_model(model_type)
    want = dict(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=256, head_dim=16,
                pad_token_id=0, bos_token_id=1, eos_token_id=1, tie_word_embeddings=False, ffn_dim=128,
                word_embed_proj_dim=64, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                num_experts=4, num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
                use_sliding_window=True, partial_rotary_factor=0.5)
    kwargs = {k: v for k, v in want.items() if k in base.to_dict() or hasattr(base, k)}
    if model_type in ("gemma2", "gemma3_text"):
        kwargs["layer_types"] = (["sliding_attention", "full_attention"] * layers)[:layers]
    if model_type in ("qwen2", "qwen3", "qwen2_moe"):
        kwargs["max_window_layers"] = 0  # every layer slides (qwen2 uses the window from this layer on)
    return type(base)(**(kwargs | extra))
