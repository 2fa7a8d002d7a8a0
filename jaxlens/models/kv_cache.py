"""A key-value cache for a `SubjectModel`: feed a sequence a few tokens at a time.

Every family speaks one protocol, transformers' Flax one: the module's `init` with
`init_cache=True`, on ids as long as the cache, creates the empty cache (the Flax collection
"cache": each attention's keys and values `[b, S, heads, e]` and a write index); `apply` with
that collection mutable writes the new positions after those already cached and attends to all
of them. jaxlens's native decoder implements the same protocol (`native`, `attention`).

`KVCache` carries the collection with the number of positions filled (`offset`, which gives the
new tokens their position ids) and its length S (static). A step costs one token's forward:
nothing before `offset` is recomputed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxlens.models.subject import Forward, SubjectModel


@struct.dataclass
class KVCache:
    """The cached keys and values of every layer.

    Attributes:
      variables: the model's "cache" collection (a pytree of arrays).
      offset: int32 scalar, the positions filled so far (the next token's position).
      length: S, the most positions it holds (static).
    """

    variables: dict
    offset: jax.Array
    length: int = struct.field(pytree_node=False)


def _inputs(model: SubjectModel, input_ids_bt, positions_bt, length: int) -> dict:
    batch = input_ids_bt.shape[0]
    inputs = dict(
        input_ids=input_ids_bt.astype(jnp.int32),
        # Over all S slots: causality (and the write index) hide the ones not yet filled.
        attention_mask=jnp.ones((batch, length), jnp.int32),
        output_hidden_states=True,
        return_dict=True,
    )
    if model.family.takes_position_ids:
        inputs["position_ids"] = positions_bt
    return inputs


def empty_cache(model: SubjectModel, batch: int, length: int) -> KVCache:
    """An empty cache for `batch` sequences of up to `length` positions (no parameters built).

    Raises:
      ValueError: when `length` exceeds the model's positions.
    """
    limit = model.max_positions
    if limit is not None and length > limit:
        raise ValueError(
            f"A cache of {length} positions exceeds the model's {limit} positions; generate at "
            f"most {limit} tokens in all (prompt included)."
        )
    ids = jnp.zeros((batch, length), jnp.int32)
    inputs = _inputs(model, ids, jnp.broadcast_to(jnp.arange(length), (batch, length)), length)

    def init():
        return model.flax_model.module.init(jax.random.key(0), **inputs, init_cache=True)["cache"]

    # Every cache variable starts at zero (keys, values and index), so only the shapes are needed.
    shapes = jax.eval_shape(init)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return KVCache(variables=zeros, offset=jnp.zeros((), jnp.int32), length=length)


def apply_cached(
    model: SubjectModel, params, cache: KVCache, input_ids_bt: jax.Array
) -> tuple[Forward, KVCache]:
    """Forward pass of the next tokens after those in the cache. Pure; safe inside `jax.jit`.

    Args:
      model: the subject model.
      params: its parameter tree.
      cache: the cache of the positions before these tokens.
      input_ids_bt: int `[b, t]`, the tokens at positions `offset .. offset + t - 1` (the caller
        keeps `offset + t <= length`).
    Returns:
      `Forward` of these t positions (hidden states `[L + 1, b, t, d]`, logits `[b, t, V]`),
      and the cache holding them too.
    """
    batch, tokens = input_ids_bt.shape
    positions_bt = jnp.broadcast_to(cache.offset + jnp.arange(tokens), (batch, tokens))
    out, mutated = model.flax_model.module.apply(
        {"params": params, "cache": cache.variables},
        **_inputs(model, input_ids_bt, positions_bt, cache.length),
        mutable=["cache"],
    )
    cache = KVCache(mutated["cache"], cache.offset + tokens, cache.length)
    return Forward(jnp.stack(out.hidden_states), out.logits), cache
