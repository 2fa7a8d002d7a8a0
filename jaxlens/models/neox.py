"""GPT-NeoX (Pythia) in Flax, parameter for parameter the Hugging Face PyTorch model.

A block reads the residual stream through two LayerNorms. With `use_parallel_residual` (Pythia,
NeoX-20B) attention and MLP both read the block's input and are added together:
`h + attn(ln1(h)) + mlp(ln2(h))`; without it they run one after the other like GPT-2. Attention
projects q, k and v with one fused Linear whose output is laid out per head as `[q | k | v]`
(`[b, t, heads, 3 * e]`), and rotates only the first `int(e * rotary_pct)` dims of each head.
The unembedding `embed_out` is a separate matrix unless `tie_word_embeddings` is set.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxlens.models import native


def _layer_norm(config, name, dtype):
    # Two-pass variance (mean of squared deviations), not Flax's default E[x^2] - E[x]^2 form.
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=dtype,
        name=name,
    )


def rotary_dim(config) -> int:
    """How many dims of each head are rotated: int(head width * rotary_pct), as in PyTorch."""
    return int(config.hidden_size // config.num_attention_heads * config.rotary_pct)


class NeoXAttention(nn.Module):
    config: object
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_btd, mask_bts, cos_btr, sin_btr):
        config = self.config
        heads = config.num_attention_heads
        width = config.hidden_size // heads
        bias = getattr(config, "attention_bias", True)
        qkv = native.dense(3 * config.hidden_size, "query_key_value", self.dtype, bias)(x_btd)
        qkv_bthe = qkv.reshape(*x_btd.shape[:2], heads, 3 * width)
        q_bthe, k_bthe, v_bthe = jnp.split(qkv_bthe, 3, axis=-1)
        q_bthe = native.apply_rotary(q_bthe, cos_btr, sin_btr)
        k_bthe = native.apply_rotary(k_bthe, cos_btr, sin_btr)
        out_btd = native.attend(q_bthe, k_bthe, v_bthe, mask_bts, width**-0.5)
        return native.dense(config.hidden_size, "dense", self.dtype, bias)(out_btd)


class NeoXMLP(nn.Module):
    config: object
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_btd):
        config = self.config
        up = native.dense(config.intermediate_size, "dense_h_to_4h", self.dtype)(x_btd)
        act = native.activation(config.hidden_act)(up)
        return native.dense(config.hidden_size, "dense_4h_to_h", self.dtype)(act)


class NeoXLayer(nn.Module):
    config: object
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h_btd, mask_bts, cos_btr, sin_btr):
        ln_attn = _layer_norm(self.config, "input_layernorm", self.dtype)
        ln_mlp = _layer_norm(self.config, "post_attention_layernorm", self.dtype)
        attention = NeoXAttention(self.config, dtype=self.dtype, name="attention")
        mlp = NeoXMLP(self.config, dtype=self.dtype, name="mlp")
        attn_btd = attention(ln_attn(h_btd), mask_bts, cos_btr, sin_btr)
        if self.config.use_parallel_residual:
            return mlp(ln_mlp(h_btd)) + attn_btd + h_btd  # PyTorch's order of the sum
        mid_btd = attn_btd + h_btd
        return mlp(ln_mlp(mid_btd)) + mid_btd


class NeoXModel(nn.Module):
    """`gpt_neox`: embedding, blocks, final LayerNorm."""

    config: object
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        config = self.config
        self.embed_in = nn.Embed(
            config.vocab_size, config.hidden_size, dtype=self.dtype, param_dtype=self.dtype
        )
        self.layers = native.LayerStack(NeoXLayer, config, dtype=self.dtype)
        self.final_layer_norm = _layer_norm(config, None, self.dtype)

    def __call__(self, input_ids_bt, attention_mask_bt, position_ids_bt):
        """Returns the final-normed output `[b, t, d]` and the L + 1 hidden states."""
        mask_bts = native.causal_mask(attention_mask_bt, input_ids_bt.shape[1])
        inv_freq = native.inverse_frequencies(self.config, rotary_dim(self.config))
        cos_btr, sin_btr = native.rotary_tables(position_ids_bt, inv_freq)
        h_btd, inputs = self.layers(self.embed_in(input_ids_bt), mask_bts, cos_btr, sin_btr)
        out_btd = self.final_layer_norm(h_btd)
        return out_btd, (*inputs, out_btd)


class NeoXForCausalLMModule(native.CausalLMModule):
    def setup(self):
        self.gpt_neox = NeoXModel(self.config, dtype=self.dtype)
        if not self.config.tie_word_embeddings:
            self.embed_out = native.dense(self.config.vocab_size, None, self.dtype, False)

    def base_model(self):
        return self.gpt_neox

    def unembed(self, out_btd):
        if self.config.tie_word_embeddings:
            return self.gpt_neox.embed_in.attend(out_btd)
        return self.embed_out(out_btd)


class FlaxGPTNeoXForCausalLM(native.NativeCausalLM):
    """GPT-NeoX causal LM (`model_type` "gpt_neox"), loaded from PyTorch-named weights."""

    module_class = NeoXForCausalLMModule
    base_model_prefix = "gpt_neox"


def unsupported_features(config) -> list[str]:
    """What in a GPT-NeoX config this implementation cannot reproduce (empty: all of it)."""
    problems = native.unsupported_rope(config)
    if config.hidden_act not in native.ACTIVATIONS:
        problems.append(f"hidden_act {config.hidden_act!r}")
    return problems
