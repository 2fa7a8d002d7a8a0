"""jaxlens's rotary frequencies against transformers' own `ROPE_INIT_FUNCTIONS` (PyTorch)."""

import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from jaxlens.models import rotary

LONGROPE = {
    "type": "longrope",
    "short_factor": [1.0 + 0.25 * i for i in range(8)],  # one per frequency pair (head_dim 16)
    "long_factor": [3.0 + 2.0 * i for i in range(8)],
}


def _config(scaling, **fields):
    config = transformers.LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        head_dim=16,
        rope_theta=7000.0,
        max_position_embeddings=4096,
        rope_scaling=scaling,
    )
    for key, value in fields.items():
        setattr(config, key, value)
    return config


@pytest.mark.parametrize(
    "scaling,fields,tokens",
    [
        (None, {}, 12),
        ({"rope_type": "linear", "factor": 8.0}, {}, 12),
        (
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 512,
            },
            {},
            12,
        ),
        (LONGROPE, {"original_max_position_embeddings": 1024}, 12),
        (LONGROPE, {"original_max_position_embeddings": 8}, 12),  # past it: the long factors
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}, {}, 12),
        (
            {"rope_type": "yarn", "factor": 16.0, "mscale": 0.7, "mscale_all_dim": 0.5},
            {},
            12,
        ),
        ({"rope_type": "yarn", "factor": 2.0, "beta_fast": 4, "truncate": False}, {}, 12),
    ],
    ids=[
        "default",
        "linear",
        "llama3",
        "longrope-short",
        "longrope-long",
        "yarn",
        "yarn-mscale",
        "yarn-no-truncate",
    ],
)
def test_inverse_frequencies_and_scaling_equal_transformers(scaling, fields, tokens):
    config = _config(scaling, **fields)
    kind = rotary.rope_of(config).kind
    assert kind == ((scaling or {}).get("rope_type") or (scaling or {}).get("type", "default"))
    seq_len = (
        tokens
        if kind != "longrope" or tokens <= config.original_max_position_embeddings
        else (config.original_max_position_embeddings + 1)
    )
    want, want_scaling = ROPE_INIT_FUNCTIONS[kind](config, torch.device("cpu"), seq_len=seq_len)
    got, got_scaling = rotary.inverse_frequencies(rotary.rope_of(config), tokens)
    np.testing.assert_allclose(got, want.numpy(), rtol=2.5e-7, atol=0)  # pow: an ulp or two
    assert got_scaling == pytest.approx(want_scaling, rel=1e-12)


def test_a_scaling_we_do_not_reproduce_is_named():
    config = _config({"rope_type": "dynamic", "factor": 2.0})
    assert rotary.unsupported_scaling(config) == [
        "rope_scaling type 'dynamic' (supported: default, linear, llama3, longrope, yarn)"
    ]
    assert rotary.unsupported_scaling(_config({"rope_type": "yarn", "factor": 2.0})) == []
