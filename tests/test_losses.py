"""The chunked lens losses against a plain JAX reference and tuned-lens's own PyTorch loss."""

import jax
import numpy as np
import pytest
import tiny_models
import torch
import torch_reference

from jaxlens.losses import layer_losses
from jaxlens.models import load_model


def _translators(model, seed, scale=0.05):
    return tiny_models.random_translators(model.num_layers, model.d_model, seed=seed, scale=scale)


@pytest.fixture(scope="module")
def gptj(tmp_path_factory):
    """GPT-J: its lm_head has a bias, which enters the fused loss through `p . bias`."""
    torch_model = tiny_models.build("gptj", seed=12)
    model = load_model(tiny_models.save(torch_model, tmp_path_factory.mktemp("gptj")))
    assert model.decoder().unembed_bias_v is not None
    ids = np.random.default_rng(1).integers(0, model.vocab_size, size=(3, 9)).astype(np.int32)
    return torch_model, model, ids


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    """Gemma-2: its final logit soft-cap (c = 1 in the tiny config, so it bends the logits)
    enters the fused loss and its gradient."""
    torch_model = tiny_models.build("gemma2", seed=13)
    model = load_model(tiny_models.save(torch_model, tmp_path_factory.mktemp("gemma2")))
    assert model.decoder().logit_softcap == 1.0
    ids = np.random.default_rng(2).integers(0, model.vocab_size, size=(3, 9)).astype(np.int32)
    return torch_model, model, ids


@pytest.mark.parametrize(
    "family,loss,chunk",
    [
        ("gpt2", "kl", 7),
        ("gpt2", "kl", 4096),
        ("gpt2", "ce", 5),
        ("gptj", "kl", 6),
        ("gptj", "ce", 8),
        ("gemma2", "kl", 7),
        ("gemma2", "ce", 5),
    ],
)
def test_chunked_losses_and_gradients_equal_the_plain_reference(family, loss, chunk, request):
    _, model, ids = request.getfixturevalue(family)
    hidden = model(ids).hidden_lbtd
    decoder = model.decoder()

    def chunked(translators):
        return layer_losses(
            decoder, translators, hidden[:-1], hidden[-1], ids, loss=loss, chunk_tokens=chunk
        )

    def plain(translators):
        return torch_reference.reference_layer_losses(
            decoder, translators, hidden[:-1], hidden[-1], ids, loss=loss
        )

    translators = _translators(model, seed=1)
    np.testing.assert_allclose(chunked(translators), plain(translators), rtol=1e-5, atol=1e-6)
    got = jax.grad(lambda t: chunked(t).sum())(translators)
    want = jax.grad(lambda t: plain(t).sum())(translators)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_layer_losses_equal_tuned_lens_own_computation(gpt2):
    torch_model, model, ids = gpt2
    translators = _translators(model, seed=2)
    hidden = model(ids).hidden_lbtd
    got = layer_losses(model.decoder(), translators, hidden[:-1], hidden[-1], ids)
    with torch.no_grad():
        torch_lens = torch_reference.torch_lens(torch_model, translators)
        want = [x.item() for x in torch_reference.torch_kl_losses(torch_model, torch_lens, ids)]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
