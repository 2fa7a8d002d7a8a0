"""Per-token statistics of logits `[..., V]`: log-sum-exp, cross-entropy, entropy, the cross term
against another distribution and the label's rank, each from max-shifted logits so that large
logits cost no digits. What evaluation (`metrics`) and the explorer (`serve.cells`) reduce every
lens's logits to.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxlens import precision


class SoftmaxStats(NamedTuple):
    """Per-token facts of logits z `[..., V]`, kept free of large offsets for float32 accuracy:
    `peak = max z`, `log_total = log sum exp(z - peak)` (so lse = peak + log_total and
    `log q = z - peak - log_total`), the cross-entropy `ce` against the labels, the entropy of
    q = softmax(z), and when a distribution p was given, `cross = sum_v p_v log q_v` (minus the
    cross-entropy from p to q); when asked, also the label's `rank` (how many logits exceed the
    label's; int32). Every field has z's leading shape."""

    peak: jax.Array
    log_total: jax.Array
    ce: jax.Array
    entropy: jax.Array
    cross: jax.Array | None
    rank: jax.Array | None = None

    def log_probs(self, z: jax.Array) -> jax.Array:
        """`log softmax(z)` `[..., V]` of the logits these statistics were taken of."""
        # (z - peak) first: exact for logits near the peak, however large they are.
        return (z - self.peak[..., None]) - self.log_total[..., None]


def softmax_stats(
    z: jax.Array, labels: jax.Array, p: jax.Array | None = None, *, rank: bool = False
) -> SoftmaxStats:
    """Per-token statistics of logits `z [..., V]` against labels `[...]` (and a distribution p
    `[..., V]`); labels and p broadcast against z's leading axes (one p for several lenses).
    With `rank`, also the labels' ranks (how many logits exceed the label's).

    Also what `jaxlens.serve` computes its heat map cells with; see `SoftmaxStats` for the fields.
    """
    # Entropy as log_total - sum_v q_v (z_v - peak) rather than lse - sum_v q_v z_v, and the
    # cross term as sum_v p_v (z_v - peak) - log_total: the textbook forms cancel two numbers of
    # the logits' size and lose digits when logits are large.
    # How XLA's CPU backend (YNNPACK) runs this decides its speed, measured in its profiler on
    # SmolLM2's evaluation step (30 layers of [512, 49152] logits):
    # - `z - peak` is written inside each use, never kept as an array: kept, it is fused into the
    #   unembedding matmul, a kernel 1.8x slower than the matmul alone.
    # - Each sum over the vocabulary is a product with a vector of ones. As reductions, the sums
    #   of products become one loop fusion that runs on one core without vectors: 1.6 s of the
    #   step's 8.4 s, against 1.1 s for the elementwise products plus these matrix-vector
    #   products. A rank's count is one more of them (0/1 terms: exact below 2^24).
    peak = jax.lax.stop_gradient(z.max(-1, keepdims=True))
    labels = jnp.broadcast_to(labels, z.shape[:-1])
    label_z = jnp.take_along_axis(z, labels[..., None], axis=-1)
    e = jnp.exp(z - peak)
    terms = [e, e * (z - peak)]
    if p is not None:
        terms.append(jnp.broadcast_to(p, z.shape) * (z - peak))
    if rank:
        terms.append((z > label_z).astype(jnp.float32))
    ones_v = jnp.ones(z.shape[-1], jnp.float32)
    sums = [precision.einsum("...v,v->...", term, ones_v) for term in terms]
    total, e_shifted = sums[0], sums[1]
    log_total = jnp.log(total)
    ce = log_total - (label_z - peak)[..., 0]
    entropy = log_total - e_shifted / total
    cross = None if p is None else sums[2] - log_total
    ranks = sums[-1].astype(jnp.int32) if rank else None
    return SoftmaxStats(peak[..., 0], log_total, ce, entropy, cross, ranks)
