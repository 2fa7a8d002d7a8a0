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
total, and no `[chunk, V]` array outlives its chunk. The target distribution enters each layer
only through `p U` (`[chunk, d]`, computed once per chunk), so a layer reads no `[chunk, V]`
array but its own logits.

A final logit soft-cap (Gemma-2: `z = c tanh(raw / c)`) is carried exactly: the loss sees the
capped logits, the saved gradient gets the cap's slope `1 - tanh^2`, and the target enters each
layer as the chunk's `[chunk, V]` probabilities, which exist per chunk anyway.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxlens import precision
from jaxlens.decoder import Decoder
from jaxlens.lens import Translators, translate


def _logits(x_cd, unembed_vd, bias_v):
    z = precision.einsum("cd,vd->cv", x_cd.astype(unembed_vd.dtype), unembed_vd)
    return z if bias_v is None else z + bias_v.astype(jnp.float32)


def pad_to_chunks(x_n, chunk):
    """Zero-pads the leading axis to a multiple of `chunk`: `[n, ...] -> [k, chunk, ...]`."""
    pad = -x_n.shape[0] % chunk
    x_n = jnp.pad(x_n, ((0, pad),) + ((0, 0),) * (x_n.ndim - 1))
    return x_n.reshape((-1, chunk) + x_n.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _soft_cross_entropy(kind, cap, x_cd, unembed_vd, bias_v, target, weight_c):
    """Weighted sum over the chunk of -sum_v p log softmax(z), z = cap(x U^T + c).

    Args:
      kind: "kl" (target p is a distribution: `_target_moments` without a cap, the `[c, V]`
        probabilities with one) or "ce" (target is token ids `[c]`).
      cap: the model's final logit soft-cap c (`z = c tanh(raw / c)`, Gemma-2), or None.
      x_cd: normalised lens hidden states, float32 `[c, d]`.
      unembed_vd, bias_v: the model's unembedding `[V, d]` and lm_head bias `[V]` or None.
      target: see `kind`.
      weight_c: per-token weights (0 for padding / dropped positions), float32 `[c]`.
    Returns:
      the scalar weighted cross-entropy (for `kl`, add the target's negative entropy to get KL).
    """
    return _forward(kind, cap, x_cd, unembed_vd, bias_v, target, weight_c)[0]


def _target_moments(p_cv, unembed_vd, bias_v):
    """What every layer needs of a target distribution p `[c, V]`, computed once per chunk:
    `p U` `[c, d]` and `p . c` `[c]` (0 without a bias). Then `sum_v p_v z_v = x . pU + p . c`
    and the gradient's `p U` term need no `[c, V]` pass per layer."""
    p_u_cd = precision.einsum("cv,vd->cd", p_cv.astype(unembed_vd.dtype), unembed_vd)
    p_bias_c = (
        jnp.zeros(p_cv.shape[0])
        if bias_v is None
        else precision.einsum("cv,v->c", p_cv, bias_v.astype(jnp.float32))
    )
    return p_u_cd, p_bias_c


def _times_unembed(g_cv, unembed_vd):
    return precision.einsum("cv,vd->cd", g_cv.astype(unembed_vd.dtype), unembed_vd)


def _forward(kind, cap, x_cd, unembed_vd, bias_v, target, weight_c):
    # With lse = logsumexp(z): -sum_v p log softmax(z) = lse - sum_v p z (as sum_v p = 1), and
    # its gradient in z is softmax(z) - p. Without a cap z is linear in x, so the gradient in x is
    # (e U) / sum(e) - p U with e = exp(z - max z): per layer one exp per logit and two passes
    # over the [c, V] logits besides the two matmuls; the target's terms come from
    # `_target_moments` ([c, d]) or one gathered logit.
    z = _logits(x_cd, unembed_vd, bias_v)
    if cap is not None:
        return _capped_forward(kind, cap, z, unembed_vd, target, weight_c)
    peak = jax.lax.stop_gradient(z.max(-1, keepdims=True))
    e = jnp.exp(z - peak)
    total = e.sum(-1, keepdims=True)
    lse_c = (peak + jnp.log(total))[:, 0]
    q_u_cd = _times_unembed(e, unembed_vd) / total
    if kind == "kl":
        p_u_cd, p_bias_c = target
        cross_c = lse_c - (x_cd * p_u_cd).sum(-1) - p_bias_c
        dx_cd = q_u_cd - p_u_cd
    else:
        cross_c = lse_c - jnp.take_along_axis(z, target[:, None], axis=-1)[:, 0]
        dx_cd = q_u_cd - unembed_vd[target].astype(jnp.float32)
    return (cross_c * weight_c).sum(), dx_cd * weight_c[:, None]


def _capped_forward(kind, cap, raw_cv, unembed_vd, target, weight_c):
    # z = c tanh(raw / c) bends each logit by dz/draw = 1 - tanh^2, so the gradient in x is
    # ((softmax(z) - p) * (1 - tanh^2)) U: still one matmul with U, but p enters per logit (the
    # chunk's p `[c, V]` is the target; no p U shortcut through the nonlinearity). For `ce` the
    # label's term is its row of U times its own 1 - tanh^2, gathered, not a one-hot `[c, V]`.
    tanh_cv = jnp.tanh(raw_cv / cap)
    z = cap * tanh_cv
    slope_cv = 1.0 - tanh_cv**2
    peak = jax.lax.stop_gradient(z.max(-1, keepdims=True))
    e = jnp.exp(z - peak)
    total = e.sum(-1, keepdims=True)
    lse_c = (peak + jnp.log(total))[:, 0]
    if kind == "kl":
        p_cv = target
        cross_c = lse_c - (p_cv * z).sum(-1)
        dx_cd = _times_unembed((e / total - p_cv) * slope_cv, unembed_vd)
    else:
        cross_c = lse_c - jnp.take_along_axis(z, target[:, None], axis=-1)[:, 0]
        label_slope_c = jnp.take_along_axis(slope_cv, target[:, None], axis=-1)
        dx_cd = _times_unembed(e / total * slope_cv, unembed_vd) - label_slope_c * unembed_vd[
            target
        ].astype(jnp.float32)
    return (cross_c * weight_c).sum(), dx_cd * weight_c[:, None]


def _fwd(kind, cap, x_cd, unembed_vd, bias_v, target, weight_c):
    value, dx_cd = _forward(kind, cap, x_cd, unembed_vd, bias_v, target, weight_c)
    return value, dx_cd


def _bwd(kind, cap, residuals, g):
    del kind, cap
    # The model's head, the target and the weights are constants of lens training: no cotangent.
    return (g * residuals, None, None, None, None)


_soft_cross_entropy.defvjp(_fwd, _bwd)


def layer_losses(
    decoder: Decoder,
    translators: Translators,
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
      decoder: the model's final norm and unembedding.
      translators: the bank being trained, one translator per lensed layer.
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
    chunks = (
        jax.vmap(lambda h_nd: pad_to_chunks(h_nd, chunk), out_axes=1)(h_lnd),
        pad_to_chunks(target_nd, chunk),
        pad_to_chunks(jnp.ones(n, jnp.float32), chunk),
    )

    def one_chunk(total_l, xs):
        h_lcd, target_c, weight_c = xs
        if loss == "kl":
            log_p = jax.lax.stop_gradient(
                jax.nn.log_softmax(decoder.unembed(target_c.astype(jnp.float32)))
            )
            p_cv = jnp.exp(log_p)
            neg_entropy = (weight_c * (p_cv * log_p).sum(-1)).sum()
            if decoder.linear_logits:
                target_c = _target_moments(p_cv, decoder.unembed_vd, decoder.unembed_bias_v)
            else:
                target_c = p_cv
        else:
            neg_entropy = 0.0

        def one_layer(_, layer_xs):
            x_cd = decoder.final_norm(translate(*layer_xs))
            cross = _soft_cross_entropy(
                loss,
                decoder.logit_softcap,
                x_cd,
                decoder.unembed_vd,
                decoder.unembed_bias_v,
                target_c,
                weight_c,
            )
            return None, cross + neg_entropy

        _, chunk_l = jax.lax.scan(
            one_layer, None, (translators.kernel_ldd, translators.bias_ld, h_lcd)
        )
        return total_l + chunk_l, None

    total_l, _ = jax.lax.scan(one_chunk, jnp.zeros(num_layers, jnp.float32), chunks)
    return total_l / n
