"""The explorer's views: the library's own trajectory, shown; bad choices refused with a reason."""

import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models

from jaxlens.lens import LogitLens, TunedLens
from jaxlens.models import load_model
from jaxlens.serve import cells as cells_module
from jaxlens.serve.explorer import Explorer, bucket_length
from jaxlens.trajectory_lib import PredictionTrajectory

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind"


@pytest.fixture(scope="module")
def model(tiny_lm):
    return load_model(tiny_lm)  # 3 layers, SmolLM2's tokenizer, 64 positions


@pytest.fixture(scope="module")
def tuned(model):
    translators = tiny_models.random_translators(model.num_layers, model.d_model, scale=0.5)
    return TunedLens(decoder=model.decoder(), translators=translators)


@pytest.fixture(scope="module")
def explorer(model, tuned):
    return Explorer(model, tuned, top_k=3)


def _reference(model, lens):
    return PredictionTrajectory.from_lens(lens, model, TEXT)


@pytest.mark.parametrize("kind", ["logit", "tuned"])
def test_the_view_shows_the_trajectory(explorer, model, tuned, kind):
    lens = tuned if kind == "tuned" else LogitLens(model.decoder())
    reference = _reference(model, lens)
    for statistic in ("entropy", "forward_kl", "max_probability", "cross_entropy", "rank"):
        view = explorer.view(TEXT, lens=kind, statistic=statistic)
        expected = getattr(reference, statistic)().values_lt
        got = np.array(view["values"], dtype=float)  # None -> NaN
        # float32 on the device (rounded to 4 decimals for the page) vs float64 on the host. A
        # rank counts tokens above the target's logit rather than above its float32
        # log-probability: deep in the tail, where thousands of a random model's logits lie
        # within rounding of each other, the two may count a tie differently.
        rtol = 1e-3 if statistic == "rank" else 0
        np.testing.assert_allclose(got, expected, rtol, 2e-4, equal_nan=True, err_msg=statistic)
        if statistic == "rank":
            top = expected < 1000
            np.testing.assert_array_equal(got[top], expected[top])
    assert view["tokens"] == reference.tokens
    assert view["layer_names"] == reference.layer_names
    ids, probs = reference.top_k(3)
    assert view["top_tokens"] == reference.token_strings(ids[..., 0]).tolist()
    assert view["top_k"][kind]["ids"] == ids.tolist()
    np.testing.assert_allclose(view["top_k"][kind]["probs"], probs, atol=1e-4)
    strings = reference.token_strings(ids.ravel())
    assert all(view["strings"][str(i)] == s for i, s in zip(ids.ravel(), strings, strict=True))


def test_the_difference_is_tuned_minus_logit(explorer):
    kw = dict(statistic="entropy", layers=(1, 2))
    tuned, logit = explorer.view(TEXT, lens="tuned", **kw), explorer.view(TEXT, lens="logit", **kw)
    difference = explorer.view(TEXT, lens="difference", **kw)
    np.testing.assert_allclose(
        difference["values"], np.subtract(tuned["values"], logit["values"]), atol=2e-4
    )
    assert difference["layer_names"] == ["1", "2", "output"]
    assert set(difference["top_k"]) == {"tuned", "logit"}
    assert difference["top_tokens"] == tuned["top_tokens"]
    assert (
        difference["scale"]["diverging"]
        and difference["scale"]["min"] == -difference["scale"]["max"]
    )


def test_one_program_per_bucket(model, tuned):
    explorer = Explorer(model, tuned)
    before = cells_module.lens_cells._cache_size()
    for text in ("Hello there, world.", "A longer text, though it still fits the same bucket."):
        for lens in ("logit", "tuned"):
            explorer.view(text, lens=lens)
    assert cells_module.lens_cells._cache_size() - before <= 1  # both lenses, both texts: 16
    assert [bucket_length(n, 64) for n in (1, 16, 17, 33, 64)] == [16, 16, 32, 64, 64]


def test_bfloat16_unembedding_stays_close(model, tuned):
    fast = Explorer(model, tuned, unembed_dtype=jnp.bfloat16)
    exact = _reference(model, tuned)
    view = fast.view(TEXT, lens="tuned", statistic="entropy")
    # bfloat16 keeps 8 bits: logits of size ~1 move by ~1e-2, entropies less.
    np.testing.assert_allclose(view["values"], exact.entropy().values_lt, atol=0.05)
    log_p = np.sort(exact.log_probs_ltv, -1)
    clear = (log_p[..., -1] - log_p[..., -2]) > 0.1  # no near-tie for the top token
    top = exact.token_strings(exact.log_probs_ltv.argmax(-1))
    assert (np.array(view["top_tokens"], dtype=object)[clear] == top[clear]).all()


@pytest.mark.parametrize(
    ("text", "choices", "message"),
    [
        ("", {}, "The text is empty"),
        ("   \n", {}, "The text is empty"),
        ("word " * 70, {}, "at most 64 fit (the model's 64 positions)"),
        (TEXT, {"statistic": "perplexity"}, "Unknown statistic 'perplexity'; choose one of"),
        (TEXT, {"lens": "tuned-ish"}, "Unknown lens 'tuned-ish'"),
        (TEXT, {"layers": (2, 1)}, "0 <= first <= last <= 2"),
        (TEXT, {"layers": (0, 3)}, "0 <= first <= last <= 2"),
        (TEXT, {"layers": (0.5, 2)}, "two whole numbers"),
    ],
)
def test_bad_choices_say_what_to_change(explorer, text, choices, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        explorer.view(text, **choices)


def test_without_a_tuned_lens_only_the_logit_lens_is_offered(model):
    explorer = Explorer(model, None, max_tokens=20)
    assert explorer.info()["lenses"] == ["logit"]
    with pytest.raises(ValueError, match="no tuned lens loaded"):
        explorer.view(TEXT, lens="difference")
    with pytest.raises(ValueError, match=r"at most 20 fit \(--max_tokens=20\)"):
        explorer.view("word " * 30)
