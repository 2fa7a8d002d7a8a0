"""Every cell of the explorer's heat map from one jitted call: the model forward, then each layer's
lens distribution reduced to a handful of numbers on the device.

A cell is one (layer, position). For the page we never need the `[L + 1, T, V]` log-probabilities
on the host (at 64 tokens of SmolLM2 they are 390 MB), only per cell: the entropy, the next-token
cross-entropy, KL(model output || lens), the rank of the next token, the top probability, and the
top-k tokens with their probabilities. `lens_cells` computes them a few layers at a time in a
`lax.scan` (`metrics.blocks_per_matmul`: about `metrics.MATMUL_ROWS` rows of `[rows, V]` logits
at once) with the library's own pieces: the lens's translators and decoder, and
`softmax_stats`. The model's own output is the last row, as in
`trajectory_lib.PredictionTrajectory`, whose float64 host statistics these match.

The logit lens is passed as an untrained `TunedLens` (zero translators: exactly the logit lens,
see `lens.py`), so both lenses share one compiled program per sequence length. Callers pad the
token ids to a few fixed lengths (`explorer.bucket_length`): in a causal model no position sees
the padding after it, so the cells of the real tokens are unchanged and one program serves every
text up to its length.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxlens.lens import TunedLens
from jaxlens.metrics import blocks_per_matmul
from jaxlens.softmax_stats import softmax_stats

TOP_K_BLOCK = 128  # vocabulary entries per block in the exact two-stage top-k below


class Cells(NamedTuple):
    """Per-cell numbers of one lens on one sequence; row l < L is layer l, row L the output.

    Attributes:
      entropy_lt, cross_entropy_lt, forward_kl_lt: `[L + 1, T]` float32, in nats.
      rank_lt: `[L + 1, T]` int32, how many tokens are more probable than the next token.
      max_probability_lt: `[L + 1, T]` float32.
      top_ids_ltk, top_probs_ltk: `[L + 1, T, k]` the k most probable tokens, best first.
    """

    entropy_lt: jax.Array
    cross_entropy_lt: jax.Array
    forward_kl_lt: jax.Array
    rank_lt: jax.Array
    max_probability_lt: jax.Array
    top_ids_ltk: jax.Array
    top_probs_ltk: jax.Array


def top_k(z_tv: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k largest entries of each row, exactly, without sorting the whole vocabulary.

    `lax.top_k` over 49k entries is a sort on a CPU. Instead: the maximum of each block of
    `TOP_K_BLOCK` entries, the k best blocks, then the top k of those k blocks. Exact, because each
    of the k best entries lies in a block whose maximum is at least that entry, and at most k
    blocks can hold them.

    Args:
      z_tv: `[T, V]` scores.
      k: how many, at most V.
    Returns:
      values `[T, k]` and their indices `[T, k]` (int32), largest first.
    """
    tokens, vocab = z_tv.shape
    blocks = -(-vocab // TOP_K_BLOCK)
    padded = jnp.pad(z_tv, ((0, 0), (0, blocks * TOP_K_BLOCK - vocab)), constant_values=-jnp.inf)
    z_tnc = padded.reshape(tokens, blocks, TOP_K_BLOCK)
    _, best_blocks_tk = jax.lax.top_k(z_tnc.max(-1), min(k, blocks))
    candidates = jnp.take_along_axis(z_tnc, best_blocks_tk[..., None], axis=1)
    values, within = jax.lax.top_k(candidates.reshape(tokens, -1), k)
    ids = (
        jnp.take_along_axis(best_blocks_tk, within // TOP_K_BLOCK, axis=1) * TOP_K_BLOCK
        + within % TOP_K_BLOCK
    )
    return values, ids.astype(jnp.int32)


def _cell_numbers(z_gtv, targets_t, p_tv, neg_entropy_p_t, k):
    """The `Cells` fields of rows of logits `[g, T, V]` (KL against the model's p `[T, V]`)."""
    stats = softmax_stats(z_gtv, targets_t, p_tv, rank=True)
    top_values, top_ids = top_k(z_gtv.reshape(-1, z_gtv.shape[-1]), k)
    rows = z_gtv.shape[:-1] + (k,)
    top_values_gtk, top_ids_gtk = top_values.reshape(rows), top_ids.reshape(rows)
    return (
        stats.entropy,
        stats.ce,
        # KL >= 0; rounding leaves the output row's KL to itself a hair below zero.
        jnp.maximum(neg_entropy_p_t - stats.cross, 0.0),
        stats.rank,
        jnp.exp(-stats.log_total),  # the top token's logit is the peak
        top_ids_gtk,
        jnp.exp((top_values_gtk - stats.peak[..., None]) - stats.log_total[..., None]),
    )


@functools.partial(jax.jit, static_argnames=("apply", "k"))
def lens_cells(apply, params, lens: TunedLens, ids_bt: jax.Array, *, k: int) -> Cells:
    """All cells of one sequence under one lens, in one compiled call.

    Args:
      apply: the model's pure forward, `SubjectModel.apply` (static: one program per model).
      params: the model's parameters.
      lens: a `TunedLens` for the model (an untrained one is the logit lens).
      ids_bt: `[1, T]` int32 token ids; position t's target is token t + 1 (the last position's
        target is a placeholder, token 0: its cross-entropy and rank mean nothing).
      k: how many top tokens per cell.
    Returns:
      `Cells` with `[L + 1, T]` and `[L + 1, T, k]` arrays.
    """
    out = apply(params, ids_bt)
    h_ltd = out.hidden_lbtd[:-1, 0]
    targets_t = jnp.append(ids_bt[0, 1:], 0)
    model_z_tv = out.logits_btv[0].astype(jnp.float32)
    model = softmax_stats(model_z_tv, targets_t)
    p_tv = jnp.exp(model.log_probs(model_z_tv))  # the model's own distribution
    neg_entropy_p_t = -model.entropy

    def layer_group(_, group_xs):  # g layers, decoded by one [g * T, d] x [d, V] matmul
        h_gtd, layers_g = group_xs
        z_gtv = lens.decoder(jax.vmap(lens.transform_hidden)(h_gtd, layers_g))
        return None, _cell_numbers(z_gtv, targets_t, p_tv, neg_entropy_p_t, k)

    num_layers, tokens, d = h_ltd.shape
    # Layers are decoded a few at a time: one layer of a 64-token text is only 64 rows.
    g = blocks_per_matmul(num_layers, tokens)
    layers_ng = jnp.arange(num_layers).reshape(-1, g)
    _, rows = jax.lax.scan(layer_group, None, (h_ltd.reshape(-1, g, tokens, d), layers_ng))
    output_row = _cell_numbers(model_z_tv[None], targets_t, p_tv, neg_entropy_p_t, k)
    return Cells(
        *(
            jnp.concatenate([r.reshape((num_layers,) + r.shape[2:]), o])
            for r, o in zip(rows, output_row, strict=True)
        )
    )
