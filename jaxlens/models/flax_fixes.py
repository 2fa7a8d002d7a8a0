"""Corrected subclasses of transformers' Flax Llama, Mistral and Gemma modules.

transformers 4.57.6 is the last release with Flax models, so their defects will not be fixed
upstream. Found with real weights:

* the rotary embedding hard-codes base 10000 and ignores `config.rope_theta` (and `rope_scaling`);
  we compute it with jaxlens's own `rotary` module, as the native decoder does;
* Llama and Mistral derive `head_dim` from `hidden_size // num_attention_heads` instead of reading
  `config.head_dim`;
* Llama and Mistral always build a separate `lm_head`, so a checkpoint with tied embeddings gets a
  random unembedding (only a log line says so);
* every layer builds a `[max_positions, max_positions]` causal mask up front (64M entries per layer
  for an 8k-context model), and Mistral's sliding window lets a token see one position too many;
  we build only the part in use (with a key-value cache: the cache's positions).

We fix them here by subclassing, without touching the installed package: only `setup` methods are
replaced (plus the head's `__call__` for tied embeddings), so the forward computation is still
transformers' own code.
"""

from __future__ import annotations

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
from transformers.modeling_flax_outputs import FlaxCausalLMOutput
from transformers.models.gemma import modeling_flax_gemma
from transformers.models.llama import modeling_flax_llama
from transformers.models.mistral import modeling_flax_mistral

from jaxlens.models import rotary
from jaxlens.models.rotary import head_dim


class RotaryEmbedding(nn.Module):
    """Drop-in for the Flax rotary modules: same call, correct frequencies, no position table."""

    config: object
    dtype: jnp.dtype = jnp.float32

    def __call__(self, key, query, position_ids):
        rope = rotary.rope_of(self.config)
        cos_btr, sin_btr = rotary.rotary_tables(position_ids, rope, position_ids.shape[-1])
        cos, sin = cos_btr[:, :, None], sin_btr[:, :, None]  # broadcast over heads

        def rotate(x):
            return ((x * cos) + (rotary.rotate_half(x) * sin)).astype(self.dtype)

        return rotate(key), rotate(query)


class LazyCausalMask:
    """Stands in for the eager `[1, 1, P, P]` mask; builds only the `[:q, :k]` slice asked for.

    With a sliding window w (Mistral), query i sees keys j with i - w < j <= i, as in PyTorch.
    """

    def __init__(self, sliding_window: int | None = None):
        self.sliding_window = sliding_window

    def __getitem__(self, index):
        _, _, rows, cols = index
        return self.dense(rows.stop, cols.stop)

    def dense(self, rows: int, cols: int) -> jax.Array:
        """The mask's first `rows` queries and `cols` keys, `[1, 1, rows, cols]`."""
        i = jnp.arange(rows)[:, None]
        j = jnp.arange(cols)[None, :]
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
    if self.has_variable("cache", "cached_key"):
        # With a key-value cache transformers `lax.dynamic_slice`s the mask, which needs an
        # array: the `[S, S]` one of the cache's S positions (not of the model's context).
        length = self.variables["cache"]["cached_key"].shape[1]
        self.causal_mask = self.causal_mask.dense(length, length)
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
