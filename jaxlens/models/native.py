"""Pieces shared by jaxlens's own Flax causal LMs (GPT-NeoX in `neox`, Qwen2/Qwen3 in `qwen`).

transformers 4.57.6, the last release with Flax models, has none for GPT-NeoX (Pythia) or Qwen, so
jaxlens writes them itself. Module and parameter paths mirror the Hugging Face PyTorch names
(`gpt_neox/layers/0/attention/query_key_value/kernel` for `gpt_neox.layers.0.attention.
query_key_value.weight`), so `convert.params_from_torch_names` loads a safetensors checkpoint
without torch. `NativeCausalLM` offers the little of a transformers Flax model class that
`SubjectModel` uses: `cls(config, dtype=..., _do_init=False)`, `.module`, `.params_shape_tree` and
the class attribute `base_model_prefix`.

Axis letters: b batch, t (and s) token position, d model width, h query heads, k key/value heads,
g query heads per key/value head, e head width, r rotary width, v vocabulary.
"""

from __future__ import annotations

import functools
import types
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.models import flax_fixes

ACTIVATIONS = {
    "gelu": functools.partial(nn.gelu, approximate=False),  # PyTorch's exact (erf) GELU
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "gelu_fast": functools.partial(nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
}
ROPE_TYPES = ("default", "linear", "llama3")  # what `flax_fixes.rope_inverse_frequencies` computes


class CausalLMOutput(NamedTuple):
    """What the native modules return (the fields `SubjectModel.apply` reads).

    Attributes:
      logits: `[b, t, v]`.
      hidden_states: L + 1 arrays `[b, t, d]` (the last final-normed), or None when not asked for.
    """

    logits: jax.Array
    hidden_states: tuple[jax.Array, ...] | None


class NativeCausalLM:
    """A native Flax causal LM without parameters, shaped like a transformers Flax model class.

    Subclasses set `module_class` (the linen module, built as `module_class(config, dtype=...)`)
    and `base_model_prefix` (the PyTorch name of the base model, "gpt_neox" or "model").

    Attributes:
      module: the linen module; `module.apply({"params": p}, input_ids, ...)` runs it.
      params_shape_tree: the parameter tree as `jax.ShapeDtypeStruct`s (nothing allocated).
    """

    module_class: type[nn.Module]
    base_model_prefix: str

    def __init__(self, config, dtype=jnp.float32, _do_init: bool = False):
        """Builds the module for `config`; `_do_init` is accepted for transformers' signature,
        but parameters are never initialised here: they come from a checkpoint."""
        del _do_init
        self.config = config
        self.dtype = dtype
        self.module = self.module_class(config, dtype=dtype)
        ids = jnp.zeros((1, 1), jnp.int32)
        self.params_shape_tree = jax.eval_shape(
            lambda: self.module.init(jax.random.key(0), ids)["params"]
        )


def activation(name: str):
    """The JAX function of a transformers `hidden_act` name (ValueError when we lack it)."""
    if name not in ACTIVATIONS:
        raise ValueError(
            f"Activation {name!r} is not supported by jaxlens's native models; supported: "
            f"{', '.join(ACTIVATIONS)}."
        )
    return ACTIVATIONS[name]


def unsupported_rope(config) -> list[str]:
    """Reasons (empty if none) why jaxlens cannot reproduce the config's rotary embedding."""
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ROPE_TYPES:
        return []
    return [f"rope_scaling type {kind!r} (supported: {', '.join(ROPE_TYPES)})"]


def inverse_frequencies(config, rotary_dim: int) -> np.ndarray:
    """Rotary inverse frequencies `[rotary_dim // 2]` for the first `rotary_dim` head dims.

    Partial rotary (GPT-NeoX's `rotary_pct`) uses the full-rotary formula with the rotary width
    in place of the head width, as PyTorch transformers does.
    """
    rotary_config = types.SimpleNamespace(
        head_dim=rotary_dim,
        rope_theta=getattr(config, "rope_theta", 10000.0),
        rope_scaling=getattr(config, "rope_scaling", None),
    )
    return flax_fixes.rope_inverse_frequencies(rotary_config)


def rotary_tables(positions_bt: jax.Array, inv_freq_r2: np.ndarray):
    """cos and sin `[b, t, r]` (float32) of the rotary angles at each position."""
    angles_btr2 = positions_bt[..., None].astype(jnp.float32) * jnp.asarray(inv_freq_r2)
    angles_btr = jnp.concatenate([angles_btr2, angles_btr2], axis=-1)
    return jnp.cos(angles_btr), jnp.sin(angles_btr)


def apply_rotary(x_bthe: jax.Array, cos_btr: jax.Array, sin_btr: jax.Array) -> jax.Array:
    """Rotates the first r of each head's e dims (the rest pass through), in x's dtype.

    Args:
      x_bthe: queries or keys `[b, t, heads, e]`.
      cos_btr, sin_btr: from `rotary_tables`, r <= e.
    Returns:
      `[b, t, heads, e]`.
    """
    rotary = cos_btr.shape[-1]
    cos = cos_btr[:, :, None].astype(x_bthe.dtype)  # PyTorch casts the tables to x's dtype too
    sin = sin_btr[:, :, None].astype(x_bthe.dtype)
    x_rot, x_pass = x_bthe[..., :rotary], x_bthe[..., rotary:]
    rotated = x_rot * cos + flax_fixes._rotate_half(x_rot) * sin
    return jnp.concatenate([rotated, x_pass], axis=-1)


def causal_mask(attention_mask_bt: jax.Array, tokens: int) -> jax.Array:
    """Boolean `[b, t, s]`: query t may see key s (causal, and s is not padding)."""
    causal_11ts = flax_fixes.LazyCausalMask()[:, :, :tokens, :tokens]
    return causal_11ts[0] & attention_mask_bt[:, None, :].astype(bool)


def attend(q_bthe, k_bske, v_bske, mask_bts, scale: float) -> jax.Array:
    """Scaled dot-product attention with grouped key/value heads, softmax in float32.

    Query head i reads key/value head i // g (PyTorch's `repeat_kv` order).

    Args:
      q_bthe: queries `[b, t, h, e]`.
      k_bske, v_bske: keys and values `[b, s, k, e]`, h a multiple of k.
      mask_bts: boolean `[b, t, s]`, True where attention is allowed.
      scale: multiplies the scores (1 / sqrt(e)).
    Returns:
      `[b, t, h * e]` in q's dtype.
    """
    b, t, h, e = q_bthe.shape
    kv_heads = k_bske.shape[2]
    q_btkge = q_bthe.reshape(b, t, kv_heads, h // kv_heads, e)
    scores_bkgts = jnp.einsum("btkge,bske->bkgts", q_btkge, k_bske) * scale
    scores_bkgts = jnp.where(
        mask_bts[:, None, None], scores_bkgts.astype(jnp.float32), jnp.finfo(jnp.float32).min
    )
    probs_bkgts = jax.nn.softmax(scores_bkgts, axis=-1).astype(q_bthe.dtype)
    out_btkge = jnp.einsum("bkgts,bske->btkge", probs_bkgts, v_bske)
    return out_btkge.reshape(b, t, h * e)


class RMSNorm(nn.Module):
    """RMSNorm as Llama/Qwen write it: normalise in float32, cast back, then scale by `weight`."""

    features: int
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (self.features,), self.dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt((x32**2).mean(-1, keepdims=True) + self.eps)
        return weight * normed.astype(x.dtype)


class LayerStack(nn.Module):
    """The decoder blocks, named "0", "1", ... as in PyTorch's `layers` ModuleList.

    `block` is built as `block(config, dtype=..., name=str(i))` and called as
    `block(h_btd, mask_bts, cos_btr, sin_btr)`.
    """

    block: type[nn.Module]
    config: object
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h_btd, mask_bts, cos_btr, sin_btr):
        """Returns the last block's output and every block's input (L arrays `[b, t, d]`)."""
        inputs = []
        for i in range(self.config.num_hidden_layers):
            inputs.append(h_btd)
            h_btd = self.block(self.config, dtype=self.dtype, name=str(i))(
                h_btd, mask_bts, cos_btr, sin_btr
            )
        return h_btd, inputs


class CausalLMModule(nn.Module):
    """A causal LM: a base model (embedding, blocks, final norm) then the unembedding.

    Subclasses build their submodules in `setup` and say which is the base model and how the
    final-normed stream becomes logits (`embed_out`, `lm_head`, or the tied input embedding).
    """

    config: object
    dtype: jnp.dtype = jnp.float32

    def base_model(self) -> nn.Module:
        """The submodule called as `base(ids_bt, mask_bt, positions_bt) -> (out_btd, hidden)`."""
        raise NotImplementedError

    def unembed(self, out_btd: jax.Array) -> jax.Array:
        """Logits `[b, t, v]` of the final-normed stream."""
        raise NotImplementedError

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
    ) -> CausalLMOutput:
        """Logits of token ids `[b, t]` (and the L + 1 hidden states when asked for).

        Args:
          input_ids: int `[b, t]`.
          attention_mask: `[b, t]`, 0 at padding keys (default: all ones).
          position_ids: `[b, t]` (default: 0 .. t-1).
          output_hidden_states: also return the hidden states.
          return_dict: accepted for transformers' signature; the output is a `CausalLMOutput`.
        Returns:
          `CausalLMOutput(logits [b, t, v], hidden_states or None)`.
        """
        del return_dict
        batch, tokens = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((batch, tokens), jnp.int32)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(tokens), (batch, tokens))
        out_btd, hidden = self.base_model()(input_ids, attention_mask, position_ids)
        return CausalLMOutput(self.unembed(out_btd), hidden if output_hidden_states else None)


def dense(features: int, name: str | None, dtype, use_bias: bool = True) -> nn.Dense:
    """A Linear layer; parameters in the model's dtype (`kernel` = PyTorch `weight`.T)."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=dtype, name=name)
