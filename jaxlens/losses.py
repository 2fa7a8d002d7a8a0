"""Per-layer lens losses, computed in token chunks so `[L, tokens, vocab]` never exists.

For layer l with lens logits `z_l = U final_norm(h_l + h_l W_l + b_l) (+ c)` and target
distribution p (the model's own output for `kl`, the next token for `ce`), the loss is
`mean_tokens KL(p || softmax(z_l))` (or cross-entropy), and the training objective is the sum
over layers. Layer l's term depends only on translator l, so one backward pass of the sum gives
each translator exactly the gradient tuned-lens gets from its per-layer backward passes.

The unembedding is the expensive part (`tokens x d x V` per layer). `_soft_cross_entropy` fuses
it with the loss: its forward pass also computes the gradient with respect to the normalised
input, `(softmax(z) - p) U`, while the `[chunk, V]` probabilities are at hand, and keeps only that
`[chunk, d]` array for the backward pass. So each layer costs two `V x d` matmuls per token in
total, and no `[chunk, V]` array outlives its chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxlens.lens import TunedLens


def _logits(x_cd, unembed_vd, bias_v):
    z = jnp.einsum(
        "cd,vd->cv", x_cd.astype(unembed_vd.dtype), unembed_vd, preferred_element_type=jnp.float32
    )
    return z if bias_v is None else z + bias_v.astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _soft_cross_entropy(kind, x_cd, unembed_vd, bias_v, target, weight_c):
    """Weighted sum over the chunk of -sum_v p log softmax(z), z = x U^T + c.

    Args:
      kind: "kl" (target is log p `[c, V]`) or "ce" (target is token ids `[c]`).
      x_cd: normalised lens hidden states, float32 `[c, d]`.
      unembed_vd, bias_v: the model's unembedding `[V, d]` and lm_head bias `[V]` or None.
      target: see `kind`.
      weight_c: per-token weights (0 for padding / dropped positions), float32 `[c]`.
    Returns:
      the scalar weighted cross-entropy (for `kl`, add the target's negative entropy to get KL).
    """
    return _forward(kind, x_cd, unembed_vd, bias_v, target, weight_c)[0]


def _forward(kind, x_cd, unembed_vd, bias_v, target, weight_c):
    log_q = jax.nn.log_softmax(_logits(x_cd, unembed_vd, bias_v))
    q = jnp.exp(log_q)
    if kind == "kl":
        p = jnp.exp(target)
        cross_c = -(p * log_q).sum(-1)
        dz = q - p
    else:
        cross_c = -jnp.take_along_axis(log_q, target[:, None], axis=-1)[:, 0]
        dz = q.at[jnp.arange(q.shape[0]), target].add(-1.0)
    # d(sum_c w_c cross_c)/dx = w_c (q - p) U: computed now, while q is at hand.
    dx_cd = jnp.einsum(
        "cv,vd->cd",
        (dz * weight_c[:, None]).astype(unembed_vd.dtype),
        unembed_vd,
        preferred_element_type=jnp.float32,
    )
    return (cross_c * weight_c).sum(), dx_cd


def _fwd(kind, x_cd, unembed_vd, bias_v, target, weight_c):
    value, dx_cd = _forward(kind, x_cd, unembed_vd, bias_v, target, weight_c)
    return value, dx_cd


def _bwd(kind, residuals, g):
    del kind
    # The model's head, the target and the weights are constants of lens training: no cotangent.
    return (g * residuals, None, None, None, None)


_soft_cross_entropy.defvjp(_fwd, _bwd)


def layer_losses(
    lens: TunedLens,
    h_lbtd: jax.Array,
    h_final_btd: jax.Array,
    input_ids_bt: jax.Array,
    *,
    loss: str = "kl",
    token_shift: int | None = None,
    chunk_tokens: int = 2048,
) -> jax.Array:
    """Mean per-token loss of each layer's lens, `[L]`, in nats.

    Args:
      lens: the tuned lens (translators and the model's decoder).
      h_lbtd: hidden states `[L, b, t, d]` of the lensed layers (the model's `hidden_lbtd[:-1]`).
      h_final_btd: the model's last hidden state `[b, t, d]` (already final-normed); the target
        distribution for `kl` is `softmax(unembed(h_final))`, the model's own output.
      input_ids_bt: token ids `[b, t]` (labels for `ce`).
      loss: "kl" (KL from the model's output to the lens's) or "ce" (cross-entropy to tokens).
      token_shift: label shift; default 0 for kl (same position) and 1 for ce (next token).
      chunk_tokens: tokens per chunk; `[chunk, V]` is the largest array a layer builds.
    Returns:
      `[L]` float32: layer l's loss averaged over the positions that have a label.
    """
    if loss not in ("kl", "ce"):
        raise ValueError(f"loss must be 'kl' or 'ce'; got {loss!r}.")
    shift = (0 if loss == "kl" else 1) if token_shift is None else token_shift
    num_layers, batch, tokens, d = h_lbtd.shape
    if not 0 <= shift < tokens:
        raise ValueError(f"token_shift must be in [0, {tokens}); got {shift}.")
    # Position i of the lens is compared with target position i + shift.
    span = tokens - shift
    h_lnd = h_lbtd[:, :, :span].reshape(num_layers, batch * span, d)
    if loss == "kl":
        target_nd = h_final_btd[:, shift:].reshape(batch * span, d)
    else:
        target_nd = input_ids_bt[:, shift:].reshape(batch * span)
    n = batch * span
    chunk = min(chunk_tokens, n)
    pad = -n % chunk
    weight_n = jnp.concatenate([jnp.ones(n, jnp.float32), jnp.zeros(pad, jnp.float32)])
    h_lnd = jnp.pad(h_lnd, ((0, 0), (0, pad), (0, 0)))
    target_nd = jnp.pad(target_nd, ((0, pad),) + ((0, 0),) * (target_nd.ndim - 1))

    num_chunks = (n + pad) // chunk
    chunks = (
        h_lnd.reshape(num_layers, num_chunks, chunk, d).swapaxes(0, 1),
        target_nd.reshape((num_chunks, chunk) + target_nd.shape[1:]),
        weight_n.reshape(num_chunks, chunk),
    )
    decoder = lens.decoder
    translators = lens.translators

    def one_chunk(total_l, xs):
        h_lcd, target_c, weight_c = xs
        if loss == "kl":
            target_c = jax.lax.stop_gradient(
                jax.nn.log_softmax(decoder.unembed(target_c.astype(jnp.float32)))
            )
            p = jnp.exp(target_c)
            neg_entropy = (weight_c * (p * target_c).sum(-1)).sum()
        else:
            neg_entropy = 0.0

        def one_layer(_, layer_xs):
            kernel_dd, bias_d, h_cd = layer_xs
            moved = h_cd.astype(jnp.float32)
            moved = moved + moved @ kernel_dd
            if bias_d is not None:
                moved = moved + bias_d
            x_cd = decoder.final_norm(moved)
            cross = _soft_cross_entropy(
                loss, x_cd, decoder.unembed_vd, decoder.unembed_bias_v, target_c, weight_c
            )
            return None, cross + neg_entropy

        _, chunk_l = jax.lax.scan(
            one_layer, None, (translators.kernel_ldd, translators.bias_ld, h_lcd)
        )
        return total_l + chunk_l, None

    total_l, _ = jax.lax.scan(one_chunk, jnp.zeros(num_layers, jnp.float32), chunks)
    return total_l / n


def reference_layer_losses(lens, h_lbtd, h_final_btd, input_ids_bt, *, loss="kl", token_shift=None):
    """Plain version for tests: materialises every layer's logits (`[L, b, t, V]`) at once."""
    shift = (0 if loss == "kl" else 1) if token_shift is None else token_shift
    tokens = h_lbtd.shape[2]
    log_q = jax.nn.log_softmax(lens.all_logits(h_lbtd)[:, :, : tokens - shift])
    if loss == "kl":
        log_p = jax.nn.log_softmax(lens.decoder.unembed(h_final_btd[:, shift:]))
        per_token = (jnp.exp(log_p) * (log_p - log_q)).sum(-1)
    else:
        labels = input_ids_bt[:, shift:]
        per_token = -jnp.take_along_axis(log_q, labels[None, ..., None], axis=-1)[..., 0]
    return per_token.mean(axis=(1, 2))
