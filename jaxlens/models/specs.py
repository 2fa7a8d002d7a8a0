"""Hugging Face configs to `DecoderSpec`s: each native family's differences, read from its config.

One builder per `model_type`, each a few lines of data: GPT-NeoX, Qwen2, Qwen3, Gemma-2,
Gemma-3 (text, `gemma3_text`), OLMo-2, OLMo-3, Phi-3 and SmolLM3, and the mixture-of-experts
Mixtral, Qwen3-MoE, OLMoE and GPT-OSS (their sparse layers' MLP slot "moe", `moe.MoESpec` read
from the config by `moe.moe_spec`; GPT-OSS's attention sinks a `DecoderSpec` flag).
`unsupported_features` lists what in a config the decoder does not reproduce, naming the config
field, so that loading refuses it instead of approximating: rope scalings other than
`rotary.SCALINGS`, unknown activations, bidirectional Gemma-3, a sliding layer without a window,
partial rotary where the family's PyTorch code rotates whole heads.

Per-layer kinds follow transformers 4.57.6: a layer slides when `layer_types[i]` says
"sliding_attention" (Gemma-2/3, OLMo-3, Qwen2/3 with `use_sliding_window`, SmolLM3), or, for
Phi-3 whose configs have no layer types, on every layer when `sliding_window` is set. Gemma-3's
sliding layers rotate with `rope_local_base_freq` and no scaling, OLMo-3's with the global base and
no scaling; SmolLM3's layers with `no_rope_layers[i] == 0` have no rotary embedding.
"""

from __future__ import annotations

import dataclasses

from jaxlens.models import mlp, moe, rotary
from jaxlens.models.rotary import head_dim
from jaxlens.models.spec import POST_NORMS, SANDWICH_NORMS, DecoderSpec, LayerSpec


def _sliding(config, i: int) -> bool:
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return layer_types[i] == "sliding_attention"
    return getattr(config, "sliding_window", None) is not None  # Phi-3: every layer or none


def _layers(config, rope: rotary.Rope, local_rope: rotary.Rope | None = None, nope=()):
    """One `LayerSpec` per layer: its window, its rope (the local one on sliding layers, none on
    the layers in `nope`)."""
    layers = []
    for i in range(config.num_hidden_layers):
        sliding = _sliding(config, i)
        layer_rope = (local_rope or rope) if sliding else rope
        layers.append(
            LayerSpec(
                sliding_window=config.sliding_window if sliding else None,
                rope=None if i in nope else layer_rope,
            )
        )
    return tuple(layers)


def _llama_like(config, layers=None, **fields) -> DecoderSpec:
    """A Llama-shaped spec (pre-RMSNorm, SwiGLU, separate q/k/v) with `fields` changed."""
    width = head_dim(config)
    defaults = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=width,
        layers=layers if layers is not None else _layers(config, rotary.rope_of(config)),
        norm_eps=config.rms_norm_eps,
        activation=_activation(config),
        attn_scale=width**-0.5,
        tie_embeddings=bool(config.tie_word_embeddings),
    )
    return DecoderSpec(**{**defaults, **fields})


def _activation(config) -> str:
    # Gemma's MLPs read `hidden_activation`; the others `hidden_act`.
    if config.model_type.startswith("gemma"):
        return config.hidden_activation
    return config.hidden_act


def _neox(config) -> DecoderSpec:
    width = config.hidden_size // config.num_attention_heads
    rope = rotary.rope_of(config, rotary_dim=int(width * config.rotary_pct))
    bias = bool(getattr(config, "attention_bias", True))
    return DecoderSpec(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_attention_heads,
        head_dim=width,
        layers=tuple(LayerSpec(None, rope) for _ in range(config.num_hidden_layers)),
        base_name="gpt_neox",
        embed_name="embed_in",
        final_norm_name="final_layer_norm",
        head_name="embed_out",
        attention_name="attention",
        out_proj_name="dense",
        norm_kind="layernorm",
        norm_eps=config.layer_norm_eps,
        parallel_residual=bool(config.use_parallel_residual),
        activation=config.hidden_act,
        mlp_layout="plain",
        mlp_bias=True,
        qkv_layout="per_head_fused",
        qkv_bias=bias,
        out_bias=bias,
        attn_scale=width**-0.5,
        tie_embeddings=bool(config.tie_word_embeddings),
    )


def _qwen2(config) -> DecoderSpec:
    return _llama_like(config, qkv_bias=True)  # biases on q/k/v, none on o_proj


def _qwen3(config) -> DecoderSpec:
    bias = bool(getattr(config, "attention_bias", False))
    return _llama_like(config, qkv_bias=bias, out_bias=bias, qk_norm="per_head")


def _gemma(config, **fields) -> DecoderSpec:
    bias = bool(config.attention_bias)
    return _llama_like(
        config,
        norm_kind="gemma_rmsnorm",
        norms=SANDWICH_NORMS,
        qkv_bias=bias,
        out_bias=bias,
        attn_scale=float(config.query_pre_attn_scalar) ** -0.5,
        embed_scale=True,
        final_softcap=config.final_logit_softcapping,
        **fields,
    )


def _gemma2(config) -> DecoderSpec:
    return _gemma(config, attn_softcap=config.attn_logit_softcapping)


def _gemma3_text(config) -> DecoderSpec:
    # Gemma-3's attention passes no soft-cap to its attention function, whatever
    # `attn_logit_softcapping` says (released configs set it to null), so neither do we.
    rope = rotary.rope_of(config)
    local = rotary.rope_of(config, theta=float(config.rope_local_base_freq), scaling=())
    return _gemma(config, layers=_layers(config, rope, local), qk_norm="per_head")


def _olmo(config) -> DecoderSpec:
    bias = bool(config.attention_bias)
    rope = rotary.rope_of(config)
    local = dataclasses.replace(rope, scaling=())  # OLMo-3's sliding layers: "default" rope
    return _llama_like(
        config,
        layers=_layers(config, rope, local),
        norm_kind="rmsnorm_f32_scale",
        norms=POST_NORMS,
        qkv_bias=bias,
        out_bias=bias,
        qk_norm="full",
    )


def _phi3(config) -> DecoderSpec:
    factor = getattr(config, "partial_rotary_factor", 1.0) or 1.0
    rope = rotary.rope_of(config, rotary_dim=int(head_dim(config) * factor))
    return _llama_like(
        config, layers=_layers(config, rope), qkv_layout="fused", mlp_layout="fused_gated"
    )


def _smollm3(config) -> DecoderSpec:
    nope = {i for i, use_rope in enumerate(config.no_rope_layers) if not use_rope}
    bias = bool(config.attention_bias)
    return _llama_like(
        config,
        layers=_layers(config, rotary.rope_of(config), nope=nope),
        qkv_bias=bias,
        out_bias=bias,
        mlp_bias=bool(config.mlp_bias),
    )


def _with_experts(config, spec: DecoderSpec) -> DecoderSpec:
    """`spec` with routed experts in the MLP slot of the layers that route (Qwen3-MoE may keep
    some dense, with `intermediate_size`)."""
    layers = tuple(
        dataclasses.replace(layer, mlp="moe" if sparse else "dense")
        for layer, sparse in zip(spec.layers, moe.sparse_layers(config), strict=True)
    )
    return dataclasses.replace(spec, layers=layers, moe=moe.moe_spec(config))


def _mixtral(config) -> DecoderSpec:
    return _with_experts(config, _llama_like(config))  # a window, when set, on every layer


def _qwen3_moe(config) -> DecoderSpec:
    return _with_experts(config, _qwen3(config))


def _olmoe(config) -> DecoderSpec:
    bias = bool(config.attention_bias)
    spec = _llama_like(config, qkv_bias=bias, out_bias=bias, qk_norm="full")
    return _with_experts(config, spec)


def _gpt_oss(config) -> DecoderSpec:
    # Alternating sliding/full layers from `layer_types`, YaRN rope, biases on every attention
    # projection, attention sinks, norms that scale in float32.
    spec = _llama_like(
        config, qkv_bias=True, out_bias=True, norm_kind="rmsnorm_f32_scale", attn_sinks=True
    )
    return _with_experts(config, spec)


BUILDERS = {
    "gpt_neox": _neox,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma2": _gemma2,
    "gemma3_text": _gemma3_text,
    "olmo2": _olmo,
    "olmo3": _olmo,
    "phi3": _phi3,
    "smollm3": _smollm3,
    "mixtral": _mixtral,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "gpt_oss": _gpt_oss,
}
FAMILIES = tuple(BUILDERS)
_PARTIAL_ROTARY = ("gpt_neox", "phi3")  # whose PyTorch attention rotates part of each head


def spec_of(config) -> DecoderSpec:
    """The `DecoderSpec` of a native family's config (see `unsupported_features` first)."""
    return BUILDERS[config.model_type](config)


def unsupported_features(config) -> list[str]:
    """What in a native family's config the decoder cannot reproduce (empty: all of it), each
    naming the config field."""
    problems = rotary.unsupported_scaling(config)
    model_type = config.model_type
    act = _activation(config)
    if act not in mlp.ACTIVATIONS:
        field = "hidden_activation" if model_type.startswith("gemma") else "hidden_act"
        problems.append(f"{field} {act!r}")
    if getattr(config, "use_bidirectional_attention", False):
        problems.append("use_bidirectional_attention=True (the decoder is causal)")
    factor = getattr(config, "partial_rotary_factor", 1.0)
    if model_type not in _PARTIAL_ROTARY and factor not in (None, 1.0):
        problems.append(f"partial_rotary_factor={factor} (this family rotates whole heads)")
    layer_types = getattr(config, "layer_types", None) or []
    if "sliding_attention" in layer_types and not getattr(config, "sliding_window", None):
        problems.append("layer_types has sliding_attention layers but sliding_window is not set")
    if model_type in moe.FAMILY_NAMES:
        problems += moe.unsupported_features(config)
    if getattr(config, "clip_qkv", None) is not None:  # OLMoE's option
        problems.append(f"clip_qkv={config.clip_qkv} (q, k and v are not clamped)")
    width = config.hidden_size // config.num_attention_heads
    if model_type == "olmoe" and getattr(config, "head_dim", None) not in (None, width):
        problems.append(f"head_dim={config.head_dim} (OLMoE's heads are hidden_size // heads)")
    return problems
