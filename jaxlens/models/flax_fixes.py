"""Corrected subclasses of transformers' Flax Llama, Mistral and Gemma modules.

transformers 4.57.6 is the last release with Flax models, so their defects will not be fixed
upstream. Found with real weights:

* the rotary embedding hard-codes base 10000 and ignores `config.rope_theta` (and `rope_scaling`);
* Llama and Mistral derive `head_dim` from `hidden_size // num_attention_heads` instead of reading
  `config.head_dim`;
* Llama and Mistral always build a separate `lm_head`, so a checkpoint with tied embeddings gets a
  random unembedding (only a log line says so);
* every layer builds a `[max_positions, max_positions]` causal mask up front (64M entries per layer
  for an 8k-context model), and Mistral's sliding window lets a token see one position too many.

We fix them here by subclassing, without touching the installed package: only `setup` methods are
replaced (plus the head's `__call__` for tied embeddings), so the forward computation is still
transformers' own code.
"""

from __future__ import annotations

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from transformers.modeling_flax_outputs import FlaxCausalLMOutput
from transformers.models.gemma import modeling_flax_gemma
from transformers.models.llama import modeling_flax_llama
from transformers.models.mistral import modeling_flax_mistral


def head_dim(config) -> int:
    """The per-head width: `config.head_dim` when set, else hidden_size // heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_inverse_frequencies(config) -> np.ndarray:
    """Rotary inverse frequencies `[head_dim // 2]` (float32), honouring `rope_theta`/scaling.

    Computed in float32 as PyTorch transformers does, so angles agree to the last bit.
    """
    dim = head_dim(config)
    base = float(getattr(config, "rope_theta", 10000.0) or 10000.0)
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(base) ** exponents)).astype(np.float32)
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    if kind == "llama3":
        return _llama3_scaled(inv_freq, scaling)
    raise NotImplementedError(
        f"rope_scaling type {kind!r} is not supported by jaxlens's Flax models; supported: "
        "default, linear, llama3."
    )


def _llama3_scaled(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
    # Llama 3.1's scheme: long wavelengths are slowed by `factor`, short ones kept, and the band
    # between is interpolated smoothly in 1/wavelength.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelength = 2 * np.pi / inv_freq
    scaled = np.where(wavelength > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= context / high) & (wavelength <= context / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


class RotaryEmbedding(nn.Module):
    """Drop-in for the Flax rotary modules: same call, correct frequencies, no position table."""

    config: object
    dtype: jnp.dtype = jnp.float32

    def __call__(self, key, query, position_ids):
        inv_freq = jnp.asarray(rope_inverse_frequencies(self.config))
        angles = position_ids[..., None].astype(jnp.float32) * inv_freq  # [b, t, head_dim/2]
        angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # broadcast over heads
        sin, cos = jnp.sin(angles), jnp.cos(angles)

        def rotate(x):
            return ((x * cos) + (_rotate_half(x) * sin)).astype(self.dtype)

        return rotate(key), rotate(query)


class LazyCausalMask:
    """Stands in for the eager `[1, 1, P, P]` mask; builds only the `[:q, :k]` slice asked for.

    With a sliding window w (Mistral), query i sees keys j with i - w < j <= i, as in PyTorch.
    """

    def __init__(self, sliding_window: int | None = None):
        self.sliding_window = sliding_window

    def __getitem__(self, index):
        _, _, rows, cols = index
        i = jnp.arange(rows.stop)[:, None]
        j = jnp.arange(cols.stop)[None, :]
        allowed = j <= i
        if self.sliding_window:
            allowed &= i - j < self.sliding_window
        return allowed[None, None]


def _attention_setup(self):
    config = self.config
    self.hidden_size = self.embed_dim = config.hidden_size
    self.num_heads = config.num_attention_heads
    self.head_dim = head_dim(config)
    self.num_key_value_heads = config.num_key_value_heads
    self.num_key_value_groups = self.num_heads // self.num_key_value_heads
    self.attention_softmax_in_fp32 = self.dtype is not jnp.float32
    use_bias = bool(getattr(config, "attention_bias", False))
    init = jax.nn.initializers.normal(config.initializer_range)

    def dense(features):
        return nn.Dense(features, use_bias=use_bias, dtype=self.dtype, kernel_init=init)

    self.q_proj = dense(self.num_heads * self.head_dim)
    self.k_proj = dense(self.num_key_value_heads * self.head_dim)
    self.v_proj = dense(self.num_key_value_heads * self.head_dim)
    self.o_proj = dense(config.hidden_size)
    self.causal_mask = LazyCausalMask(getattr(config, "sliding_window", None))
    self.rotary_emb = RotaryEmbedding(config, dtype=self.dtype)


def _merge_heads(self, hidden_states):
    # heads * head_dim need not equal hidden_size once head_dim is read from the config.
    return hidden_states.reshape(hidden_states.shape[:2] + (self.num_heads * self.head_dim,))


def _causal_lm_call(
    self,
    input_ids,
    attention_mask=None,
    position_ids=None,
    deterministic: bool = True,
    init_cache: bool = False,
    output_attentions: bool = False,
    output_hidden_states: bool = False,
    return_dict: bool = True,
):
    outputs = self.model(
        input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        deterministic=deterministic,
        init_cache=init_cache,
        output_attentions=output_attentions,
        output_hidden_states=output_hidden_states,
        return_dict=True,
    )
    hidden = outputs.last_hidden_state
    if self.config.tie_word_embeddings:
        embedding = self.model.variables["params"]["embed_tokens"]["embedding"]
        logits = hidden @ embedding.T.astype(hidden.dtype)
    else:
        logits = self.lm_head(hidden)
    return FlaxCausalLMOutput(
        logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
    )


def _fixed_classes(hf: types.ModuleType, prefix: str) -> type:
    """Builds the corrected module chain for one family; returns its ForCausalLM model class."""

    def cls(suffix):
        return getattr(hf, f"Flax{prefix}{suffix}")

    def make(suffix, namespace):
        return type(f"Fixed{prefix}{suffix}", (cls(suffix),), {"__module__": __name__, **namespace})

    attention = make("Attention", {"setup": _attention_setup, "_merge_heads": _merge_heads})

    def layer_setup(self):
        self.input_layernorm = cls("RMSNorm")(self.config, dtype=self.dtype)
        self.self_attn = attention(self.config, dtype=self.dtype)
        self.post_attention_layernorm = cls("RMSNorm")(self.config, dtype=self.dtype)
        self.mlp = cls("MLP")(self.config, dtype=self.dtype)

    layer = make("DecoderLayer", {"setup": layer_setup})

    def collection_setup(self):
        self.blocks = [
            layer(self.config, dtype=self.dtype, name=str(i))
            for i in range(self.config.num_hidden_layers)
        ]

    collection = make("LayerCollection", {"setup": collection_setup})

    def model_setup(self):
        self.hidden_size = self.config.hidden_size
        self.embed_tokens = nn.Embed(
            self.config.vocab_size,
            self.hidden_size,
            embedding_init=jax.nn.initializers.normal(stddev=self.config.initializer_range),
            dtype=self.dtype,
        )
        self.layers = collection(self.config, dtype=self.dtype)
        self.norm = cls("RMSNorm")(self.config, dtype=self.dtype)

    model = make("Module", {"setup": model_setup})

    def head_setup(self):
        self.model = model(self.config, dtype=self.dtype)
        if not self.config.tie_word_embeddings:
            self.lm_head = nn.Dense(
                self.config.vocab_size,
                use_bias=False,
                dtype=self.dtype,
                kernel_init=jax.nn.initializers.normal(stddev=self.config.initializer_range),
            )

    head = make("ForCausalLMModule", {"setup": head_setup, "__call__": _causal_lm_call})
    return make("ForCausalLM", {"module_class": head})


FixedFlaxLlamaForCausalLM = _fixed_classes(modeling_flax_llama, "Llama")
FixedFlaxMistralForCausalLM = _fixed_classes(modeling_flax_mistral, "Mistral")
FixedFlaxGemmaForCausalLM = _fixed_classes(modeling_flax_gemma, "Gemma")
