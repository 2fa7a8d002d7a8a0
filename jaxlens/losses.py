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
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxlens.lens import TunedLens, translate


def _logits(x_cd, unembed_vd, bias_v):
    z = jnp.einsum(
        "cd,vd->cv", x_cd.astype(unembed_vd.dtype), unembed_vd, preferred_element_type=jnp.float32
    )
    return z if bias_v is None else z + bias_v.astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _soft_cross_entropy(kind, x_cd, unembed_vd, bias_v, target, weight_c):
    """Weighted sum over the chunk of -sum_v p log softmax(z), z = x U^T + c.

    Args:
      kind: "kl" (target p is a distribution, given as `_target_moments`) or "ce" (target is
        token ids `[c]`).
      x_cd: normalised lens hidden states, float32 `[c, d]`.
      unembed_vd, bias_v: the model's unembedding `[V, d]` and lm_head bias `[V]` or None.
      target: see `kind`.
      weight_c: per-token weights (0 for padding / dropped positions), float32 `[c]`.
    Returns:
      the scalar weighted cross-entropy (for `kl`, add the target's negative entropy to get KL).
    """
    return _forward(kind, x_cd, unembed_vd, bias_v, target, weight_c)[0]


def _target_moments(p_cv, unembed_vd, bias_v):
    """What every layer needs of a target distribution p `[c, V]`, computed once per chunk:
    `p U` `[c, d]` and `p . c` `[c]` (0 without a bias). Then `sum_v p_v z_v = x . pU + p . c`
    and the gradient's `p U` term need no `[c, V]` pass per layer."""
    p_u_cd = jnp.einsum(
        "cv,vd->cd", p_cv.astype(unembed_vd.dtype), unembed_vd, preferred_element_type=jnp.float32
    )
    p_bias_c = jnp.zeros(p_cv.shape[0]) if bias_v is None else p_cv @ bias_v.astype(jnp.float32)
    return p_u_cd, p_bias_c


def _forward(kind, x_cd, unembed_vd, bias_v, target, weight_c):
    # With lse = logsumexp(z): -sum_v p log softmax(z) = lse - sum_v p z (as sum_v p = 1), and
    # its gradient in x is (softmax(z) - p) U = (e U) / sum(e) - p U with e = exp(z - max z).
    # Per layer that is one exp per logit and two passes over the [c, V] logits besides the two
    # matmuls; the target's terms come from `_target_moments` ([c, d]) or one gathered logit.
    z = _logits(x_cd, unembed_vd, bias_v)
    peak = jax.lax.stop_gradient(z.max(-1, keepdims=True))
    e = jnp.exp(z - peak)
    total = e.sum(-1, keepdims=True)
    lse_c = (peak + jnp.log(total))[:, 0]
    q_u_cd = (
        jnp.einsum(
            "cv,vd->cd", e.astype(unembed_vd.dtype), unembed_vd, preferred_element_type=jnp.float32
        )
        / total
    )
    if kind == "kl":
        p_u_cd, p_bias_c = target
        cross_c = lse_c - (x_cd * p_u_cd).sum(-1) - p_bias_c
        dx_cd = q_u_cd - p_u_cd
    else:
        cross_c = lse_c - jnp.take_along_axis(z, target[:, None], axis=-1)[:, 0]
        dx_cd = q_u_cd - unembed_vd[target].astype(jnp.float32)
    return (cross_c * weight_c).sum(), dx_cd * weight_c[:, None]


def _fwd(kind, x_cd, unembed_vd, bias_v, target, weight_c):
    value, dx_cd = _forward(kind, x_cd, unembed_vd, bias_v, target, weight_c)
    return value, dx_cd


def _bwd(kind, residuals, g):
    del kind
    # The model's head, the target and the weights are constants of lens training: no cotangent.
    return (g * residuals, None, None, None, None)


_soft_cross_entropy.defvjp(_fwd, _bwd)


def _pad_to_chunks(x_n, chunk):
    """Zero-pads the leading axis to a multiple of `chunk`: `[n, ...] -> [k, chunk, ...]`."""
    pad = -x_n.shape[0] % chunk
    x_n = jnp.pad(x_n, ((0, pad),) + ((0, 0),) * (x_n.ndim - 1))
    return x_n.reshape((-1, chunk) + x_n.shape[1:])


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
    chunks = (
        jax.vmap(lambda h_nd: _pad_to_chunks(h_nd, chunk), out_axes=1)(h_lnd),
        _pad_to_chunks(target_nd, chunk),
        _pad_to_chunks(jnp.ones(n, jnp.float32), chunk),
    )
    decoder = lens.decoder
    translators = lens.translators

    def one_chunk(total_l, xs):
        h_lcd, target_c, weight_c = xs
        if loss == "kl":
            log_p = jax.lax.stop_gradient(
                jax.nn.log_softmax(decoder.unembed(target_c.astype(jnp.float32)))
            )
            p_cv = jnp.exp(log_p)
            neg_entropy = (weight_c * (p_cv * log_p).sum(-1)).sum()
            target_c = _target_moments(p_cv, decoder.unembed_vd, decoder.unembed_bias_v)
        else:
            neg_entropy = 0.0

        def one_layer(_, layer_xs):
            x_cd = decoder.final_norm(translate(*layer_xs))
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


def _evaluation_chunks(h_lbtd, input_ids_bt, chunk):
    """Chunked `(h [k, L, c, d], next-token labels, weights, has-next weights)` for evaluation.

    Every position is kept (KL and entropy use all of them); the next-token label of the last
    position is a placeholder with weight 0 in the has-next weights.
    """
    num_layers, batch, tokens, d = h_lbtd.shape
    n = batch * tokens
    next_bt = jnp.concatenate([input_ids_bt[:, 1:], input_ids_bt[:, :1]], axis=1)
    has_next_bt = jnp.broadcast_to(jnp.arange(tokens) < tokens - 1, (batch, tokens))
    return (
        jax.vmap(lambda h_nd: _pad_to_chunks(h_nd, chunk), out_axes=1)(
            h_lbtd.reshape(num_layers, n, d)
        ),
        _pad_to_chunks(next_bt.reshape(n), chunk),
        _pad_to_chunks(jnp.ones(n, jnp.float32), chunk),
        _pad_to_chunks(has_next_bt.reshape(n).astype(jnp.float32), chunk),
    )


class _Stats(NamedTuple):
    """Per-token facts of logits z `[c, V]`, kept free of large offsets for float32 accuracy:
    `shifted = z - max z`, `log_total = log sum exp(shifted)` (so lse = max z + log_total),
    next-token cross-entropy `ce` and the entropy of softmax(z)."""

    shifted: jax.Array
    log_total: jax.Array
    ce: jax.Array
    entropy: jax.Array


def _softmax_stats(z_cv: jax.Array, labels_c: jax.Array) -> _Stats:
    # Entropy as log_total - sum_v q_v shifted_v rather than lse - sum_v q_v z_v: the latter
    # cancels two numbers of the logits' size and loses digits when logits are large.
    shifted = z_cv - jax.lax.stop_gradient(z_cv.max(-1, keepdims=True))
    e = jnp.exp(shifted)
    total = e.sum(-1)
    log_total = jnp.log(total)
    ce = log_total - jnp.take_along_axis(shifted, labels_c[:, None], axis=-1)[:, 0]
    entropy = log_total - (e * shifted).sum(-1) / total
    return _Stats(shifted, log_total, ce, entropy)


def _cross_term(p_cv: jax.Array, stats: _Stats) -> jax.Array:
    """sum_v p_v log q_v for the distribution q the stats describe (-cross-entropy from p)."""
    return (p_cv * stats.shifted).sum(-1) - stats.log_total


def layer_metrics(
    lens: TunedLens,
    h_lbtd: jax.Array,
    h_final_btd: jax.Array,
    input_ids_bt: jax.Array,
    *,
    chunk_tokens: int = 2048,
) -> dict[str, jax.Array]:
    """Evaluation metrics of every layer from one pass over its logits (no gradients).

    Args: as `layer_losses`.
    Returns:
      `{"kl": [L], "ce": [L], "entropy": [L], "baseline_ce": [], "baseline_entropy": []}` in nats,
      averaged over tokens: kl is KL(model output || lens) at every position, ce the next-token
      cross-entropy (all positions but the last), entropy the lens distribution's; the baseline
      entries are the model's own cross-entropy and entropy.
    """
    num_layers, batch, tokens, d = h_lbtd.shape
    n = batch * tokens
    chunk = min(chunk_tokens, n)
    h_chunks, labels, weights, next_weights = _evaluation_chunks(h_lbtd, input_ids_bt, chunk)
    final = _pad_to_chunks(h_final_btd.reshape(n, d), chunk)
    chunks = (h_chunks, final, labels, weights, next_weights)
    decoder, translators = lens.decoder, lens.translators

    def one_chunk(totals, xs):
        h_lcd, final_cd, labels_c, weight_c, next_weight_c = xs
        model_stats = _softmax_stats(decoder.unembed(final_cd.astype(jnp.float32)), labels_c)
        # The model's own distribution p, once per chunk for all layers.
        p = jnp.exp(model_stats.shifted - model_stats.log_total[:, None])
        neg_entropy_c = -model_stats.entropy

        def one_layer(_, layer_xs):
            lens_stats = _softmax_stats(decoder(translate(*layer_xs)), labels_c)
            kl = neg_entropy_c - _cross_term(p, lens_stats)
            return None, jnp.stack(
                [
                    (kl * weight_c).sum(),
                    (lens_stats.ce * next_weight_c).sum(),
                    (lens_stats.entropy * weight_c).sum(),
                ]
            )

        _, sums_l3 = jax.lax.scan(
            one_layer, None, (translators.kernel_ldd, translators.bias_ld, h_lcd)
        )
        base = jnp.stack(
            [(model_stats.ce * next_weight_c).sum(), (model_stats.entropy * weight_c).sum()]
        )
        return jax.tree.map(jnp.add, totals, (sums_l3, base)), None

    zeros = (jnp.zeros((num_layers, 3), jnp.float32), jnp.zeros(2, jnp.float32))
    (sums_l3, base), _ = jax.lax.scan(one_chunk, zeros, chunks)
    with_next = batch * (tokens - 1)
    return {
        "kl": sums_l3[:, 0] / n,
        "ce": sums_l3[:, 1] / with_next,
        "entropy": sums_l3[:, 2] / n,
        "baseline_ce": base[0] / with_next,
        "baseline_entropy": base[1] / n,
    }


def transfer_metrics(
    lens: TunedLens, h_lbtd: jax.Array, input_ids_bt: jax.Array, *, chunk_tokens: int = 2048
) -> dict[str, jax.Array]:
    """Layer transfer: translator i applied to layer j's hidden states, for every pair.

    Shows how specific each translator is to its own layer (tuned-lens's `--layer_transfer`).
    Costs L^2 unembeddings per token, against L for `layer_metrics`.

    Returns:
      `{"ce": [L_i, L_j], "kl": [L_i, L_j]}` in nats, averaged over tokens: ce the next-token
      cross-entropy of translator i on layer j, kl = KL(q_jj || q_ij), from layer j's own lens
      distribution to the transferred one (zero on the diagonal).
    """
    num_layers, batch, tokens, d = h_lbtd.shape
    n = batch * tokens
    chunks = _evaluation_chunks(h_lbtd, input_ids_bt, min(chunk_tokens, n))
    decoder, bank = lens.decoder, lens.translators

    def one_chunk(totals, xs):
        h_lcd, labels_c, weight_c, next_weight_c = xs

        def one_layer(_, layer_xs):  # layer j: its own distribution, then every translator i
            kernel_dd, bias_d, h_cd = layer_xs
            own = _softmax_stats(decoder(translate(kernel_dd, bias_d, h_cd)), labels_c)
            p = jnp.exp(own.shifted - own.log_total[:, None])
            neg_entropy_c = -own.entropy

            def one_translator(_, translator_xs):
                moved = _softmax_stats(decoder(translate(*translator_xs, h_cd)), labels_c)
                kl = neg_entropy_c - _cross_term(p, moved)
                return None, jnp.stack([(moved.ce * next_weight_c).sum(), (kl * weight_c).sum()])

            _, sums_i2 = jax.lax.scan(one_translator, None, (bank.kernel_ldd, bank.bias_ld))
            return None, sums_i2

        _, sums_ji2 = jax.lax.scan(one_layer, None, (bank.kernel_ldd, bank.bias_ld, h_lcd))
        return totals + sums_ji2, None

    sums_ji2, _ = jax.lax.scan(
        one_chunk, jnp.zeros((num_layers, num_layers, 2), jnp.float32), chunks
    )
    sums_ij2 = sums_ji2.swapaxes(0, 1)
    return {"ce": sums_ij2[..., 0] / (batch * (tokens - 1)), "kl": sums_ij2[..., 1] / n}
