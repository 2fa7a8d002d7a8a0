"""Causal self-attention of the native decoder: masks, scores, and the projection layouts.

One `Attention` module covers every family; what differs is data in the `DecoderSpec`:

* projections: separate `q_proj`/`k_proj`/`v_proj` (Llama-style), one fused `qkv_proj` laid out
  `[q | k | v]` over the whole width (Phi-3), or GPT-NeoX's `query_key_value` laid out per head
  (`[b, t, heads, 3 * e]`); biases on q/k/v and on the output projection set separately;
* QK-norm: none, per head over e (Qwen3, Gemma-3) or over the full projection (OLMo-2/3);
* the score scale (1/sqrt(e), or Gemma's `query_pre_attn_scalar ** -0.5`), Gemma-2's soft-cap
  `c * tanh(s / c)` of the scores, and a sliding window of the layer's kind;
* GPT-OSS's attention sinks: one learnt logit per head joins every query's softmax as an extra
  key with no value, so a head can attend to nothing (its weights then sum to less than one).

Scores are computed in the inputs' dtype and soft-maxed in float32, as transformers' eager
attention does. A sliding window w lets query i see keys j with i - w < j <= i (transformers'
`sliding_window_overlay`).

Key-value cache (for generation): called with `cache_offset`, the attention keeps its keys and
values in the Flax collection "cache" (`key`, `value`: `[b, S, k, e]`, S the cache length),
writes this call's t positions at `cache_offset` and attends over all S slots; the mask (from
`causal_mask(..., offset=cache_offset)`) hides the slots not yet written. Without
`cache_offset` nothing changes. The cache is created, empty, by the module's `init` with
`init_cache=True` on ids of the cache's length, as transformers' Flax models do.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlens.decoder import soft_cap
from jaxlens.models import norms, rotary


def dense(features: int, name: str | None, dtype, use_bias: bool = True) -> nn.Dense:
    """A Linear layer; parameters in the model's dtype (`kernel` = PyTorch `weight`.T)."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=dtype, name=name)


def causal_mask(
    attention_mask_bs: jax.Array,
    sliding_window: int | None = None,
    tokens: int | None = None,
    offset: int | jax.Array = 0,
) -> jax.Array:
    """Boolean `[b, t, s]`: query t may see key s (causal, within the window, not padding).

    Args:
      attention_mask_bs: `[b, s]`, 0 at padding keys.
      sliding_window: the window w, or None.
      tokens: the number of queries t (default: s, no cache).
      offset: the position of the first query (with a cache: the positions already cached), so
        that query i sits at `offset + i`; keys at or beyond `offset + t` are hidden.
    """
    keys = attention_mask_bs.shape[1]
    i = offset + jnp.arange(keys if tokens is None else tokens)[:, None]
    j = jnp.arange(keys)[None, :]
    allowed_ts = j <= i
    if sliding_window:
        allowed_ts &= i - j < sliding_window
    return allowed_ts[None] & attention_mask_bs[:, None, :].astype(bool)


def attend(
    q_bthe, k_bske, v_bske, mask_bts, scale: float, softcap: float | None = None, sinks_h=None
):
    """Scaled dot-product attention with grouped key/value heads, softmax in float32.

    Args:
      q_bthe: queries `[b, t, h, e]`; k_bske, v_bske: keys and values `[b, s, k, e]`, k | h.
      mask_bts: boolean `[b, t, s]`, True where attention is allowed.
      scale: multiplies the scores (1 / sqrt(e), or Gemma's query_pre_attn_scalar ** -0.5).
      softcap: when set, scores become `softcap * tanh(scores / softcap)` before the mask.
      sinks_h: per query head sink logits `[h]` (GPT-OSS), or None.
    Returns:
      `[b, t, h * e]` in q's dtype.
    """
    b, t, h, e = q_bthe.shape
    kv_heads = k_bske.shape[2]
    q_btkge = q_bthe.reshape(b, t, kv_heads, h // kv_heads, e)
    scores_bkgts = jnp.einsum("btkge,bske->bkgts", q_btkge, k_bske) * scale
    scores_bkgts = soft_cap(scores_bkgts, softcap)
    scores_bkgts = jnp.where(
        mask_bts[:, None, None], scores_bkgts.astype(jnp.float32), jnp.finfo(jnp.float32).min
    )
    if sinks_h is not None:  # the sink's column joins the softmax, then is dropped
        sink_bkgt1 = jnp.broadcast_to(
            sinks_h.astype(jnp.float32).reshape(1, kv_heads, h // kv_heads, 1, 1),
            (*scores_bkgts.shape[:-1], 1),
        )
        scores_bkgts = jnp.concatenate([scores_bkgts, sink_bkgt1], axis=-1)
        probs_bkgts = jax.nn.softmax(scores_bkgts, axis=-1)[..., :-1].astype(q_bthe.dtype)
    else:
        probs_bkgts = jax.nn.softmax(scores_bkgts, axis=-1).astype(q_bthe.dtype)
    out_btkge = jnp.einsum("bkgts,bske->btkge", probs_bkgts, v_bske)
    return out_btkge.reshape(b, t, h * e)


class Attention(nn.Module):
    """One layer's self-attention, its parameters named as the family's PyTorch module.

    Attributes:
      spec: the `DecoderSpec` (projection layout, biases, QK-norm, scale, soft-cap).
      sliding_window: this layer's window, or None for global attention.
      dtype: parameter and computation dtype.
    """

    spec: object
    sliding_window: int | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_btd, mask_bts, rotary_tables, cache_offset=None):
        """Attention output `[b, t, d]`; `rotary_tables` is `(cos, sin)` or None (no RoPE).

        With `cache_offset` (an int scalar), keys and values go through the cache (see the
        module docstring) and `mask_bts` is `[b, t, S]` over the cache's S slots.
        """
        q_bthe, k_bske, v_bske = self._project(x_btd)
        spec = self.spec
        if spec.qk_norm == "per_head":
            q_bthe = self._norm(spec.head_dim, "q_norm")(q_bthe)
            k_bske = self._norm(spec.head_dim, "k_norm")(k_bske)
        if rotary_tables is not None:
            q_bthe = rotary.apply_rotary(q_bthe, *rotary_tables)
            k_bske = rotary.apply_rotary(k_bske, *rotary_tables)
        if cache_offset is not None:
            k_bske, v_bske = self._through_cache(k_bske, v_bske, cache_offset)
        sinks_h = None
        if spec.attn_sinks:
            sinks_h = self.param("sinks", nn.initializers.zeros, (spec.num_heads,), self.dtype)
        scale, softcap = spec.attn_scale, spec.attn_softcap
        out = attend(q_bthe, k_bske, v_bske, mask_bts, scale, softcap, sinks_h)
        return dense(spec.hidden_size, spec.out_proj_name, self.dtype, spec.out_bias)(out)

    def _through_cache(self, k_bske, v_bske, offset):
        """Writes this call's keys and values into the cache at `offset`; returns all S slots."""
        cached_k = self.variable("cache", "key", jnp.zeros, k_bske.shape, k_bske.dtype)
        cached_v = self.variable("cache", "value", jnp.zeros, v_bske.shape, v_bske.dtype)
        if self.is_initializing():  # creating the empty cache: its length is this call's t
            return k_bske, v_bske
        start = (0, offset, 0, 0)
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k_bske, start)
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v_bske, start)
        return cached_k.value, cached_v.value

    def _norm(self, features, name):
        return norms.make_norm(self.spec.norm_kind, features, self.spec.norm_eps, self.dtype, name)

    def _project(self, x_btd):
        spec, dtype = self.spec, self.dtype
        b, t, _ = x_btd.shape
        heads, kv_heads, e = spec.num_heads, spec.num_kv_heads, spec.head_dim
        q_width, kv_width = heads * e, kv_heads * e
        if spec.qkv_layout == "per_head_fused":  # GPT-NeoX: [b, t, heads, 3 e]
            qkv = dense(3 * q_width, "query_key_value", dtype, spec.qkv_bias)(x_btd)
            return jnp.split(qkv.reshape(b, t, heads, 3 * e), 3, axis=-1)
        if spec.qkv_layout == "fused":  # Phi-3: [q | k | v] over the whole width
            qkv = dense(q_width + 2 * kv_width, "qkv_proj", dtype, spec.qkv_bias)(x_btd)
            q, k, v = jnp.split(qkv, [q_width, q_width + kv_width], axis=-1)
        else:
            q = dense(q_width, "q_proj", dtype, spec.qkv_bias)(x_btd)
            k = dense(kv_width, "k_proj", dtype, spec.qkv_bias)(x_btd)
            v = dense(kv_width, "v_proj", dtype, spec.qkv_bias)(x_btd)
        if spec.qk_norm == "full":  # OLMo-2/3: over the whole projection, before the heads split
            q = self._norm(q_width, "q_norm")(q)
            k = self._norm(kv_width, "k_norm")(k)
        return (
            q.reshape(b, t, heads, e),
            k.reshape(b, t, kv_heads, e),
            v.reshape(b, t, kv_heads, e),
        )
