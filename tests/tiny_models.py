"""Tiny random PyTorch transformers models, one per family, saved for jaxlens to load.

Every parameter (norms and biases included) is perturbed away from its initial value, so a
mistake in any of them (a norm read as 1, a bias dropped, a transposed kernel) shows in the
comparison. Llama, Mistral and Gemma use a non-default rope_theta, an explicit head_dim that is not
hidden_size // heads, tied embeddings and grouped-query attention, which transformers' stock Flax
classes get wrong. jaxlens's native families are set up the same way: GPT-NeoX with partial rotary
and a non-default base, Qwen2 (attention biases) tied, Qwen3 (q/k norms) untied; Gemma-2/3 with
soft-caps that bend, sliding windows shorter than the test sequences and both layer kinds,
OLMo-3's sliding layers, Phi-3's partial rotary and window, a SmolLM3 layer without RoPE.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import torch
import transformers

from jaxlens.lens import Translators

VOCAB = 97


def configs() -> dict[str, transformers.PretrainedConfig]:
    common_llama = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        rope_theta=500.0,
        tie_word_embeddings=True,
    )
    return {
        "gpt2": transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=3, n_head=4
        ),
        "gpt_neo": transformers.GPTNeoConfig(
            vocab_size=VOCAB,
            max_position_embeddings=64,
            hidden_size=32,
            num_layers=3,
            num_heads=4,
            attention_types=[[["global", "local", "global"], 1]],
            window_size=4,
        ),
        "gptj": transformers.GPTJConfig(
            vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=3, n_head=4, rotary_dim=4
        ),
        "opt": transformers.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=3,
            ffn_dim=48,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
        ),
        "bloom": transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=3, n_head=4),
        "llama": transformers.LlamaConfig(**common_llama),
        "mistral": transformers.MistralConfig(**common_llama, sliding_window=5),
        "gemma": transformers.GemmaConfig(
            **{**common_llama, "rope_theta": 1000.0}, hidden_activation="gelu_pytorch_tanh"
        ),
        "gpt_neox": transformers.GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=64,
            rotary_pct=0.5,
            rotary_emb_base=2000,
            use_parallel_residual=True,
        ),
        "qwen2": transformers.Qwen2Config(**{**common_llama, "rope_theta": 3000.0}),
        "qwen3": transformers.Qwen3Config(
            **{**common_llama, "rope_theta": 4000.0, "tie_word_embeddings": False}
        ),
        # Soft-caps small enough to bend the scores and logits, windows shorter than the test
        # sequences (12 tokens), and every layer kind present.
        "gemma2": transformers.Gemma2Config(
            **common_llama,
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=24,
            sliding_window=4,
            attn_logit_softcapping=0.5,
            final_logit_softcapping=1.0,
        ),
        "gemma3_text": transformers.Gemma3TextConfig(
            **{**common_llama, "rope_theta": 5000.0, "tie_word_embeddings": False},
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=20,
            sliding_window=4,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            rope_local_base_freq=300.0,
            rope_scaling={"rope_type": "linear", "factor": 4.0},
            final_logit_softcapping=3.0,
        ),
        "olmo2": transformers.Olmo2Config(**{**common_llama, "tie_word_embeddings": False}),
        "olmo3": transformers.Olmo3Config(
            **{**common_llama, "tie_word_embeddings": False},
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_scaling={"rope_type": "linear", "factor": 2.0},
        ),
        "phi3": transformers.Phi3Config(
            **{**common_llama, "tie_word_embeddings": False},
            partial_rotary_factor=0.5,
            sliding_window=5,
            pad_token_id=0,
        ),
        "smollm3": transformers.SmolLM3Config(
            **common_llama, no_rope_layers=[1, 0, 1], pad_token_id=0
        ),
        # Mixture of experts, top-2 of 4 or 8 experts of width 24: Mixtral renormalises the two
        # weights and slides a window shorter than the test sequences; Qwen3-MoE renormalises
        # and keeps layer 1 dense (`mlp_only_layers`); OLMoE does not renormalise and norms q/k
        # over whole projections (its heads are hidden_size // heads wide, no head_dim).
        "mixtral": transformers.MixtralConfig(
            **{**common_llama, "intermediate_size": 24, "tie_word_embeddings": False},
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=5,
        ),
        "qwen3_moe": transformers.Qwen3MoeConfig(
            **{**common_llama, "rope_theta": 4000.0},
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            mlp_only_layers=[1],
            norm_topk_prob=True,
        ),
        "olmoe": transformers.OlmoeConfig(
            **{**_without(common_llama, "head_dim"), "intermediate_size": 24},
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        ),
        # GPT-OSS: sliding (window 4) and full layers alternating, YaRN, attention sinks.
        "gpt_oss": transformers.GptOssConfig(
            **{**common_llama, "intermediate_size": 24, "tie_word_embeddings": False},
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=4,
            rope_scaling={
                "rope_type": "yarn",
                "factor": 4.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 16,
            },
        ),
    }


def _without(fields: dict, key: str) -> dict:
    return {k: v for k, v in fields.items() if k != key}


FAMILIES = tuple(configs())


def build(family: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A random PyTorch causal LM of `family` in float32, eval mode, all weights perturbed.

    `overrides` set config attributes first (e.g. `use_parallel_residual=False`).
    """
    torch.manual_seed(seed)
    config = configs()[family]
    for key, value in overrides.items():
        setattr(config, key, value)
    model = transformers.AutoModelForCausalLM.from_config(
        config, torch_dtype=torch.float32, attn_implementation="eager"
    )
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def save(model: transformers.PreTrainedModel, directory: Path, shard_size=None) -> Path:
    """Saves as safetensors (sharded when `shard_size` is given, e.g. "20KB")."""
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    return directory


def final_norm_module(model):
    """The PyTorch module a lens must use as the final norm."""
    family = model.config.model_type
    if family in ("gpt2", "gpt_neo", "gptj", "bloom"):
        return model.transformer.ln_f
    if family == "opt":
        return model.model.decoder.final_layer_norm
    if family == "gpt_neox":
        return model.gpt_neox.final_layer_norm
    return model.model.norm


def random_translators(num_layers, d, *, seed=0, scale=0.2, bias_scale=None, bias=True):
    """A non-zero translator bank (kernel ~ N(0, scale), bias ~ N(0, bias_scale or scale))."""
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(num_layers, d, d)) * scale
    bias_ld = rng.normal(size=(num_layers, d)) * (scale if bias_scale is None else bias_scale)
    return Translators(
        kernel_ldd=jnp.asarray(kernel, jnp.float32),
        bias_ld=jnp.asarray(bias_ld, jnp.float32) if bias else None,
    )
