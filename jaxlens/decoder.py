"""The model's own head: final norm then unembedding, as a small pytree a lens can carry.

A lens decodes a layer's residual stream with exactly the model's final norm and unembedding, so
we lift those few arrays out of the model's parameters into `Decoder`. It is a pytree (arrays are
leaves, the norm kind and epsilon are static), so it can be passed into `jax.jit`, sharded, and
differentiated through without touching the rest of the model.

Some models bend their logits after the unembedding: Gemma-2 soft-caps them, `c * tanh(z / c)`
with c = `final_logit_softcapping` (30). That is part of the model's output distribution, so it is
part of the head: `unembed` applies it, and every lens's logits (training losses, evaluation,
trajectories) are capped as the model's own are.

Axis letters used in names throughout jaxlens: b batch, t token position, d model width,
v vocabulary, l layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxlens import precision

NORM_KINDS = ("layernorm", "rmsnorm", "gemma_rmsnorm", "none")


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """`cap * tanh(x / cap)`, Gemma-2's soft-cap of logits and attention scores (x without one)."""
    if cap is None:
        return x
    return jnp.tanh(x / cap) * cap


@struct.dataclass
class Decoder:
    """Final norm + unembedding of a causal LM.

    Attributes:
      unembed_vd: the unembedding matrix `[vocab, d]` (torch `lm_head.weight` layout).
      unembed_bias_v: the lm_head bias `[vocab]`, or None (only GPT-J has one here).
      norm_scale_d: the final norm's scale `[d]` (Gemma: the gamma in `1 + gamma`), or None.
      norm_bias_d: the final LayerNorm's bias `[d]`, or None.
      norm_kind: one of NORM_KINDS.
      eps: the final norm's epsilon, the model's own.
      logit_softcap: c of the final soft-cap `c * tanh(z / c)` (Gemma-2), or None.
    """

    unembed_vd: jax.Array
    unembed_bias_v: jax.Array | None
    norm_scale_d: jax.Array | None
    norm_bias_d: jax.Array | None
    norm_kind: str = struct.field(pytree_node=False)
    eps: float = struct.field(pytree_node=False)
    logit_softcap: float | None = struct.field(pytree_node=False, default=None)

    def final_norm(self, h_d: jax.Array) -> jax.Array:
        """Applies the final norm over the last axis, computing in float32.

        Args:
          h_d: residual-stream vectors `[..., d]`, any float dtype.
        Returns:
          normalised vectors `[..., d]` in float32.
        """
        h = h_d.astype(jnp.float32)
        if self.norm_kind == "layernorm":
            centred = h - h.mean(-1, keepdims=True)
            h = centred * jax.lax.rsqrt((centred**2).mean(-1, keepdims=True) + self.eps)
        elif self.norm_kind in ("rmsnorm", "gemma_rmsnorm"):
            h = h / jnp.sqrt((h**2).mean(-1, keepdims=True) + self.eps)
        gain_d, bias_d = self.norm_affine()
        if gain_d is not None:
            h = h * gain_d
        if bias_d is not None:
            h = h + bias_d
        return h

    def norm_affine(self) -> tuple[jax.Array | None, jax.Array | None]:
        """The final norm's elementwise affine part `x * gain + bias`, float32 (None: absent):
        the gain is the scale, or `1 + scale` for Gemma's norm."""
        gain_d = bias_d = None
        if self.norm_scale_d is not None:
            scale = self.norm_scale_d.astype(jnp.float32)
            gain_d = 1.0 + scale if self.norm_kind == "gemma_rmsnorm" else scale
        if self.norm_bias_d is not None:
            bias_d = self.norm_bias_d.astype(jnp.float32)
        return gain_d, bias_d

    def unembed(self, h_d: jax.Array) -> jax.Array:
        """Maps normalised vectors to logits with float32 accumulation (soft-capped if the
        model caps its logits).

        Args:
          h_d: `[..., d]`; cast to the unembedding's dtype for the matmul.
        Returns:
          logits `[..., vocab]` in float32.
        """
        logits = precision.einsum("...d,vd->...v", self._matmul_input(h_d), self.unembed_vd)
        if self.unembed_bias_v is not None:
            logits = logits + self.unembed_bias_v.astype(jnp.float32)
        return self.cap(logits)

    def _matmul_input(self, h_d: jax.Array) -> jax.Array:
        return h_d.astype(self.unembed_vd.dtype)

    def unembed_input(self, h_d: jax.Array) -> jax.Array:
        """Normalised vectors `[..., d]` as `unembed`'s matmul reads them (rounded to the
        unembedding's dtype), in float32."""
        return self._matmul_input(h_d).astype(jnp.float32)

    @property
    def linear_logits(self) -> bool:
        """Whether logits are affine in the normalised vector, `x W + b` (no soft-cap)."""
        return self.logit_softcap is None

    def cap(self, logits: jax.Array) -> jax.Array:
        """The final soft-cap `c * tanh(z / c)` of raw logits (identity without one)."""
        return soft_cap(logits, self.logit_softcap)

    def __call__(self, h_d: jax.Array) -> jax.Array:
        """Logits `[..., vocab]` of un-normalised residual vectors `[..., d]`."""
        return self.unembed(self.final_norm(h_d))

    @property
    def d_model(self) -> int:
        return self.unembed_vd.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.unembed_vd.shape[0]
