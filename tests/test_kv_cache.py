"""jaxlens.models.kv_cache: a prompt then one token at a time through the cache equals the full
forward without a cache (1e-5), for families whose cache path differs: Mistral (transformers' Flax
class with jaxlens's mask fix, a sliding window shorter than the sequence), BLOOM (ALiBi, no
position ids) and Phi-3 (jaxlens's native decoder, partial rotary and a window). GPT-2 and
Gemma-2 are covered through generation in test_generation.py.
"""

import functools

import jax
import numpy as np
import pytest
import tiny_models

from jaxlens.models import kv_cache, load_model

TOL = 1e-5  # float32, cached against uncached
PROMPT, TOKENS = 5, 8


@pytest.mark.parametrize("family", ["mistral", "bloom", "phi3"])
def test_cached_steps_equal_the_full_forward(family, tmp_path):
    model = load_model(tiny_models.save(tiny_models.build(family, seed=2), tmp_path))
    ids_bt = np.random.default_rng(0).integers(0, model.vocab_size, (2, TOKENS)).astype(np.int32)
    want = model(ids_bt)
    apply_cached = jax.jit(functools.partial(kv_cache.apply_cached, model))
    cache = kv_cache.empty_cache(model, batch=2, length=TOKENS)
    forward, cache = apply_cached(model.params, cache, ids_bt[:, :PROMPT])
    hidden, logits = [forward.hidden_lbtd], [forward.logits_btv]
    for t in range(PROMPT, TOKENS):
        forward, cache = apply_cached(model.params, cache, ids_bt[:, t : t + 1])
        hidden.append(forward.hidden_lbtd)
        logits.append(forward.logits_btv)
    assert int(cache.offset) == TOKENS
    np.testing.assert_allclose(np.concatenate(hidden, 2), want.hidden_lbtd, atol=TOL, rtol=TOL)
    np.testing.assert_allclose(np.concatenate(logits, 1), want.logits_btv, atol=TOL, rtol=TOL)


def test_a_cache_beyond_the_positions_is_refused(gpt2):
    with pytest.raises(ValueError, match="65 positions exceeds the model's 64 positions"):
        kv_cache.empty_cache(gpt2[1], batch=1, length=65)
