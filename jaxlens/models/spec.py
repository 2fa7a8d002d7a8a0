"""`DecoderSpec`: everything in which one decoder-only family differs from another, as data.

The native decoder (`native`) is one implementation; a family is a `DecoderSpec` built from its
Hugging Face config (`specs`). Fields fall in four groups: sizes; module names (so parameter
paths mirror the PyTorch checkpoint names); the block's shape (norm kind and placement, parallel
residual, projection layouts, QK-norm, scale and soft-caps, embedding scale, tied head); and one
`LayerSpec` per layer (its sliding window, its rotary embedding or none, its MLP kind).
"""

from __future__ import annotations

import dataclasses

from jaxlens.models.moe import MoESpec
from jaxlens.models.rotary import Rope


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """What may change from one layer to the next.

    Attributes:
      sliding_window: the attention window w (query i sees keys i - w < j <= i), None: global.
      rope: the layer's rotary embedding, None for a layer without position encoding (NoPE).
      mlp: the kind of feed-forward block, "dense" or "moe" (see `mlp.mlp_module`).
    """

    sliding_window: int | None
    rope: Rope | None
    mlp: str = "dense"


@dataclasses.dataclass(frozen=True)
class Norms:
    """Parameter names of a block's norms by position; None where the family has none.

    Pre-norm families (Llama) norm the input of attention and of the MLP; OLMo-2/3 norm only the
    outputs; Gemma-2/3 do both. Note that Llama's `post_attention_layernorm` is the MLP's input
    norm while Gemma's is the attention output's: the names are the checkpoints', the positions
    ours.
    """

    pre_attention: str | None
    post_attention: str | None
    pre_mlp: str | None
    post_mlp: str | None


PRE_NORMS = Norms("input_layernorm", None, "post_attention_layernorm", None)
SANDWICH_NORMS = Norms(
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)
POST_NORMS = Norms(None, "post_attention_layernorm", None, "post_feedforward_layernorm")


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    """A decoder-only causal LM, as data.

    Attributes:
      vocab_size, hidden_size, intermediate_size, num_heads, num_kv_heads, head_dim: sizes.
      layers: one `LayerSpec` per block.
      base_name, embed_name, final_norm_name, head_name, attention_name, mlp_name,
        out_proj_name: PyTorch module names ("model", "embed_tokens", "norm", "lm_head",
        "self_attn", "mlp", "o_proj" for Llama-style families).
      norm_kind: one of `norms.KINDS`, for every norm of the model (QK-norms included).
      norm_eps: the norms' epsilon.
      norms: the block's norm positions and names.
      parallel_residual: GPT-NeoX's `h + attn(ln1(h)) + mlp(ln2(h))`.
      activation: a transformers activation name.
      mlp_layout: the dense MLP's layout (`mlp.LAYOUTS`).
      mlp_bias: biases in the MLP's Linear layers.
      qkv_layout: "separate", "fused" (Phi-3 `qkv_proj`) or "per_head_fused" (NeoX).
      qkv_bias, out_bias: biases of the q/k/v projections and of the output projection.
      qk_norm: None, "per_head" (Qwen3, Gemma-3) or "full" (OLMo-2/3).
      attn_scale: the factor on q.k (1/sqrt(head_dim), or query_pre_attn_scalar ** -0.5).
      attn_softcap: Gemma-2's soft-cap of the attention scores, or None.
      attn_sinks: GPT-OSS's learnt per-head sink logit in each softmax (parameter `sinks`).
      final_softcap: Gemma-2's soft-cap of the output logits, or None.
      embed_scale: multiply the embeddings by sqrt(hidden_size) (Gemma), rounded to the dtype.
      tie_embeddings: the unembedding is the input embedding.
      moe: the routed experts of the "moe" layers (Mixtral, Qwen3-MoE, OLMoE, GPT-OSS), else
        None (dense models).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layers: tuple[LayerSpec, ...]
    base_name: str = "model"
    embed_name: str = "embed_tokens"
    final_norm_name: str = "norm"
    head_name: str = "lm_head"
    attention_name: str = "self_attn"
    mlp_name: str = "mlp"
    out_proj_name: str = "o_proj"
    norm_kind: str = "rmsnorm"
    norm_eps: float = 1e-6
    norms: Norms = PRE_NORMS
    parallel_residual: bool = False
    activation: str = "silu"
    mlp_layout: str = "gated"
    mlp_bias: bool = False
    qkv_layout: str = "separate"
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: str | None = None
    attn_scale: float = 1.0
    attn_softcap: float | None = None
    attn_sinks: bool = False
    final_softcap: float | None = None
    embed_scale: bool = False
    tie_embeddings: bool = False
    moe: MoESpec | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def ropes(self) -> tuple[Rope, ...]:
        """The distinct rotary embeddings the layers use (tables are built once for each)."""
        return tuple(dict.fromkeys(layer.rope for layer in self.layers if layer.rope is not None))

    @property
    def windows(self) -> tuple[int | None, ...]:
        """The distinct sliding windows (None: global) the layers use."""
        return tuple(dict.fromkeys(layer.sliding_window for layer in self.layers))
