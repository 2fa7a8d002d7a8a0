"""Qwen2 and Qwen3 in Flax, parameter for parameter the Hugging Face PyTorch models.

Both are Llama-shaped (pre-RMSNorm blocks, SwiGLU MLP, rotary attention with grouped key/value
heads). They differ from Llama, and from each other, only in attention: Qwen2's q/k/v
projections carry biases (its output projection does not); Qwen3 has biases only when
`attention_bias` is set, and RMS-normalises each query and key head (`q_norm`, `k_norm`, over
the head width) before the rotation. Both read `head_dim` from the config (Qwen3's need not be
hidden_size / heads) and honour `rope_theta` and `tie_word_embeddings`.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxlens.models import flax_fixes, native


def _attention_layout(config) -> tuple[bool, bool, bool]:
    """(q/k/v biases, output bias, per-head q/k norms) of the config's family."""
    if config.model_type == "qwen2":
        return True, False, False
    bias = bool(getattr(config, "attention_bias", False))
    return bias, bias, True


class QwenAttention(nn.Module):
    config: object
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_btd, mask_bts, cos_btr, sin_btr):
        config = self.config
        width = flax_fixes.head_dim(config)
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        qkv_bias, out_bias, qk_norm = _attention_layout(config)
        b, t, _ = x_btd.shape
        q_bthe = native.dense(heads * width, "q_proj", self.dtype, qkv_bias)(x_btd)
        k_bske = native.dense(kv_heads * width, "k_proj", self.dtype, qkv_bias)(x_btd)
        v_bske = native.dense(kv_heads * width, "v_proj", self.dtype, qkv_bias)(x_btd)
        q_bthe = q_bthe.reshape(b, t, heads, width)
        k_bske = k_bske.reshape(b, t, kv_heads, width)
        v_bske = v_bske.reshape(b, t, kv_heads, width)
        if qk_norm:
            eps = config.rms_norm_eps
            q_bthe = native.RMSNorm(width, eps, dtype=self.dtype, name="q_norm")(q_bthe)
            k_bske = native.RMSNorm(width, eps, dtype=self.dtype, name="k_norm")(k_bske)
        q_bthe = native.apply_rotary(q_bthe, cos_btr, sin_btr)
        k_bske = native.apply_rotary(k_bske, cos_btr, sin_btr)
        out = native.attend(q_bthe, k_bske, v_bske, mask_bts, width**-0.5)
        return native.dense(config.hidden_size, "o_proj", self.dtype, out_bias)(out)


class QwenMLP(nn.Module):
    config: object
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_btd):
        config = self.config
        gate = native.dense(config.intermediate_size, "gate_proj", self.dtype, False)(x_btd)
        up = native.dense(config.intermediate_size, "up_proj", self.dtype, False)(x_btd)
        act = native.activation(config.hidden_act)(gate) * up
        return native.dense(config.hidden_size, "down_proj", self.dtype, False)(act)


class QwenDecoderLayer(nn.Module):
    config: object
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h_btd, mask_bts, cos_btr, sin_btr):
        config, dtype = self.config, self.dtype
        d, eps = config.hidden_size, config.rms_norm_eps
        attention = QwenAttention(config, dtype=dtype, name="self_attn")
        normed = native.RMSNorm(d, eps, dtype=dtype, name="input_layernorm")(h_btd)
        h_btd = h_btd + attention(normed, mask_bts, cos_btr, sin_btr)
        normed = native.RMSNorm(d, eps, dtype=dtype, name="post_attention_layernorm")(h_btd)
        return h_btd + QwenMLP(config, dtype=dtype, name="mlp")(normed)


class QwenModel(nn.Module):
    """`model`: embedding, blocks, final RMSNorm."""

    config: object
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        config = self.config
        self.embed_tokens = nn.Embed(
            config.vocab_size, config.hidden_size, dtype=self.dtype, param_dtype=self.dtype
        )
        self.layers = native.LayerStack(QwenDecoderLayer, config, dtype=self.dtype)
        self.norm = native.RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=self.dtype)

    def __call__(self, input_ids_bt, attention_mask_bt, position_ids_bt):
        """Returns the final-normed output `[b, t, d]` and the L + 1 hidden states."""
        mask_bts = native.causal_mask(attention_mask_bt, input_ids_bt.shape[1])
        inv_freq = flax_fixes.rope_inverse_frequencies(self.config)
        cos_btr, sin_btr = native.rotary_tables(position_ids_bt, inv_freq)
        h_btd, inputs = self.layers(self.embed_tokens(input_ids_bt), mask_bts, cos_btr, sin_btr)
        out_btd = self.norm(h_btd)
        return out_btd, (*inputs, out_btd)


class QwenForCausalLMModule(native.CausalLMModule):
    def setup(self):
        self.model = QwenModel(self.config, dtype=self.dtype)
        if not self.config.tie_word_embeddings:
            self.lm_head = native.dense(self.config.vocab_size, None, self.dtype, False)

    def base_model(self):
        return self.model

    def unembed(self, out_btd):
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.attend(out_btd)
        return self.lm_head(out_btd)


class FlaxQwen2ForCausalLM(native.NativeCausalLM):
    """Qwen2 / Qwen2.5 causal LM (`model_type` "qwen2")."""

    module_class = QwenForCausalLMModule
    base_model_prefix = "model"


class FlaxQwen3ForCausalLM(native.NativeCausalLM):
    """Qwen3 dense causal LM (`model_type` "qwen3")."""

    module_class = QwenForCausalLMModule
    base_model_prefix = "model"


def unsupported_features(config) -> list[str]:
    """What in a Qwen2/Qwen3 config this implementation cannot reproduce (empty: all of it)."""
    problems = native.unsupported_rope(config)
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "use_sliding_window", False) or "sliding_attention" in layer_types:
        problems.append("use_sliding_window=True (sliding-window attention)")
    if config.hidden_act not in native.ACTIVATIONS:
        problems.append(f"hidden_act {config.hidden_act!r}")
    return problems
