"""jaxlens's own Flax decoder: one implementation for every decoder-only family it builds itself.

transformers 4.57.6, the last release with Flax models, has none for GPT-NeoX, Qwen2/3, Gemma-2/3,
OLMo-2/3, Phi-3 or SmolLM3, so jaxlens writes one decoder whose per-family differences are data: a
`DecoderSpec` (`spec`) built from the Hugging Face config by `specs.spec_of`. A block is

    a = post_attention_norm(attention(pre_attention_norm(h)))      # absent norms are identities
    h = h + a;  h = h + post_mlp_norm(mlp(pre_mlp_norm(h)))        # or, parallel: h + a + mlp(..)

with the attention (`attention`), rotary embedding (`rotary`), norms (`norms`) and MLP (`mlp`) in
their own modules. Module and parameter paths mirror the PyTorch names (`model/layers/0/self_attn/
q_proj/kernel` for `model.layers.0.self_attn.q_proj.weight`), so `convert.params_from_torch_names`
loads a safetensors checkpoint without torch. `NativeDecoderLM` offers the little of a transformers
Flax model class that `SubjectModel` uses: `cls(config, dtype=..., _do_init=False)`, `.module`,
`.params_shape_tree` and `.base_model_prefix`.

The MLP slot: each layer's feed-forward block is built by `mlp.mlp_module(spec, layer, dtype)`
from `LayerSpec.mlp`: "dense", or "moe" for the routed experts of Mixtral, Qwen3-MoE, OLMoE and
GPT-OSS (`moe.RoutedExperts`, named after the family's sparse block, e.g. Mixtral's
"block_sparse_moe"; its sizes and routing in `DecoderSpec.moe`, filled in with each layer's kind
by the family's builder in `specs`: Qwen3-MoE may mix dense and sparse layers).

Generation: `DecoderLM(..., init_cache=True)` under `init` creates an empty key-value cache (the
Flax collection "cache", the protocol of transformers' Flax models); applied with that collection
mutable, each call writes its positions into the cache after those already there (the stack's
`cache/<base>/index`) and attends to all of them, so a decoding step feeds only its new token.

Axis letters: b batch, t (and s) token position, d model width, h query heads, k key/value heads,
g query heads per key/value head, e head width, r rotary width, v vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlens.decoder import soft_cap
from jaxlens.models import attention, mlp, norms, rotary, specs
from jaxlens.models.spec import DecoderSpec, LayerSpec


class CausalLMOutput(NamedTuple):
    """What the native module returns (the fields `SubjectModel.apply` reads).

    Attributes:
      logits: `[b, t, v]` (soft-capped when the family caps them).
      hidden_states: L + 1 arrays `[b, t, d]` (the last final-normed), or None when not asked for.
    """

    logits: jax.Array
    hidden_states: tuple[jax.Array, ...] | None


class Block(nn.Module):
    """One decoder layer, named "0", "1", ... as in PyTorch's `layers` ModuleList."""

    spec: DecoderSpec
    layer: LayerSpec
    dtype: jnp.dtype = jnp.float32

    def _norm(self, name, x):
        if name is None:
            return x
        spec = self.spec
        return norms.make_norm(spec.norm_kind, spec.hidden_size, spec.norm_eps, self.dtype, name)(x)

    @nn.compact
    def __call__(self, h_btd, mask_bts, rotary_tables, cache_offset=None):
        spec, names = self.spec, self.spec.norms
        attend = attention.Attention(
            spec, self.layer.sliding_window, dtype=self.dtype, name=spec.attention_name
        )
        feed_forward = mlp.mlp_module(spec, self.layer, self.dtype)
        attn_btd = attend(
            self._norm(names.pre_attention, h_btd), mask_bts, rotary_tables, cache_offset
        )
        attn_btd = self._norm(names.post_attention, attn_btd)
        if spec.parallel_residual:
            mlp_btd = feed_forward(self._norm(names.pre_mlp, h_btd))
            return self._norm(names.post_mlp, mlp_btd) + attn_btd + h_btd  # PyTorch's order
        h_btd = h_btd + attn_btd
        mlp_btd = feed_forward(self._norm(names.pre_mlp, h_btd))
        return h_btd + self._norm(names.post_mlp, mlp_btd)


class Layers(nn.Module):
    """The blocks; `masks` and `tables` hold each layer's mask and rotary tables (or None);
    `cache_offset` as in `attention.Attention`."""

    spec: DecoderSpec
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h_btd, masks, tables, cache_offset=None):
        """Returns the last block's output and every block's input (L arrays `[b, t, d]`)."""
        inputs = []
        for i, layer in enumerate(self.spec.layers):
            inputs.append(h_btd)
            block = Block(self.spec, layer, dtype=self.dtype, name=str(i))
            h_btd = block(h_btd, masks[i], tables[i], cache_offset)
        return h_btd, inputs


class DecoderStack(nn.Module):
    """The base model (`model`, or `gpt_neox`): embedding, blocks, final norm."""

    spec: DecoderSpec
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids_bt, attention_mask_bs, position_ids_bt, init_cache=False):
        """Returns the final-normed output `[b, t, d]`, the L + 1 hidden states and the
        embedding matrix `[v, d]` (the unembedding when tied).

        `attention_mask_bs` covers the keys: the t tokens, or with a cache its S slots.
        """
        spec, dtype = self.spec, self.dtype
        embed = nn.Embed(
            spec.vocab_size, spec.hidden_size, dtype=dtype, param_dtype=dtype, name=spec.embed_name
        )
        h_btd = embed(input_ids_bt)
        if spec.embed_scale:  # Gemma: sqrt(d), rounded to the model's dtype as in PyTorch
            h_btd = h_btd * jnp.asarray(spec.hidden_size**0.5, dtype)
        tokens, keys = input_ids_bt.shape[1], attention_mask_bs.shape[1]
        offset = self._cache_offset(tokens, init_cache)
        masks = {
            w: attention.causal_mask(attention_mask_bs, w, tokens, 0 if offset is None else offset)
            for w in spec.windows
        }
        # The sequence length (LongRoPE's choice of factors) is the keys' count: with a cache,
        # the cache length, fixed for the whole generation.
        tables = {r: rotary.rotary_tables(position_ids_bt, r, keys) for r in spec.ropes}
        h_btd, inputs = Layers(spec, dtype=dtype, name="layers")(
            h_btd,
            [masks[layer.sliding_window] for layer in spec.layers],
            [None if layer.rope is None else tables[layer.rope] for layer in spec.layers],
            offset,
        )
        final_norm = norms.make_norm(
            spec.norm_kind, spec.hidden_size, spec.norm_eps, dtype, spec.final_norm_name
        )
        out_btd = final_norm(h_btd)
        return out_btd, (*inputs, out_btd), embed.embedding

    def _cache_offset(self, tokens: int, init_cache: bool):
        """With a cache: the positions already in it (then counts this call's); None without."""
        if not (init_cache or self.has_variable("cache", "index")):
            return None
        index = self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
        offset = index.value
        if not self.is_initializing():
            index.value = offset + tokens
        return offset


class DecoderLM(nn.Module):
    """A causal LM: the base model, then the unembedding (and the final logit soft-cap)."""

    spec: DecoderSpec
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        init_cache: bool = False,
    ) -> CausalLMOutput:
        """Logits of token ids `[b, t]` (and the L + 1 hidden states when asked for).

        Args:
          input_ids: int `[b, t]`.
          attention_mask: `[b, t]`, 0 at padding keys (default: all ones); with a cache `[b, S]`
            over its S slots (required then).
          position_ids: `[b, t]` (default: 0 .. t-1).
          output_hidden_states: also return the hidden states.
          return_dict: accepted for transformers' signature; the output is a `CausalLMOutput`.
          init_cache: under `init`, create the empty key-value cache (see the module docstring).
        Returns:
          `CausalLMOutput(logits [b, t, v], hidden_states or None)`.
        """
        del return_dict
        spec = self.spec
        batch, tokens = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((batch, tokens), jnp.int32)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(tokens), (batch, tokens))
        base = DecoderStack(spec, dtype=self.dtype, name=spec.base_name)
        out_btd, hidden, embedding_vd = base(input_ids, attention_mask, position_ids, init_cache)
        if spec.tie_embeddings:
            logits = jnp.dot(out_btd, embedding_vd.T.astype(out_btd.dtype))
        else:
            logits = attention.dense(spec.vocab_size, spec.head_name, self.dtype, False)(out_btd)
        logits = soft_cap(logits, spec.final_softcap)
        return CausalLMOutput(logits, hidden if output_hidden_states else None)


class NativeDecoderLM:
    """The native decoder for a transformers config, shaped like a transformers Flax model class.

    Attributes:
      spec: the `DecoderSpec` built from the config.
      module: the linen module; `module.apply({"params": p}, input_ids, ...)` runs it.
      params_shape_tree: the parameter tree as `jax.ShapeDtypeStruct`s (nothing allocated).
      base_model_prefix: the PyTorch name of the base model ("model", "gpt_neox").
    """

    def __init__(
        self, config, dtype=jnp.float32, _do_init: bool = False, spec: DecoderSpec | None = None
    ):
        """Builds the module for `config`; `_do_init` is accepted for transformers' signature,
        but parameters are never initialised here: they come from a checkpoint. `spec` replaces
        the one built from the config (layer surgery reorders its layers)."""
        del _do_init
        self.config = config
        self.dtype = dtype
        self.spec = specs.spec_of(config) if spec is None else spec
        self.base_model_prefix = self.spec.base_name
        self.module = DecoderLM(self.spec, dtype=dtype)
        ids = jnp.zeros((1, 1), jnp.int32)
        self.params_shape_tree = jax.eval_shape(
            lambda: self.module.init(jax.random.key(0), ids)["params"]
        )
