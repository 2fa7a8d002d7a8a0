"""Reference computations the tests compare jaxlens with: tuned-lens's own PyTorch lens and
loss, and a plain JAX loss that materialises all logits."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from tuned_lens import TunedLens as TorchTunedLens

from jaxlens.lens import TunedLens


def torch_lens(torch_model, translators):
    lens = TorchTunedLens.from_model(torch_model)
    with torch.no_grad():
        for i, translator in enumerate(lens):
            translator.weight.copy_(torch.tensor(np.asarray(translators.kernel_ldd[i]).T))
            translator.bias.copy_(torch.tensor(np.asarray(translators.bias_ld[i])))
    return lens


def torch_kl_losses(torch_model, lens, ids):
    """tuned-lens's KL loss, as its training loop computes it (float32)."""
    with torch.no_grad():  # as tuned-lens: the model is frozen, only the lens has gradients
        output = torch_model(torch.tensor(ids, dtype=torch.long), output_hidden_states=True)
    labels = output.logits.float().log_softmax(dim=-1)
    losses = []
    for i, h in enumerate(output.hidden_states[:-1]):
        logits = lens(h, idx=i)
        losses.append(torch.sum(labels.exp() * (labels - logits.log_softmax(-1)), dim=-1).mean())
    return losses


def reference_layer_losses(
    decoder, translators, h_lbtd, h_final_btd, input_ids_bt, *, loss="kl", token_shift=None
):
    """`losses.layer_losses` written plainly: every layer's logits (`[L, b, t, V]`) at once."""
    lens = TunedLens(decoder=decoder, translators=translators)
    shift = (0 if loss == "kl" else 1) if token_shift is None else token_shift
    tokens = h_lbtd.shape[2]
    log_q = jax.nn.log_softmax(lens.all_logits(h_lbtd)[:, :, : tokens - shift])
    if loss == "kl":
        log_p = jax.nn.log_softmax(decoder.unembed(h_final_btd[:, shift:]))
        per_token = (jnp.exp(log_p) * (log_p - log_q)).sum(-1)
    else:
        labels = input_ids_bt[:, shift:]
        per_token = -jnp.take_along_axis(log_q, labels[None, ..., None], axis=-1)[..., 0]
    return per_token.mean(axis=(1, 2))
