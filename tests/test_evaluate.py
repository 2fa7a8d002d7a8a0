"""Evaluation metrics against an independent computation (PyTorch head, numpy float64 maths)."""

import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models
import torch

from jaxlens.lens import Translators, TunedLens
from jaxlens.losses import layer_metrics
from jaxlens.models import load_model


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("chunk", [5, 4096])
def test_layer_metrics_equal_numpy_on_pytorch_logits(tmp_path, chunk):
    torch_model = tiny_models.build("gptj", seed=21)
    model = load_model(tiny_models.save(torch_model, tmp_path))
    ids = np.random.default_rng(0).integers(0, model.vocab_size, size=(3, 8))
    rng = np.random.default_rng(1)
    num_layers, d = model.num_layers, model.d_model
    translators = Translators(
        kernel_ldd=jnp.asarray(rng.normal(size=(num_layers, d, d)) * 0.1, jnp.float32),
        bias_ld=jnp.asarray(rng.normal(size=(num_layers, d)) * 0.1, jnp.float32),
    )
    hidden = model(ids).hidden_lbtd
    lens = TunedLens(decoder=model.decoder(), translators=translators)
    got = layer_metrics(lens, hidden[:-1], hidden[-1], jnp.asarray(ids), chunk_tokens=chunk)

    with torch.no_grad():
        out = torch_model(torch.tensor(ids), output_hidden_states=True)
        log_p = _log_softmax(out.logits.numpy().astype(np.float64))
        head, norm = torch_model.get_output_embeddings(), tiny_models.final_norm_module(torch_model)
        for layer in range(num_layers):
            h = out.hidden_states[layer]
            moved = h + h @ torch.tensor(np.asarray(translators.kernel_ldd[layer]))
            moved = moved + torch.tensor(np.asarray(translators.bias_ld[layer]))
            log_q = _log_softmax(head(norm(moved)).numpy().astype(np.float64))
            kl = (np.exp(log_p) * (log_p - log_q)).sum(-1).mean()
            ce = -np.take_along_axis(log_q[:, :-1], ids[:, 1:, None], -1).mean()
            entropy = -(np.exp(log_q) * log_q).sum(-1).mean()
            np.testing.assert_allclose(got["kl"][layer], kl, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got["ce"][layer], ce, rtol=1e-5)
            np.testing.assert_allclose(got["entropy"][layer], entropy, rtol=1e-5)
    base_ce = -np.take_along_axis(log_p[:, :-1], ids[:, 1:, None], -1).mean()
    base_entropy = -(np.exp(log_p) * log_p).sum(-1).mean()
    np.testing.assert_allclose(got["baseline_ce"], base_ce, rtol=1e-5)
    np.testing.assert_allclose(got["baseline_entropy"], base_entropy, rtol=1e-5)
