"""Evaluation statistics of every layer's lens, computed in token chunks without gradients.

For each layer's lens distribution q (the logit lens: `softmax(decode(h_l))`; the tuned lens:
`softmax(decode(translate(h_l)))`) and the model's own output p: KL(p || q), the next-token
cross-entropy of q and its entropy, averaged over tokens, plus the model's own cross-entropy and
entropy as a baseline. As in `losses`, `[L, tokens, vocab]` never exists: each chunk's logits are
built one layer at a time. Every statistic is computed from max-shifted logits, so large logits
cost no digits.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxlens.decoder import Decoder
from jaxlens.lens import Translators, translate
from jaxlens.losses import pad_to_chunks


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
        jax.vmap(lambda h_nd: pad_to_chunks(h_nd, chunk), out_axes=1)(
            h_lbtd.reshape(num_layers, n, d)
        ),
        pad_to_chunks(next_bt.reshape(n), chunk),
        pad_to_chunks(jnp.ones(n, jnp.float32), chunk),
        pad_to_chunks(has_next_bt.reshape(n).astype(jnp.float32), chunk),
    )


class SoftmaxStats(NamedTuple):
    """Per-token facts of logits z `[c, V]`, kept free of large offsets for float32 accuracy:
    `peak = max z`, `log_total = log sum exp(z - peak)` (so lse = peak + log_total and
    `log q = z - peak - log_total`), next-token cross-entropy `ce`, the entropy of q = softmax(z),
    and, when a distribution p was given, `cross = sum_v p_v log q_v` (minus the cross-entropy
    from p to q)."""

    peak: jax.Array
    log_total: jax.Array
    ce: jax.Array
    entropy: jax.Array
    cross: jax.Array | None

    def log_probs(self, z_cv: jax.Array) -> jax.Array:
        """`log softmax(z)` `[c, V]` of the logits these statistics were taken of."""
        # (z - peak) first: exact for logits near the peak, however large they are.
        return (z_cv - self.peak[:, None]) - self.log_total[:, None]


def _add(a: tuple, b: tuple) -> tuple:
    return tuple(x + y for x, y in zip(a, b, strict=True))


def softmax_stats(
    z_cv: jax.Array, labels_c: jax.Array, p_cv: jax.Array | None = None
) -> SoftmaxStats:
    """Per-token statistics of logits `z_cv [c, V]` against labels `[c]` (and a distribution p).

    Also what `jaxlens.serve` computes its heat map cells with; see `SoftmaxStats` for the fields.
    """
    # Entropy as log_total - sum_v q_v (z_v - peak) rather than lse - sum_v q_v z_v, and the
    # cross term as sum_v p_v (z_v - peak) - log_total: the textbook forms cancel two numbers of
    # the logits' size and lose digits when logits are large. The sums over the vocabulary are
    # one variadic reduction, so the `[c, V]` block is read once after its max, not once per sum.
    # `z - peak` is written inside each use, never kept as an array: XLA's CPU backend (YNNPACK)
    # then runs the unembedding matmul on its own instead of fusing it with the max and the
    # subtraction into one kernel that is 1.8x slower (measured: 65 against 115 GFLOP/s).
    peak_c1 = jax.lax.stop_gradient(z_cv.max(-1, keepdims=True))
    e = jnp.exp(z_cv - peak_c1)
    operands = (e, e * (z_cv - peak_c1)) + (() if p_cv is None else (p_cv * (z_cv - peak_c1),))
    sums = jax.lax.reduce(operands, (jnp.float32(0),) * len(operands), _add, (1,))
    total, e_shifted = sums[0], sums[1]
    log_total = jnp.log(total)
    label_c = jnp.take_along_axis(z_cv, labels_c[:, None], axis=-1)[:, 0] - peak_c1[:, 0]
    ce = log_total - label_c
    entropy = log_total - e_shifted / total
    cross = None if p_cv is None else sums[2] - log_total
    return SoftmaxStats(peak_c1[:, 0], log_total, ce, entropy, cross)


def _lensed(decoder: Decoder, translators: Translators | None):
    """`logits(layer_xs)` of one layer's chunk, and what to scan over besides the hidden states:
    the logit lens decodes the hidden states as they are, with no bank to scan."""
    if translators is None:
        return (lambda xs: decoder(xs[0])), ()
    return (lambda xs: decoder(translate(*xs[1:], xs[0]))), (
        translators.kernel_ldd,
        translators.bias_ld,
    )


def layer_metrics(
    decoder: Decoder,
    translators: Translators | None,
    h_lbtd: jax.Array,
    h_final_btd: jax.Array,
    input_ids_bt: jax.Array,
    *,
    chunk_tokens: int = 2048,
) -> dict[str, jax.Array]:
    """Evaluation metrics of every layer from one pass over its logits (no gradients).

    Args:
      decoder: the model's final norm and unembedding.
      translators: the tuned lens's bank, or None for the logit lens.
      h_lbtd: hidden states `[L, b, t, d]` of the lensed layers (the model's `hidden_lbtd[:-1]`).
      h_final_btd: the model's last hidden state `[b, t, d]` (already final-normed).
      input_ids_bt: token ids `[b, t]`; position i's label is token i + 1.
      chunk_tokens: tokens per chunk; `[chunk, V]` is the largest array a layer builds.
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
    final = pad_to_chunks(h_final_btd.reshape(n, d), chunk)
    chunks = (h_chunks, final, labels, weights, next_weights)
    logits, bank = _lensed(decoder, translators)

    def one_chunk(totals, xs):
        h_lcd, final_cd, labels_c, weight_c, next_weight_c = xs
        model_z_cv = decoder.unembed(final_cd.astype(jnp.float32))
        model_stats = softmax_stats(model_z_cv, labels_c)
        # The model's own distribution p, once per chunk for all layers.
        p = jnp.exp(model_stats.log_probs(model_z_cv))
        neg_entropy_c = -model_stats.entropy

        def one_layer(_, layer_xs):
            lens_stats = softmax_stats(logits(layer_xs), labels_c, p)
            kl = neg_entropy_c - lens_stats.cross
            return None, jnp.stack(
                [
                    (kl * weight_c).sum(),
                    (lens_stats.ce * next_weight_c).sum(),
                    (lens_stats.entropy * weight_c).sum(),
                ]
            )

        _, sums_l3 = jax.lax.scan(one_layer, None, (h_lcd, *bank))
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
    decoder: Decoder,
    translators: Translators,
    h_lbtd: jax.Array,
    input_ids_bt: jax.Array,
    *,
    chunk_tokens: int = 2048,
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

    def one_chunk(totals, xs):
        h_lcd, labels_c, weight_c, next_weight_c = xs

        def one_layer(_, layer_xs):  # layer j: its own distribution, then every translator i
            kernel_dd, bias_d, h_cd = layer_xs
            own_z_cv = decoder(translate(kernel_dd, bias_d, h_cd))
            own = softmax_stats(own_z_cv, labels_c)
            p = jnp.exp(own.log_probs(own_z_cv))
            neg_entropy_c = -own.entropy

            def one_translator(_, translator_xs):
                moved = softmax_stats(decoder(translate(*translator_xs, h_cd)), labels_c, p)
                kl = neg_entropy_c - moved.cross
                return None, jnp.stack([(moved.ce * next_weight_c).sum(), (kl * weight_c).sum()])

            _, sums_i2 = jax.lax.scan(
                one_translator, None, (translators.kernel_ldd, translators.bias_ld)
            )
            return None, sums_i2

        _, sums_ji2 = jax.lax.scan(
            one_layer, None, (translators.kernel_ldd, translators.bias_ld, h_lcd)
        )
        return totals + sums_ji2, None

    sums_ji2, _ = jax.lax.scan(
        one_chunk, jnp.zeros((num_layers, num_layers, 2), jnp.float32), chunks
    )
    sums_ij2 = sums_ji2.swapaxes(0, 1)
    return {"ce": sums_ij2[..., 0] / (batch * (tokens - 1)), "kl": sums_ij2[..., 1] / n}
