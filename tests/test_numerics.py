"""NaN/Inf in a model is named (block and Linear) with exit 2 and nothing written."""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_cli import cli, compress_args


def poisoned(tiny_llama, tmp_path, key, value):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    sd = load_file(str(model / "model.safetensors"))
    sd[key] = sd[key].clone()
    sd[key].view(-1)[3] = value
    save_file(sd, str(model / "model.safetensors"), metadata={"format": "pt"})
    return model


def assert_named_failure(code, err, tmp_path, *needles):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and all(n in lines[0] for n in needles), err
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


@pytest.mark.parametrize("recipe", ["gptq-w4-g64", "rtn-w4-g64"])
def test_nan_weight_is_named(recipe, tiny_llama, text_file, tmp_path, capsys):
    model = poisoned(tiny_llama, tmp_path, "model.layers.1.mlp.up_proj.weight", float("nan"))
    code, _, err = cli(compress_args(model, tmp_path / "out", text_file, recipe), capsys)
    assert_named_failure(code, err, tmp_path, "model.layers.1.mlp.up_proj", "NaN")


def test_inf_activations_are_named(tiny_llama, text_file, tmp_path, capsys):
    """A huge (finite) norm weight in block 1 overflows the statistics of its attention projections."""
    model = poisoned(tiny_llama, tmp_path, "model.layers.1.input_layernorm.weight", 1e30)
    code, _, err = cli(compress_args(model, tmp_path / "out", text_file, "gptq-w4-g64"), capsys)
    assert_named_failure(code, err, tmp_path, "NaN/Inf", "model.layers.1.self_attn")


def test_inf_param_is_named(tiny_llama, text_file, tmp_path, capsys):
    model = poisoned(tiny_llama, tmp_path, "model.layers.1.input_layernorm.weight", float("inf"))
    code, _, err = cli(compress_args(model, tmp_path / "out", text_file, "rtn-w4-g64"), capsys)
    assert_named_failure(code, err, tmp_path, "model.layers.1.input_layernorm.weight")


def test_inf_block_output_is_named_for_data_free_recipes(tiny_llama, text_file, tmp_path, capsys):
    model = poisoned(tiny_llama, tmp_path, "model.layers.1.post_attention_layernorm.weight", 1e30)
    code, _, err = cli(compress_args(model, tmp_path / "out", text_file, "rtn-w4-g64"), capsys)
    assert_named_failure(code, err, tmp_path, "block 1", "NaN/Inf")


def test_dead_input_channel_compresses(tiny_llama, text_file, tmp_path, capsys):
    """A zero column of the input norm makes an input channel of q/k/v silent: GPTQ still runs."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    sd = load_file(str(model / "model.safetensors"))
    sd["model.layers.0.input_layernorm.weight"] = sd["model.layers.0.input_layernorm.weight"].clone()
    sd["model.layers.0.input_layernorm.weight"][5] = 0
    save_file(sd, str(model / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = cli(compress_args(model, tmp_path / "out", text_file, "gptq-w4-g64"), capsys)
    assert code == 0, err
    from transformers import AutoModelForCausalLM
    w = AutoModelForCausalLM.from_pretrained(tmp_path / "out").model.layers[0].self_attn.q_proj.weight
    assert torch.isfinite(w).all() and (w[:, 5] == 0).all()  # the dead column is zeroed, like GPTQ does
