"""Logit lens and tuned lens against hand computations with the PyTorch model's own modules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models
import torch

from jaxlens.lens import LogitLens, TunedLens
from jaxlens.models import load_model


@pytest.fixture(scope="module", params=["gpt2", "gptj", "gemma"])
def pair(request, tmp_path_factory):
    torch_model = tiny_models.build(request.param, seed=7)
    directory = tiny_models.save(torch_model, tmp_path_factory.mktemp(request.param))
    model = load_model(directory)
    ids = np.random.default_rng(0).integers(0, model.vocab_size, size=(2, 9))
    return torch_model, model, model(ids).hidden_lbtd[:-1]


def test_untrained_tuned_lens_is_exactly_the_logit_lens(pair):
    _, model, h_lbtd = pair
    logit_lens = LogitLens(model.decoder())
    tuned = TunedLens.untrained(model.decoder(), model.num_layers)
    assert tuned.translators.kernel_ldd.shape == (model.num_layers, model.d_model, model.d_model)
    np.testing.assert_array_equal(tuned.all_logits(h_lbtd), logit_lens.all_logits(h_lbtd))
    for layer in range(model.num_layers):
        np.testing.assert_array_equal(
            tuned.layer_logits(h_lbtd[layer], layer), logit_lens.layer_logits(h_lbtd[layer], layer)
        )


@pytest.mark.parametrize("bias", [True, False])
def test_tuned_lens_matches_hand_computation_in_pytorch(pair, bias):
    torch_model, model, h_lbtd = pair
    translators = tiny_models.random_translators(
        model.num_layers, model.d_model, bias_scale=1.0, bias=bias
    )
    lens = TunedLens(decoder=model.decoder(), translators=translators)
    got = lens.all_logits(h_lbtd)
    norm = tiny_models.final_norm_module(torch_model)
    head = torch_model.get_output_embeddings()
    for layer in range(model.num_layers):
        h = torch.tensor(np.asarray(h_lbtd[layer]))
        moved = h + h @ torch.tensor(np.asarray(translators.kernel_ldd[layer]))
        if bias:
            moved = moved + torch.tensor(np.asarray(translators.bias_ld[layer]))
        with torch.no_grad():
            want = head(norm(moved)).numpy()
        np.testing.assert_allclose(got[layer], want, atol=1e-5, rtol=1e-5, err_msg=f"{layer}")


def test_all_layers_call_equals_single_layer_calls(pair):
    _, model, h_lbtd = pair
    lens = TunedLens(
        decoder=model.decoder(),
        translators=tiny_models.random_translators(
            model.num_layers, model.d_model, seed=1, bias_scale=1.0
        ),
    )
    all_at_once = lens.all_logits(h_lbtd)
    one_by_one = jax.jit(lens.layer_logits)  # also: a traced layer index works
    for layer in range(model.num_layers):
        np.testing.assert_allclose(
            all_at_once[layer], one_by_one(h_lbtd[layer], jnp.int32(layer)), atol=1e-5, rtol=1e-5
        )


def test_lens_is_a_pytree_and_jit_traces_once(pair):
    _, model, h_lbtd = pair
    traces = []

    @jax.jit
    def decode(lens, h):
        traces.append(1)
        return lens.all_logits(h)

    for seed in range(3):
        lens = TunedLens(
            decoder=model.decoder(),
            translators=tiny_models.random_translators(
                model.num_layers, model.d_model, seed=seed, bias_scale=1.0
            ),
        )
        decode(lens, h_lbtd)
    assert len(traces) == 1


def test_translators_stay_float32_with_a_bfloat16_model(tmp_path):
    directory = tiny_models.save(tiny_models.build("llama"), tmp_path)
    model = load_model(directory, dtype=jnp.bfloat16)
    assert model.decoder().unembed_vd.dtype == jnp.bfloat16
    lens = TunedLens.untrained(model.decoder(), model.num_layers)
    assert lens.translators.kernel_ldd.dtype == jnp.float32
    h_lbtd = model(np.arange(6)[None]).hidden_lbtd[:-1]
    assert h_lbtd.dtype == jnp.bfloat16
    assert lens.all_logits(h_lbtd).dtype == jnp.float32


def test_wrong_number_of_layers_is_refused(pair):
    _, model, h_lbtd = pair
    lens = TunedLens.untrained(model.decoder(), model.num_layers)
    with pytest.raises(ValueError, match="hidden_lbtd\\[:-1\\]"):
        lens.all_logits(jnp.concatenate([h_lbtd, h_lbtd[:1]]))
