"""Tests of jaxlens.models.gguf.weights against transformers' own (PyTorch) GGUF loading of the
real SmolLM2-135M checkpoint, the undoing of llama.cpp's rotary row order, and the refusal of other
architectures."""

from __future__ import annotations

import numpy as np
import pytest
from gguf_files import write_gguf

from jaxlens.models.gguf import read_gguf
from jaxlens.models.gguf.weights import _unpermute_rotary_rows

CONFIG_FIELDS = [
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "max_position_embeddings",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
]


@pytest.fixture(scope="module")
def checkpoint(smollm2_path):
    return read_gguf(smollm2_path)


@pytest.fixture(scope="module")
def torch_model(torch_smollm2):
    return torch_smollm2


def test_state_dict_equals_transformers_pytorch_loading(checkpoint, torch_model):
    reference = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    ours = checkpoint.state_dict
    # The PyTorch model lists its tied lm_head as a separate entry; the file has no output.weight.
    assert set(reference) - set(ours) == {"lm_head.weight"}
    assert set(ours) <= set(reference)
    np.testing.assert_array_equal(reference["lm_head.weight"], ours["model.embed_tokens.weight"])
    assert len(ours) == 2 + 9 * 30
    for name, array in ours.items():
        assert type(array) is np.ndarray and array.dtype == np.float32, name
        assert array.shape == reference[name].shape, name
        np.testing.assert_allclose(array, reference[name], rtol=0, atol=1e-6, err_msg=name)


def test_config_agrees_with_transformers_and_the_known_facts(checkpoint, torch_model):
    from transformers import LlamaConfig

    config = checkpoint.config
    for field in CONFIG_FIELDS:
        assert config[field] == getattr(torch_model.config, field), field
    assert "rope_scaling" not in config and torch_model.config.rope_scaling is None
    assert LlamaConfig(**config).to_dict()["rope_theta"] == 100000.0
    # SmolLM2-135M as published: 30 layers, d=576, 9 heads of 64, 3 KV heads, tied embeddings.
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (
        30,
        576,
        1536,
    )
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert (config["head_dim"], config["vocab_size"], config["rope_theta"]) == (64, 49152, 1e5)
    assert config["tie_word_embeddings"] is True
    assert checkpoint.state_dict["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert checkpoint.state_dict["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)


def test_unpermute_inverts_llama_cpp_rotary_interleaving():
    heads, head_dim, cols = 3, 8, 5
    hf = np.arange(heads * head_dim * cols, dtype=np.float32).reshape(heads * head_dim, cols)
    # llama.cpp's converter: per head, interleave the rows of the two rotary halves.
    interleaved = (
        hf.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(heads * head_dim, cols)
    )
    assert not np.array_equal(interleaved, hf)
    np.testing.assert_array_equal(_unpermute_rotary_rows(interleaved, heads), hf)


def test_other_architecture_is_rejected(tmp_path):
    path = tmp_path / "gpt2.gguf"
    write_gguf(path, "gpt2", "gpt2")
    with pytest.raises(ValueError, match="'gpt2' model.*'llama'"):
        read_gguf(path)
