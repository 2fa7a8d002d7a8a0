"""Subject models against PyTorch transformers: same weights, same numbers."""

import json

import numpy as np
import pytest
import tiny_models
import torch

from jaxlens.models import SUPPORTED, load_model
from jaxlens.models.convert import CheckpointMismatchError

TOL = 1e-5


@pytest.fixture(scope="module", params=tiny_models.FAMILIES)
def pair(request, tmp_path_factory):
    """(PyTorch model, jaxlens model loaded from its safetensors) for one family."""
    torch_model = tiny_models.build(request.param)
    directory = tiny_models.save(torch_model, tmp_path_factory.mktemp(request.param))
    return torch_model, load_model(directory)


def _token_ids(vocab, shape=(2, 12), seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=shape)


def test_hidden_states_and_logits_match_pytorch(pair):
    torch_model, model = pair
    ids = _token_ids(model.vocab_size)
    with torch.no_grad():
        expected = torch_model(torch.tensor(ids), output_hidden_states=True)
    got = model(ids)
    assert got.hidden_lbtd.shape == (model.num_layers + 1, 2, 12, model.d_model)
    for layer, want in enumerate(expected.hidden_states):
        np.testing.assert_allclose(
            got.hidden_lbtd[layer], want.numpy(), atol=TOL, rtol=TOL, err_msg=f"layer {layer}"
        )
    np.testing.assert_allclose(got.logits_btv, expected.logits.numpy(), atol=TOL, rtol=TOL)


def test_final_norm_and_unembed_match_pytorch_modules(pair):
    torch_model, model = pair
    h = np.random.default_rng(1).normal(size=(5, model.d_model)).astype(np.float32) * 3
    with torch.no_grad():
        normed = tiny_models.final_norm_module(torch_model)(torch.tensor(h)).numpy()
        logits = torch_model.get_output_embeddings()(torch.tensor(h))
        cap = getattr(torch_model.config, "final_logit_softcapping", None)
        if cap is not None:  # Gemma-2/3's forward caps what lm_head gives, c * tanh(z / c)
            logits = torch.tanh(logits / cap) * cap
        logits = logits.numpy()
    np.testing.assert_allclose(model.final_norm(h), normed, atol=TOL, rtol=TOL)
    np.testing.assert_allclose(model.unembed(h), logits, atol=TOL, rtol=TOL)


def test_facts(pair):
    torch_model, model = pair
    config = torch_model.config
    assert model.num_layers == config.num_hidden_layers == 3
    assert model.d_model == config.hidden_size
    assert model.vocab_size == tiny_models.VOCAB
    expected_positions = None if model.model_type == "bloom" else 64
    assert model.max_positions == expected_positions


@pytest.mark.parametrize(
    "rope_scaling",
    [
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        {"rope_type": "longrope", "short_factor": [1.5] * 8, "long_factor": [4.0] * 8},
    ],
    ids=["yarn", "longrope"],
)
def test_transformers_flax_llama_takes_jaxlens_rope_scalings(rope_scaling, tmp_path):
    """The corrected Flax Llama rotates with jaxlens's rotary module: its scalings (and their
    factor on cos and sin) match PyTorch's."""
    overrides = {"rope_scaling": rope_scaling, "original_max_position_embeddings": 8}
    torch_model = tiny_models.build("llama", seed=2, **overrides)
    model = load_model(tiny_models.save(torch_model, tmp_path))
    ids = _token_ids(model.vocab_size)
    with torch.no_grad():
        want = torch_model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(model(ids).logits_btv, want, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sharded_safetensors_load_like_single_file(family, tmp_path):
    torch_model = tiny_models.build(family, seed=3)
    single = load_model(tiny_models.save(torch_model, tmp_path / "single"))
    sharded_dir = tiny_models.save(torch_model, tmp_path / "sharded", shard_size="20KB")
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    sharded = load_model(sharded_dir)
    ids = _token_ids(single.vocab_size, (1, 7))
    np.testing.assert_array_equal(sharded(ids).logits_btv, single(ids).logits_btv)


def test_flax_msgpack_checkpoint_loads(tmp_path):
    from flax import serialization

    torch_model = tiny_models.build("gptj", seed=4)
    model = load_model(tiny_models.save(torch_model, tmp_path / "pt"))
    flax_dir = tmp_path / "flax"
    flax_dir.mkdir()
    torch_model.config.to_json_file(flax_dir / "config.json")
    params = {k: np.asarray(v) for k, v in _flat(model.params).items()}
    (flax_dir / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(_nest(params)))
    reloaded = load_model(flax_dir)
    ids = _token_ids(model.vocab_size, (1, 5))
    np.testing.assert_array_equal(reloaded(ids).logits_btv, model(ids).logits_btv)


def _flat(tree):
    from flax.traverse_util import flatten_dict

    return flatten_dict(tree)


def _nest(flat):
    from flax.traverse_util import unflatten_dict

    return unflatten_dict(flat)


# Bad input ---------------------------------------------------------------------------------


def test_unsupported_architecture_is_named(tmp_path):
    config = {"model_type": "phi", "hidden_size": 8}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="phi") as error:
        load_model(tmp_path)
    for family in SUPPORTED:
        assert family in str(error.value)


def test_missing_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="No model at"):
        load_model(tmp_path / "nowhere")


def test_directory_without_weights(tmp_path):
    tiny_models.configs()["gpt2"].to_json_file(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="No weights in"):
        load_model(tmp_path)


def test_unreadable_weights(tmp_path):
    tiny_models.configs()["gpt2"].to_json_file(tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="Cannot read .*model.safetensors"):
        load_model(tmp_path)


def test_checkpoint_that_does_not_fit_its_config(tmp_path):
    torch_model = tiny_models.build("llama")
    directory = tiny_models.save(torch_model, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] = 40
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match="mlp.up_proj.weight"):
        load_model(directory)


@pytest.mark.parametrize("bad", [-1, tiny_models.VOCAB])
def test_token_ids_outside_vocabulary(pair, bad):
    _, model = pair
    ids = np.zeros((1, 4), np.int64)
    ids[0, 2] = bad
    with pytest.raises(ValueError, match=r"Token ids must lie in \[0, 97\)"):
        model(ids)


def test_sequence_longer_than_positions(pair):
    _, model = pair
    if model.max_positions is None:
        pytest.skip("ALiBi models have no position limit")
    with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
        model(np.zeros((1, 65), np.int32))
