"""Per-token softmax statistics against float64 numpy."""

import jax.numpy as jnp
import numpy as np

from jaxlens.softmax_stats import softmax_stats


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_softmax_stats_match_float64_numpy_and_count_ranks_exactly():
    rng = np.random.default_rng(5)
    z = rng.standard_normal((3, 4, 257)).astype(np.float32) * 4
    z[0, 0, :10] = z[0, 0, 3]  # ties with the label's logit are not counted above it
    labels = rng.integers(0, 257, size=(3, 4))
    labels[0, 0] = 3
    p = np.exp(_log_softmax(rng.standard_normal((4, 257))))  # one p for all three rows
    stats = softmax_stats(jnp.asarray(z), jnp.asarray(labels), jnp.asarray(p), rank=True)
    log_q = _log_softmax(z.astype(np.float64))
    label_z = np.take_along_axis(z, labels[..., None], -1)
    np.testing.assert_array_equal(stats.rank, (z > label_z).sum(-1))
    np.testing.assert_allclose(
        stats.ce, -np.take_along_axis(log_q, labels[..., None], -1)[..., 0], rtol=1e-5
    )
    np.testing.assert_allclose(stats.entropy, -(np.exp(log_q) * log_q).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(stats.cross, (p * log_q).sum(-1), rtol=1e-5)
    assert softmax_stats(jnp.asarray(z), jnp.asarray(labels)).rank is None  # only when asked
