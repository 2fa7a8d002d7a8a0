"""The norms of the native decoder, each rounding where its PyTorch module rounds.

* "layernorm": GPT-NeoX's LayerNorm (scale and bias, two-pass variance).
* "rmsnorm": Llama/Qwen/Phi-3/SmolLM3: normalise in float32, cast back, then scale by `weight`.
* "rmsnorm_f32_scale": OLMo-2/3: normalise and scale by `weight` in float32, then cast back.
* "gemma_rmsnorm": Gemma-2/3: normalise and scale by `1 + weight` in float32, then cast back.

In float32 the three RMSNorms differ only in `1 + w`; in 16 bits they round differently, as in
PyTorch.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

KINDS = ("layernorm", "rmsnorm", "rmsnorm_f32_scale", "gemma_rmsnorm")


class RMSNorm(nn.Module):
    """RMSNorm over the last axis; `kind` says where it rounds and whether it scales by 1 + w."""

    features: int
    eps: float
    kind: str = "rmsnorm"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.kind == "gemma_rmsnorm" else nn.initializers.ones
        weight = self.param("weight", init, (self.features,), self.dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt((x32**2).mean(-1, keepdims=True) + self.eps)
        if self.kind == "gemma_rmsnorm":
            return (normed * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
        if self.kind == "rmsnorm_f32_scale":
            return (weight * normed).astype(x.dtype)
        return weight * normed.astype(x.dtype)


def make_norm(kind: str, features: int, eps: float, dtype, name: str | None) -> nn.Module:
    """The norm module of `kind` (one of KINDS), parameters named as in PyTorch."""
    if kind == "layernorm":
        # Two-pass variance (mean of squared deviations), not Flax's default E[x^2] - E[x]^2.
        return nn.LayerNorm(
            epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=dtype, name=name
        )
    if kind not in KINDS:
        raise ValueError(f"norm kind {kind!r} is not one of {', '.join(KINDS)}")
    return RMSNorm(features, eps, kind=kind, dtype=dtype, name=name)
