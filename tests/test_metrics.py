"""Evaluation statistics against an independent computation (PyTorch head, float64 numpy)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models
import torch

from jaxlens.metrics import layer_metrics, transfer_metrics
from jaxlens.models import load_model


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _torch_lens_log_probs(torch_model, translators, i, h):
    """float64 log-probabilities of translator i on PyTorch hidden states h, decoded by the
    PyTorch model's own final norm and head (and its soft-cap). Call under `torch.no_grad()`."""
    head, norm = torch_model.get_output_embeddings(), tiny_models.final_norm_module(torch_model)
    cap = torch_model.config.to_dict().get("final_logit_softcapping")
    moved = h + h @ torch.tensor(np.asarray(translators.kernel_ldd[i]))
    moved = moved + torch.tensor(np.asarray(translators.bias_ld[i]))
    z = head(norm(moved)).numpy().astype(np.float64)
    return _log_softmax(z if cap is None else cap * np.tanh(z / cap))


@pytest.mark.parametrize(
    ("family", "lens", "chunk"),
    [("gptj", "tuned", 5), ("gptj", "tuned", 4096), ("gptj", "logit", 5), ("gptj", "logit", 4096)]
    + [("gemma2", "tuned", 5)],
)
def test_layer_metrics_equal_numpy_on_pytorch_logits(tmp_path, family, lens, chunk):
    """The tuned lens, and the logit lens (no bank at all), against float64 numpy maths. GPT-J's
    logits are affine (`x W + b`), so its KL comes from `lenses_metrics`'s shortcut; Gemma-2
    soft-caps them, so its KL is summed over the vocabulary. Marginals: the mean distribution
    over every position (chunks of 5 pad the 24 positions to 25; the padding is weighted out)."""
    torch_model = tiny_models.build(family, seed=21)
    model = load_model(tiny_models.save(torch_model, tmp_path))
    ids = np.random.default_rng(0).integers(0, model.vocab_size, size=(3, 8))
    num_layers = model.num_layers
    translators = tiny_models.random_translators(num_layers, model.d_model, seed=1, scale=0.1)
    if lens == "logit":
        translators = tiny_models.random_translators(num_layers, model.d_model, seed=1, scale=0.0)
    hidden = model(ids).hidden_lbtd
    got = layer_metrics(
        model.decoder(),
        translators if lens == "tuned" else None,
        hidden[:-1],
        hidden[-1],
        jnp.asarray(ids),
        chunk_tokens=chunk,
        marginals=True,
    )

    with torch.no_grad():
        out = torch_model(torch.tensor(ids), output_hidden_states=True)
        log_p = _log_softmax(out.logits.numpy().astype(np.float64))
        for layer in range(num_layers):
            log_q = _torch_lens_log_probs(torch_model, translators, layer, out.hidden_states[layer])
            kl = (np.exp(log_p) * (log_p - log_q)).sum(-1).mean()
            ce = -np.take_along_axis(log_q[:, :-1], ids[:, 1:, None], -1).mean()
            entropy = -(np.exp(log_q) * log_q).sum(-1).mean()
            np.testing.assert_allclose(got["kl"][layer], kl, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got["ce"][layer], ce, rtol=1e-5)
            np.testing.assert_allclose(got["entropy"][layer], entropy, rtol=1e-5)
            marginal = np.exp(log_q).mean((0, 1))  # over every position, as tuned-lens's
            np.testing.assert_allclose(got["marginal"][layer], marginal, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(got["baseline_marginal"], np.exp(log_p).mean((0, 1)), rtol=1e-5)
    base_ce = -np.take_along_axis(log_p[:, :-1], ids[:, 1:, None], -1).mean()
    base_entropy = -(np.exp(log_p) * log_p).sum(-1).mean()
    np.testing.assert_allclose(got["baseline_ce"], base_ce, rtol=1e-5)
    np.testing.assert_allclose(got["baseline_entropy"], base_entropy, rtol=1e-5)


@pytest.mark.parametrize(
    ("family", "shape", "chunk"),
    [("gpt2", (2, 6), 5), ("gpt2", (8, 50), 4096), ("gpt2", (20, 60), 4096), ("gemma2", (2, 6), 5)],
)
def test_layer_transfer_equals_numpy_on_pytorch_logits(tmp_path, family, shape, chunk):
    """GPT-2's affine logits take the KL shortcut, Gemma-2's soft-capped ones the sum. With four
    layers, chunks of 12, 400 and 1,200 tokens decode 4, 2 and 1 translators per matmul."""
    layers = {"n_layer": 4} if family == "gpt2" else {}
    torch_model = tiny_models.build(family, seed=22, **layers)
    model = load_model(tiny_models.save(torch_model, tmp_path))
    ids = np.random.default_rng(0).integers(0, model.vocab_size, size=shape)
    num_layers = model.num_layers
    translators = tiny_models.random_translators(num_layers, model.d_model, seed=1, scale=0.2)
    hidden = model(ids).hidden_lbtd
    got = transfer_metrics(
        model.decoder(), translators, hidden[:-1], jnp.asarray(ids), chunk_tokens=chunk
    )

    with torch.no_grad():
        out = torch_model(torch.tensor(ids), output_hidden_states=True)

        def log_q(i, j):
            return _torch_lens_log_probs(torch_model, translators, i, out.hidden_states[j])

        for j in range(num_layers):
            own = log_q(j, j)
            for i in range(num_layers):
                moved = log_q(i, j)
                ce = -np.take_along_axis(moved[:, :-1], ids[:, 1:, None], -1).mean()
                kl = (np.exp(own) * (own - moved)).sum(-1).mean()
                np.testing.assert_allclose(got["ce"][i, j], ce, rtol=1e-5)
                np.testing.assert_allclose(got["kl"][i, j], kl, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.diag(got["kl"]), 0.0, atol=1e-5)


@pytest.mark.parametrize("shift", [1, 0, 2, -1])
def test_cross_entropies_take_their_labels_token_shift_positions_away(tmp_path, shift):
    """Position i's label is token i + shift, where that is inside the sequence (tuned-lens's
    `--token_shift`); KL and entropy do not depend on it. Layer transfer's diagonal is the lens
    itself."""
    torch_model = tiny_models.build("gptj", seed=24)
    model = load_model(tiny_models.save(torch_model, tmp_path))
    ids = np.random.default_rng(3).integers(0, model.vocab_size, size=(2, 8))
    translators = tiny_models.random_translators(model.num_layers, model.d_model, seed=2)
    hidden = model(ids).hidden_lbtd
    args = (model.decoder(), translators, hidden[:-1], hidden[-1], jnp.asarray(ids))
    got = layer_metrics(*args, chunk_tokens=5, token_shift=shift)
    next_token = layer_metrics(*args, chunk_tokens=5)
    transfer = transfer_metrics(
        model.decoder(), translators, hidden[:-1], jnp.asarray(ids), token_shift=shift
    )

    labelled = slice(max(0, -shift), 8 - max(0, shift))  # positions whose label exists
    labels = ids[:, max(0, shift) : 8 + min(0, shift)]
    with torch.no_grad():
        out = torch_model(torch.tensor(ids), output_hidden_states=True)
        log_p = _log_softmax(out.logits.numpy().astype(np.float64))
        for layer in range(model.num_layers):
            log_q = _torch_lens_log_probs(torch_model, translators, layer, out.hidden_states[layer])
            ce = -np.take_along_axis(log_q[:, labelled], labels[..., None], -1).mean()
            np.testing.assert_allclose(got["ce"][layer], ce, rtol=1e-5)
            np.testing.assert_allclose(transfer["ce"][layer, layer], ce, rtol=1e-5)
    base_ce = -np.take_along_axis(log_p[:, labelled], labels[..., None], -1).mean()
    np.testing.assert_allclose(got["baseline_ce"], base_ce, rtol=1e-5)
    for key in ("kl", "entropy"):
        np.testing.assert_allclose(got[key], next_token[key], rtol=1e-6)
    with pytest.raises(ValueError, match=r"token_shift=8 leaves no label in sequences of 8"):
        layer_metrics(*args, token_shift=8)


def test_metrics_keep_their_digits_when_all_logits_are_large(tmp_path):
    """Adding a constant to every logit changes no distribution, so no metric may move; a
    formula that subtracts two logit-sized numbers (lse - sum q z) would lose ~1e-4 here."""
    torch_model = tiny_models.build("gptj", seed=23)
    model = load_model(tiny_models.save(torch_model, tmp_path))
    ids = np.random.default_rng(2).integers(0, model.vocab_size, size=(2, 8))
    translators = tiny_models.random_translators(model.num_layers, model.d_model, seed=4)
    hidden = model(ids).hidden_lbtd
    decoder = model.decoder()
    shifted = dataclasses.replace(decoder, unembed_bias_v=decoder.unembed_bias_v + 3000.0)
    results = [
        layer_metrics(
            d,
            translators,
            hidden[:-1],
            hidden[-1],
            jnp.asarray(ids),
            chunk_tokens=7,
        )
        for d in (decoder, shifted)
    ]
    for key in results[0]:
        np.testing.assert_allclose(results[1][key], results[0][key], rtol=1e-5, atol=2e-6)
