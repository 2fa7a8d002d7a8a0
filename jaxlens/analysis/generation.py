"""Generation from a lens: continue a prompt with what layer l's lens predicts.

Each step runs the frozen model, decodes layer l's hidden state at the last position with the
lens, picks the next token from those logits (greedily, or by sampling at a temperature) and
appends it. The model's own output is never used: the text is what layer l "believes" comes next
(tuned-lens's `TunedLens.generate`, from its git history; its PyPI release 0.2.0 has none).

The key-value cache is used as it is meant to be: the prompt is fed once, then each step feeds
only the new token, attending to the cached keys and values of the earlier positions
(`models.kv_cache`). tuned-lens's version passes the cache *and* re-feeds the whole sequence each
step. The decoding loop is one `jax.lax.scan` inside one `jax.jit`, compiled once per prompt
shape and `max_new_tokens`.

Example:

    lens = TunedLens.untrained(model.decoder(), model.num_layers)  # or a trained one
    out = generate(model, lens, model.tokenize("To be, or not"), layer=2, max_new_tokens=8)
    model.tokenizer.decode(out.tokens_bt[0])                       # prompt + 8 tokens
    out = generate(model, lens, ids, 2, 8, temperature=0.7, key=jax.random.key(0))

Axis letters: b batch, t token, n new token, v vocabulary, l layer.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxlens.lens import LogitLens
from jaxlens.models import kv_cache
from jaxlens.models.subject import SubjectModel


class Generation(NamedTuple):
    """What `generate` returns.

    Attributes:
      tokens_bt: int32 `[b, prompt + n]`, the prompt followed by the n new tokens.
      logits_bnv: float32 `[b, n, V]`, the lens's logits each new token was picked from (before
        the temperature).
    """

    tokens_bt: jax.Array
    logits_bnv: jax.Array


def generate(
    model: SubjectModel,
    lens: LogitLens,
    input_ids,
    layer: int,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    key: jax.Array | None = None,
    eos_token_id: int | None = None,
    params=None,
) -> Generation:
    """Continues `input_ids` with the tokens layer `layer`'s lens predicts.

    Args:
      model: the frozen subject model.
      lens: a `LogitLens` or `TunedLens` of this model.
      input_ids: int `[b, t]` (or `[t]`) prompts, all of the same length.
      layer: the layer whose lens picks the tokens, in `[0, L)`.
      max_new_tokens: n >= 1; prompt + n must fit in the model's positions.
      temperature: 0 decodes greedily (argmax); T > 0 samples from `softmax(logits / T)`.
      key: a `jax.random` key, needed when sampling.
      eos_token_id: once a sequence emits it, it emits only it (tuned-lens's padding).
      params: the model's parameters (default: its own).
    Returns:
      `Generation(tokens_bt, logits_bnv)`.
    Raises:
      ValueError: for a lens of another depth, a layer out of range, n < 1 or beyond the
        positions, a negative temperature, or sampling without a key.
    """
    ids_bt = model.check_input_ids(input_ids)
    _check(model, lens, ids_bt.shape[1], layer, max_new_tokens, temperature, key)
    tokens_bn, logits_bnv = _decode(
        model,
        model.params if params is None else params,
        lens,
        jnp.asarray(ids_bt),
        jnp.asarray(layer, jnp.int32),
        jnp.asarray(temperature, jnp.float32),
        jax.random.key(0) if key is None else key,
        jnp.asarray(-1 if eos_token_id is None else eos_token_id, jnp.int32),
        max_new_tokens=max_new_tokens,
    )
    return Generation(jnp.concatenate([ids_bt, tokens_bn], axis=1), logits_bnv)


def _check(model, lens, prompt: int, layer, max_new_tokens, temperature, key) -> None:
    num_layers = model.num_layers
    lens_layers = getattr(lens, "num_layers", num_layers)  # a logit lens decodes any layer
    if lens_layers != num_layers:
        raise ValueError(
            f"The lens has {lens_layers} translators but the model {num_layers} blocks; use a "
            "lens trained for this model."
        )
    if not 0 <= layer < num_layers:
        raise ValueError(
            f"layer {layer} is out of range for a lens of {num_layers} layers; pick a layer in "
            f"[0, {num_layers})."
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1; got {max_new_tokens}.")
    limit = model.max_positions
    if limit is not None and prompt + max_new_tokens > limit:
        raise ValueError(
            f"A prompt of {prompt} tokens plus {max_new_tokens} new ones exceeds the model's "
            f"{limit} positions; ask for at most {limit - prompt} new tokens."
        )
    if temperature < 0:
        raise ValueError(f"temperature must be at least 0 (0 decodes greedily); got {temperature}.")
    if temperature > 0 and key is None:
        raise ValueError("Sampling (temperature > 0) needs a key: pass key=jax.random.key(seed).")


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def _decode(model, params, lens, ids_bt, layer, temperature, key, eos, *, max_new_tokens):
    """The prompt in one cached forward, then one token per `scan` step; returns the new
    tokens `[b, n]` and the lens logits they were picked from `[b, n, V]`."""
    batch, prompt = ids_bt.shape
    # The last new token is never fed back, so the cache holds prompt + n - 1 positions.
    cache = kv_cache.empty_cache(model, batch, prompt + max_new_tokens - 1)

    def lens_logits(forward):
        return lens.layer_logits(forward.hidden_lbtd[layer, :, -1], layer)

    def pick(logits_bv, step_key, done_b):
        # Greedy and sampling share one compiled loop; temperature 0 selects the argmax.
        sampling = temperature > 0
        scaled_bv = logits_bv / jnp.where(sampling, temperature, 1.0)
        sampled_b = jax.random.categorical(step_key, scaled_bv, axis=-1)
        token_b = jnp.where(sampling, sampled_b, jnp.argmax(logits_bv, axis=-1))
        token_b = jnp.where(done_b, eos, token_b.astype(jnp.int32))
        return token_b, done_b | (token_b == eos)

    keys = jax.random.split(key, max_new_tokens)
    forward, cache = kv_cache.apply_cached(model, params, cache, ids_bt)
    first_logits_bv = lens_logits(forward)
    first_b, done_b = pick(first_logits_bv, keys[0], jnp.zeros((batch,), bool))

    def step(carry, step_key):
        cache, token_b, done_b = carry
        forward, cache = kv_cache.apply_cached(model, params, cache, token_b[:, None])
        logits_bv = lens_logits(forward)
        token_b, done_b = pick(logits_bv, step_key, done_b)
        return (cache, token_b, done_b), (token_b, logits_bv)

    _, (rest_nb, rest_nbv) = jax.lax.scan(step, (cache, first_b, done_b), keys[1:])
    tokens_bn = jnp.concatenate([first_b[:, None], rest_nb.T], axis=1)
    logits_bnv = jnp.concatenate([first_logits_bv[:, None], rest_nbv.transpose(1, 0, 2)], axis=1)
    return tokens_bn, logits_bnv
