"""The explorer's cells against the library's own float64 trajectory, and its exact top-k."""

import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models

from jaxlens.lens import LogitLens, TunedLens
from jaxlens.models import load_model
from jaxlens.serve.cells import lens_cells, top_k
from jaxlens.trajectory_lib import PredictionTrajectory

T = 11


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny GPT-2 (vocabulary 97: not a multiple of the top-k block), a random tuned lens."""
    model = load_model(
        tiny_models.save(tiny_models.build("gpt2", seed=5), tmp_path_factory.mktemp("m"))
    )
    translators = tiny_models.random_translators(model.num_layers, model.d_model, bias_scale=1.0)
    ids = np.random.default_rng(1).integers(0, model.vocab_size, size=T).astype(np.int32)
    return model, TunedLens(decoder=model.decoder(), translators=translators), ids


@pytest.mark.parametrize("vocab", [97, 128, 1000])
def test_top_k_is_exact(vocab):
    z = np.random.default_rng(vocab).normal(size=(7, vocab)).astype(np.float32)
    z[0, :] = 0.0  # ties everywhere: the values must still be the largest
    values, ids = (np.asarray(a) for a in top_k(jnp.asarray(z), 5))
    expected = -np.sort(-z, axis=-1)[:, :5]
    np.testing.assert_array_equal(values, expected)
    np.testing.assert_array_equal(np.take_along_axis(z, ids, -1), expected)
    np.testing.assert_array_equal(ids[1:], np.argsort(-z[1:], axis=-1, kind="stable")[:, :5])


@pytest.mark.parametrize("kind", ["logit", "tuned"])
def test_cells_match_the_trajectory(tiny, kind):
    model, tuned, ids = tiny
    lens = tuned if kind == "tuned" else TunedLens.untrained(model.decoder(), model.num_layers)
    reference_lens = tuned if kind == "tuned" else LogitLens(model.decoder())
    reference = PredictionTrajectory.from_lens(reference_lens, model, ids)
    cells = lens_cells(model.apply, model.params, lens, ids[None], k=4)
    # float32 on the device against float64 on the host, logits of size ~10: 1e-4 absolute.
    for name in ("entropy", "forward_kl", "max_probability"):
        expected = getattr(reference, name)().values_lt
        np.testing.assert_allclose(getattr(cells, f"{name}_lt"), expected, atol=1e-4, err_msg=name)
    has_next = slice(0, T - 1)
    np.testing.assert_allclose(
        np.asarray(cells.cross_entropy_lt)[:, has_next],
        reference.cross_entropy().values_lt[:, has_next],
        atol=1e-4,
    )
    np.testing.assert_array_equal(
        np.asarray(cells.rank_lt)[:, has_next], reference.rank().values_lt[:, has_next]
    )
    ref_ids, ref_probs = reference.top_k(4)
    np.testing.assert_array_equal(cells.top_ids_ltk, ref_ids)
    np.testing.assert_allclose(cells.top_probs_ltk, ref_probs, atol=1e-5)


def test_padding_after_the_text_changes_no_cell(tiny):
    model, tuned, ids = tiny
    alone = lens_cells(model.apply, model.params, tuned, ids[None], k=3)
    padded_ids = np.concatenate([ids, np.random.default_rng(2).integers(0, 97, 16 - T)])
    padded = lens_cells(model.apply, model.params, tuned, padded_ids[None].astype(np.int32), k=3)
    for name, a, b in zip(alone._fields, alone, padded, strict=True):
        b = np.asarray(b)[:, :T]
        if name == "cross_entropy_lt" or name == "rank_lt":  # the last target is the padding
            a, b = np.asarray(a)[:, :-1], b[:, :-1]
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)
