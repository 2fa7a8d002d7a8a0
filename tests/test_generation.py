"""jaxlens.analysis.generation: decoding from a lens with a key-value cache.

The reference is an independent computation, not tuned-lens: tuned-lens 0.2.0 (PyPI) has no
`generate`, and the one in its git history passes the cache and re-feeds the whole sequence each
step, so its keys and values of earlier positions are appended twice (wrong positions and
attention). Here the reference re-runs the full forward, without any cache, on the growing
sequence at every step and decodes layer l's hidden state at the last position with the lens.
Families: GPT-2 (transformers' Flax class) and Gemma-2 (jaxlens's native decoder: soft-caps,
sliding windows shorter than the sequence); the cache of the other families is checked in
test_kv_cache.py.
"""

import jax
import numpy as np
import pytest
import tiny_models

from jaxlens.analysis.generation import _decode, generate
from jaxlens.lens import TunedLens
from jaxlens.models import load_model

TOL = 1e-5  # float32, cached against uncached
PROMPT, NEW, LAYER = 4, 4, 1


@pytest.fixture(scope="module", params=["gpt2", "gemma2"])
def model_and_lens(request, gpt2, tmp_path_factory):
    if request.param == "gpt2":
        model = gpt2[1]
    else:
        torch_model = tiny_models.build(request.param, seed=5)
        model = load_model(tiny_models.save(torch_model, tmp_path_factory.mktemp(request.param)))
    translators = tiny_models.random_translators(model.num_layers, model.d_model, seed=1)
    return model, TunedLens(decoder=model.decoder(), translators=translators)


def _prompt(model, batch=2):
    rng = np.random.default_rng(7)
    return rng.integers(0, model.vocab_size, size=(batch, PROMPT)).astype(np.int32)


def _lens_logits_without_cache(model, lens, tokens_bt):
    """Layer LAYER's lens logits `[b, t, V]` at every position of the full, uncached forward."""
    hidden_lbtd = model(tokens_bt).hidden_lbtd
    return np.asarray(lens.layer_logits(hidden_lbtd[LAYER], LAYER))


def test_greedy_tokens_and_logits_equal_uncached_forwards(model_and_lens):
    model, lens = model_and_lens
    tokens_bt = _prompt(model)
    want_logits = []
    for _ in range(NEW):  # the independent greedy loop
        logits_bv = _lens_logits_without_cache(model, lens, tokens_bt)[:, -1]
        want_logits.append(logits_bv)
        tokens_bt = np.concatenate([tokens_bt, logits_bv.argmax(-1)[:, None]], axis=1)
    got = generate(model, lens, _prompt(model), LAYER, NEW)
    np.testing.assert_array_equal(got.tokens_bt, tokens_bt)
    np.testing.assert_allclose(got.logits_bnv, np.stack(want_logits, 1), atol=TOL, rtol=TOL)


def test_sampled_steps_equal_uncached_forwards_and_repeat_with_the_key(model_and_lens):
    model, lens = model_and_lens
    key = jax.random.key(3)
    got = generate(model, lens, _prompt(model), LAYER, NEW, temperature=2.0, key=key)
    # Teacher-forced on the sampled tokens: one causal forward holds every step's last position.
    want_btv = _lens_logits_without_cache(model, lens, np.asarray(got.tokens_bt)[:, :-1])
    np.testing.assert_allclose(got.logits_bnv, want_btv[:, PROMPT - 1 :], atol=TOL, rtol=TOL)
    again = generate(model, lens, _prompt(model), LAYER, NEW, temperature=2.0, key=key)
    np.testing.assert_array_equal(again.tokens_bt, got.tokens_bt)
    other = generate(
        model, lens, _prompt(model), LAYER, NEW, temperature=2.0, key=jax.random.key(4)
    )
    assert not np.array_equal(other.tokens_bt, got.tokens_bt)


def test_temperature_towards_zero_is_greedy_and_compiles_once(gpt2):
    model = gpt2[1]
    lens = TunedLens.untrained(model.decoder(), model.num_layers)
    greedy = generate(model, lens, _prompt(model), LAYER, NEW)
    cold = generate(
        model, lens, _prompt(model), LAYER, NEW, temperature=1e-4, key=jax.random.key(0)
    )
    np.testing.assert_array_equal(cold.tokens_bt, greedy.tokens_bt)
    # Other layers, temperatures (greedy or not) and keys reuse the compiled loop.
    compiled = _decode._cache_size()
    generate(model, lens, _prompt(model), 0, NEW, temperature=0.5, key=jax.random.key(1))
    assert _decode._cache_size() == compiled


def test_after_the_eos_token_only_eos_follows(gpt2):
    model = gpt2[1]
    lens = TunedLens.untrained(model.decoder(), model.num_layers)
    first_b = np.asarray(generate(model, lens, _prompt(model), LAYER, NEW).tokens_bt[:, PROMPT])
    got = generate(model, lens, _prompt(model), LAYER, NEW, eos_token_id=int(first_b[0]))
    np.testing.assert_array_equal(got.tokens_bt[0, PROMPT:], [first_b[0]] * NEW)
    if first_b[1] != first_b[0]:  # the other row goes on (same continuation as without eos)
        assert got.tokens_bt[1, PROMPT] == first_b[1]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(layer=3), r"layer 3 is out of range .* \[0, 3\)"),
        (dict(layer=-1), r"layer -1 is out of range"),
        (dict(max_new_tokens=61), r"exceeds the model's 64 positions; ask for at most 60"),
        (dict(max_new_tokens=0), r"max_new_tokens must be at least 1"),
        (dict(temperature=-0.5), r"temperature must be at least 0"),
        (dict(temperature=1.0), r"needs a key"),
    ],
)
def test_bad_input_is_refused(gpt2, kwargs, message):
    model = gpt2[1]
    lens = TunedLens.untrained(model.decoder(), model.num_layers)
    args = dict(layer=LAYER, max_new_tokens=NEW) | kwargs
    with pytest.raises(ValueError, match=message):
        generate(model, lens, _prompt(model), **args)


def test_a_lens_of_another_depth_is_refused(gpt2):
    model = gpt2[1]
    lens = TunedLens.untrained(model.decoder(), model.num_layers - 1)
    with pytest.raises(ValueError, match="The lens has 2 translators but the model 3 blocks"):
        generate(model, lens, _prompt(model), LAYER, NEW)
