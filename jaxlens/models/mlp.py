"""The per-layer MLP slot of the native decoder, and its dense MLPs.

`mlp_module(spec, layer, dtype)` builds the module a layer's `LayerSpec.mlp` names; it is the one
place a new kind of feed-forward block plugs in. Every kind is a linen module called as
`module(x_btd) -> y_btd`, its parameters named as the family's PyTorch module (under
`spec.mlp_name`). The dense layouts:

* "gated": `down(act(gate(x)) * up(x))` with `gate_proj`/`up_proj`/`down_proj` (Llama, Qwen,
  Gemma, OLMo, SmolLM3);
* "fused_gated": Phi-3's `gate_up_proj`, whose output is `[gate | up]`, then `down_proj`;
* "plain": GPT-NeoX's `dense_4h_to_h(act(dense_h_to_4h(x)))`, with biases.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from jaxlens.models import moe
from jaxlens.models.attention import dense

ACTIVATIONS = {
    "gelu": functools.partial(nn.gelu, approximate=False),  # PyTorch's exact (erf) GELU
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "gelu_fast": functools.partial(nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
}
LAYOUTS = ("gated", "fused_gated", "plain")


def activation(name: str):
    """The JAX function of a transformers `hidden_act` name (ValueError when we lack it)."""
    if name not in ACTIVATIONS:
        raise ValueError(
            f"Activation {name!r} is not supported by jaxlens's native models; supported: "
            f"{', '.join(ACTIVATIONS)}."
        )
    return ACTIVATIONS[name]


class DenseMLP(nn.Module):
    """A dense feed-forward block `[b, t, d] -> [b, t, d]` of one of the LAYOUTS."""

    spec: object
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_btd):
        spec, dtype = self.spec, self.dtype
        width, bias = spec.intermediate_size, spec.mlp_bias
        act = activation(spec.activation)
        if spec.mlp_layout == "plain":
            up = dense(width, "dense_h_to_4h", dtype, bias)(x_btd)
            return dense(spec.hidden_size, "dense_4h_to_h", dtype, bias)(act(up))
        if spec.mlp_layout == "fused_gated":
            gate, up = jnp.split(dense(2 * width, "gate_up_proj", dtype, bias)(x_btd), 2, axis=-1)
        else:
            gate = dense(width, "gate_proj", dtype, bias)(x_btd)
            up = dense(width, "up_proj", dtype, bias)(x_btd)
        return dense(spec.hidden_size, "down_proj", dtype, bias)(act(gate) * up)


def mlp_module(spec, layer, dtype) -> nn.Module:
    """The feed-forward module of one layer, by `layer.mlp` (the decoder's MLP slot).

    Args:
      spec: the `DecoderSpec`.
      layer: the layer's `LayerSpec`; `layer.mlp` is "dense" or "moe" (`moe.RoutedExperts`,
        named after the family's sparse block, e.g. Mixtral's "block_sparse_moe").
      dtype: parameter and computation dtype.
    Returns:
      an unbound linen module named `spec.mlp_name`, called as `module(x_btd) -> y_btd`.
    """
    if layer.mlp == "dense":
        return DenseMLP(spec, dtype=dtype, name=spec.mlp_name)
    if layer.mlp == "moe":
        act = activation(spec.moe.activation)
        return moe.RoutedExperts(
            spec.moe, spec.hidden_size, act, dtype=dtype, name=spec.moe.block_name
        )
    raise ValueError(f"MLP kind {layer.mlp!r} is not built by jaxlens's native decoder.")
