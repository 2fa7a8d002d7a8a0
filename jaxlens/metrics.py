"""Evaluation statistics of every layer's lens, computed in token chunks without gradients.

For each layer's lens distribution q (the logit lens: `softmax(decode(h_l))`; the tuned lens:
`softmax(decode(translate(h_l)))`) and the model's own output p: KL(p || q), the cross-entropy
of q against the next token (or the token `token_shift` positions away, as tuned-lens's
evaluation allows) and its entropy, averaged over tokens, plus the model's own cross-entropy and
entropy as a baseline. As in `losses`, `[L, tokens, vocab]` never exists: each chunk's logits are
built one layer at a time. Every statistic is computed from max-shifted logits, so large logits
cost no digits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxlens.decoder import Decoder
from jaxlens.lens import Translators, translate
from jaxlens.losses import pad_to_chunks
from jaxlens.softmax_stats import SoftmaxStats, softmax_stats

# Rows per unembedding matmul where several lenses' rows can share one: a `[rows, d] x [d, V]`
# product this tall runs near the CPU's float32 peak, where one chunk's rows alone may not.
MATMUL_ROWS = 1024


def blocks_per_matmul(count: int, rows_each: int, rows: int = MATMUL_ROWS) -> int:
    """How many of `count` blocks of `rows_each` rows share one unembedding matmul: the largest
    divisor of `count` whose blocks stay within `rows` rows together (at least 1)."""
    fits = max(1, rows // rows_each)
    return max(g for g in range(1, count + 1) if count % g == 0 and g <= fits)


def labelled_positions(tokens: int, token_shift: int) -> int:
    """How many of a sequence's positions have a label `token_shift` positions away (position i's
    label is token i + token_shift); refuses a shift that leaves none."""
    if not -tokens < token_shift < tokens:
        raise ValueError(
            f"token_shift={token_shift} leaves no label in sequences of {tokens} tokens; use a "
            f"shift between {1 - tokens} and {tokens - 1} (1: the next token)."
        )
    return tokens - abs(token_shift)


def _evaluation_chunks(h_lbtd, input_ids_bt, chunk, token_shift):
    """Chunked `(h [k, L, c, d], labels, weights, labelled weights)` for evaluation.

    Every position is kept (KL and entropy use all of them); position i's label is token
    i + token_shift, and where that is outside the sequence the label is a placeholder with
    weight 0 in the labelled weights.
    """
    num_layers, batch, tokens, d = h_lbtd.shape
    n = batch * tokens
    labelled_positions(tokens, token_shift)
    source_t = jnp.arange(tokens) + token_shift
    labelled_t = (source_t >= 0) & (source_t < tokens)
    labels_bt = input_ids_bt[:, jnp.clip(source_t, 0, tokens - 1)]
    labelled_bt = jnp.broadcast_to(labelled_t, (batch, tokens))
    return (
        jax.vmap(lambda h_nd: pad_to_chunks(h_nd, chunk), out_axes=1)(
            h_lbtd.reshape(num_layers, n, d)
        ),
        pad_to_chunks(labels_bt.reshape(n), chunk),
        pad_to_chunks(jnp.ones(n, jnp.float32), chunk),
        pad_to_chunks(labelled_bt.reshape(n).astype(jnp.float32), chunk),
    )


def layer_metrics(
    decoder: Decoder,
    translators: Translators | None,
    h_lbtd: jax.Array,
    h_final_btd: jax.Array,
    input_ids_bt: jax.Array,
    *,
    chunk_tokens: int = 2048,
    token_shift: int = 1,
    marginals: bool = False,
) -> dict[str, jax.Array]:
    """Evaluation metrics of every layer of one lens (`lenses_metrics` of that lens alone).

    Args:
      decoder: the model's final norm and unembedding.
      translators: the tuned lens's bank, or None for the logit lens.
      h_lbtd, h_final_btd, input_ids_bt, chunk_tokens, token_shift, marginals: see
        `lenses_metrics`.
    Returns:
      `{"kl": [L], "ce": [L], "entropy": [L], "baseline_ce": [], "baseline_entropy": []}` (and
      the marginals), as `lenses_metrics` returns for each lens.
    """
    return lenses_metrics(
        decoder,
        (translators,),
        h_lbtd,
        h_final_btd,
        input_ids_bt,
        chunk_tokens=chunk_tokens,
        token_shift=token_shift,
        marginals=marginals,
    )[0]


class _Reference(NamedTuple):
    """The distribution p that lenses' KL(p || q) is taken from, for one chunk `[c, ...]`:
    its softmax statistics and probabilities, and for affine logits (`Decoder.linear_logits`)
    its normalised input as the matmul reads it and `W^T p` `[c, d]`."""

    stats: SoftmaxStats
    p_cv: jax.Array
    input_cd: jax.Array | None
    unembedded_cd: jax.Array | None


def _reference(decoder: Decoder, x_cd: jax.Array, labels_c: jax.Array) -> _Reference:
    """The reference distribution of normalised vectors `x_cd` (see `_Reference`)."""
    z_cv = decoder.unembed(x_cd)
    stats = softmax_stats(z_cv, labels_c)
    p_cv = jnp.exp(stats.log_probs(z_cv))
    if not decoder.linear_logits:
        return _Reference(stats, p_cv, None, None)
    # Training's `losses._target_moments` forms the same `p U` with p rounded to the
    # unembedding's dtype (a gradient tolerates it); a reported KL keeps p in float32.
    unembedded_cd = jnp.einsum(
        "cv,vd->cd", p_cv, decoder.unembed_vd.astype(jnp.float32), precision="highest"
    )
    return _Reference(stats, p_cv, decoder.unembed_input(x_cd), unembedded_cd)


def _stats_and_kl(
    decoder: Decoder,
    x_ncd: jax.Array,
    z_ncv: jax.Array,
    labels_c: jax.Array,
    reference: _Reference,
) -> tuple[SoftmaxStats, jax.Array]:
    """Softmax statistics of `n` lenses' logits `z_ncv = decoder.unembed(x_ncd)` and their
    KL(p || q) `[n, c]` from the reference p.

    When the logits are affine in the normalised vector (`Decoder.linear_logits`), the KL takes
    no pass over the vocabulary of its own: for lens logits z = x W + b and reference logits
    m = x_p W + b, KL(p || q) = lse(z) - lse(m) - sum_v p_v (z_v - m_v), and the last sum is
    `(x - x_p) . (W^T p)`. The bias cancels exactly and the two log-sum-exps are subtracted peak
    from peak, so large logits cost no digits. Other heads (soft-capped) sum p (z - peak).
    """
    if not decoder.linear_logits:
        stats = softmax_stats(z_ncv, labels_c, reference.p_cv)
        return stats, -reference.stats.entropy - stats.cross
    stats = softmax_stats(z_ncv, labels_c)
    moved_nc = jnp.einsum(
        "ncd,cd->nc",
        decoder.unembed_input(x_ncd) - reference.input_cd,
        reference.unembedded_cd,
        precision="highest",
    )
    kl_nc = (
        (stats.peak - reference.stats.peak)
        + (stats.log_total - reference.stats.log_total)
        - moved_nc
    )
    return stats, kl_nc


def lenses_metrics(
    decoder: Decoder,
    lenses: Sequence[Translators | None],
    h_lbtd: jax.Array,
    h_final_btd: jax.Array,
    input_ids_bt: jax.Array,
    *,
    chunk_tokens: int = 2048,
    token_shift: int = 1,
    marginals: bool = False,
) -> tuple[dict[str, jax.Array], ...]:
    """Evaluation metrics of every layer of several lenses from one pass (no gradients).

    Each layer's chunk is decoded for all the lenses in one unembedding matmul (`n` lenses: `n *
    chunk` rows against the same `[V, d]` matrix, which the CPU backend packs once per matmul),
    and they share the model's own distribution, computed once per chunk (with `W^T p` for the
    KL of affine logits, which then takes no pass over the vocabulary: see `_stats_and_kl`).

    Args:
      decoder: the model's final norm and unembedding.
      lenses: for each lens, its translator bank, or None for the logit lens.
      h_lbtd: hidden states `[L, b, t, d]` of the lensed layers (the model's `hidden_lbtd[:-1]`).
      h_final_btd: the model's last hidden state `[b, t, d]` (already final-normed).
      input_ids_bt: token ids `[b, t]`.
      chunk_tokens: tokens per chunk; `[len(lenses) * chunk, V]` is the largest array built.
      token_shift: position i's label is token i + token_shift (1: the next token; 0: the same
        token; -1: the previous one, as tuned-lens's evaluation counts them).
      marginals: also average each layer's lens distribution over tokens (tuned-lens's
        `--record_logit_stats`): one more vector-matrix product per lens and layer (about 5% of
        a SmolLM2 evaluation step on a CPU).
    Returns:
      for each lens, `{"kl": [L], "ce": [L], "entropy": [L], "baseline_ce": [],
      "baseline_entropy": []}` in nats, averaged over tokens: kl is KL(model output || lens) at
      every position, ce the cross-entropy against the labels (the positions that have one),
      entropy the lens distribution's; the baseline entries are the model's own cross-entropy
      and entropy. With `marginals`, also `"marginal": [L, V]` and `"baseline_marginal": [V]`:
      the mean over every position of the lens's and of the model's probabilities.
    """
    num_layers, batch, tokens, d = h_lbtd.shape
    n = batch * tokens
    chunk = min(chunk_tokens, n)
    h_chunks, labels, weights, label_weights = _evaluation_chunks(
        h_lbtd, input_ids_bt, chunk, token_shift
    )
    final = pad_to_chunks(h_final_btd.reshape(n, d), chunk)
    banks = tuple((t.kernel_ldd, t.bias_ld) for t in lenses if t is not None)

    def lensed_ncd(h_cd, banks_xs):
        """Every lens's normalised input of one layer's chunk, stacked `[lenses, c, d]`."""
        rows, banks_left = [], iter(banks_xs)
        for bank in lenses:
            rows.append(h_cd if bank is None else translate(*next(banks_left), h_cd))
        return decoder.final_norm(jnp.stack(rows))

    def one_chunk(totals, xs):
        h_lcd, final_cd, labels_c, weight_c, label_weight_c = xs
        # The model's own distribution p, once per chunk for all layers and lenses.
        model = _reference(decoder, final_cd.astype(jnp.float32), labels_c)

        def one_layer(_, layer_xs):
            h_cd, banks_xs = layer_xs
            x_ncd = lensed_ncd(h_cd, banks_xs)
            z_ncv = decoder.unembed(x_ncd)
            stats, kl_nc = _stats_and_kl(decoder, x_ncd, z_ncv, labels_c, model)
            sums = {
                "lensed_n3": jnp.stack(
                    [kl_nc @ weight_c, stats.ce @ label_weight_c, stats.entropy @ weight_c],
                    axis=-1,
                )
            }
            if marginals:
                # q = e / total with e = exp(z - peak), the array `softmax_stats` already formed
                # (XLA computes it once); one vector-matrix product per lens.
                e_ncv = jnp.exp(z_ncv - stats.peak[..., None])
                w_nc = weight_c * jnp.exp(-stats.log_total)
                sums["lensed_nv"] = jnp.stack(
                    [w_c @ e_cv for w_c, e_cv in zip(w_nc, e_ncv, strict=True)]
                )
            return None, sums

        _, sums = jax.lax.scan(one_layer, None, (h_lcd, banks))  # each `[L, ...]`
        sums["model_2"] = jnp.stack(
            [model.stats.ce @ label_weight_c, model.stats.entropy @ weight_c]
        )
        if marginals:
            sums["model_v"] = weight_c @ model.p_cv
        return jax.tree.map(jnp.add, totals, sums), None

    vocab = decoder.vocab_size
    zeros = {"lensed_n3": (num_layers, len(lenses), 3), "model_2": (2,)}
    if marginals:
        zeros |= {"lensed_nv": (num_layers, len(lenses), vocab), "model_v": (vocab,)}
    totals, _ = jax.lax.scan(
        one_chunk,
        {key: jnp.zeros(shape, jnp.float32) for key, shape in zeros.items()},
        (h_chunks, final, labels, weights, label_weights),
    )
    sums_ln3, base = totals["lensed_n3"], totals["model_2"]
    labelled = batch * labelled_positions(tokens, token_shift)
    per_lens = []
    for i in range(len(lenses)):
        metrics = {
            "kl": sums_ln3[:, i, 0] / n,
            "ce": sums_ln3[:, i, 1] / labelled,
            "entropy": sums_ln3[:, i, 2] / n,
            "baseline_ce": base[0] / labelled,
            "baseline_entropy": base[1] / n,
        }
        if marginals:
            metrics["marginal"] = totals["lensed_nv"][:, i] / n
            metrics["baseline_marginal"] = totals["model_v"] / n
        per_lens.append(metrics)
    return tuple(per_lens)


def transfer_metrics(
    decoder: Decoder,
    translators: Translators,
    h_lbtd: jax.Array,
    input_ids_bt: jax.Array,
    *,
    chunk_tokens: int = 2048,
    token_shift: int = 1,
) -> dict[str, jax.Array]:
    """Layer transfer: translator i applied to layer j's hidden states, for every pair.

    Shows how specific each translator is to its own layer (tuned-lens's `--layer_transfer`).
    Costs L^2 unembeddings per token, against L for `layer_metrics`. For each layer j, its own
    lens distribution is the reference of the KL (as the model's output is in `lenses_metrics`),
    and the translators are applied a few at a time, stacked into one unembedding matmul of about
    `MATMUL_ROWS` rows (`blocks_per_matmul`).

    Returns:
      `{"ce": [L_i, L_j], "kl": [L_i, L_j]}` in nats, averaged over tokens: ce the cross-entropy
      of translator i on layer j against the labels (`token_shift` as in `lenses_metrics`), kl =
      KL(q_jj || q_ij), from layer j's own lens distribution to the transferred one (zero on the
      diagonal).
    """
    num_layers, batch, tokens, d = h_lbtd.shape
    n = batch * tokens
    chunk = min(chunk_tokens, n)
    chunks = _evaluation_chunks(h_lbtd, input_ids_bt, chunk, token_shift)
    group = blocks_per_matmul(num_layers, chunk)
    groups = (
        translators.kernel_ldd.reshape(-1, group, d, d),
        translators.bias_ld.reshape(-1, group, d),
    )
    translate_each = jax.vmap(translate, in_axes=(0, 0, None))

    def one_chunk(totals, xs):
        h_lcd, labels_c, weight_c, label_weight_c = xs

        def one_layer(_, layer_xs):  # layer j: its own distribution, then every translator i
            kernel_dd, bias_d, h_cd = layer_xs
            own = _reference(
                decoder, decoder.final_norm(translate(kernel_dd, bias_d, h_cd)), labels_c
            )

            def translator_group(_, group_xs):  # `group` translators, one matmul
                x_gcd = decoder.final_norm(translate_each(*group_xs, h_cd))
                moved, kl_gc = _stats_and_kl(decoder, x_gcd, decoder.unembed(x_gcd), labels_c, own)
                return None, jnp.stack([moved.ce @ label_weight_c, kl_gc @ weight_c], axis=-1)

            _, sums_ng2 = jax.lax.scan(translator_group, None, groups)
            return None, sums_ng2.reshape(num_layers, 2)

        _, sums_ji2 = jax.lax.scan(
            one_layer, None, (translators.kernel_ldd, translators.bias_ld, h_lcd)
        )
        return totals + sums_ji2, None

    sums_ji2, _ = jax.lax.scan(
        one_chunk, jnp.zeros((num_layers, num_layers, 2), jnp.float32), chunks
    )
    sums_ij2 = sums_ji2.swapaxes(0, 1)
    labelled = batch * labelled_positions(tokens, token_shift)
    return {"ce": sums_ij2[..., 0] / labelled, "kl": sums_ij2[..., 1] / n}
