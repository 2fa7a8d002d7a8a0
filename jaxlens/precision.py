"""The matmul rule of the lens's own products: translators, the unembedding, vocabulary sums.

Left at the default precision, XLA rounds float32 matmul operands to bfloat16 on TPU (one pass)
and to TF32 on GPU: 3 significant digits where the translators, their gradients and the float32
logits are meant to carry 7, and the tests' CPU and PyTorch references never see it. So every
product here asks for `HIGHEST` (full float32 passes; on CPU a no-op) and accumulates in float32.
Operands already in bfloat16 (a bfloat16 model's unembedding and the vectors cast to meet it)
are exact in one bfloat16 pass, so for them the rule costs nothing and only the float32
accumulation matters. The model's own layers keep their default: they are the subject, as shipped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PRECISION = jax.lax.Precision.HIGHEST


def einsum(spec: str, *operands: jax.Array) -> jax.Array:
    """`jnp.einsum` at full operand precision with float32 accumulation and result."""
    return jnp.einsum(spec, *operands, precision=PRECISION, preferred_element_type=jnp.float32)
