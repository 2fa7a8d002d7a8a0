"""The logit lens and the tuned lens.

The logit lens decodes layer l's residual stream h_l with the model's own head:
`logits_l = unembed(final_norm(h_l))`. The tuned lens first moves h_l into the final layer's basis
with a learned affine translator, written residually:

    logits_l = unembed(final_norm(h_l + h_l @ W_l + b_l)),    W_l, b_l initialised to zero.

The residual form means an untrained tuned lens *is* the logit lens, and weight decay pulls each
translator towards the identity map rather than towards zero (a zero map would erase the layer).
All L translators live in one bank, `kernel_ldd [L, d, d]` and `bias_ld [L, d]`, so every layer is
translated by one einsum over the layer axis. The bank stays float32 whatever the model's dtype.

Both lenses are pytrees (`flax.struct`), so they pass through `jax.jit`, `jax.grad` and sharding
as they are. Axis letters: l layer, b batch, t token, d model width, v vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxlens import precision
from jaxlens.decoder import Decoder


def translate(kernel_dd: jax.Array, bias_d: jax.Array | None, h_d: jax.Array) -> jax.Array:
    """One translator in residual form, in float32: `h + h @ kernel (+ bias)` over `[..., d]`."""
    h = h_d.astype(jnp.float32)
    moved = h + precision.einsum("...d,de->...e", h, kernel_dd)
    return moved if bias_d is None else moved + bias_d


@struct.dataclass
class Translators:
    """The bank of affine translators, one per layer.

    Attributes:
      kernel_ldd: `[L, d_in, d_out]`, applied as `h @ kernel` (the transpose of torch's Linear
        weight layout), float32.
      bias_ld: `[L, d]` float32, or None for a lens without bias.
    """

    kernel_ldd: jax.Array
    bias_ld: jax.Array | None

    @classmethod
    def zeros(cls, num_layers: int, d_model: int, bias: bool = True) -> Translators:
        """An untrained bank: every translator is the identity (in residual form)."""
        return cls(
            kernel_ldd=jnp.zeros((num_layers, d_model, d_model), jnp.float32),
            bias_ld=jnp.zeros((num_layers, d_model), jnp.float32) if bias else None,
        )

    @property
    def num_layers(self) -> int:
        return self.kernel_ldd.shape[0]

    @property
    def d_model(self) -> int:
        return self.kernel_ldd.shape[-1]


@struct.dataclass
class LogitLens:
    """Decodes every layer with the model's own final norm and unembedding."""

    decoder: Decoder

    def transform_hidden(self, h_btd: jax.Array, layer: int | jax.Array) -> jax.Array:
        del layer  # the logit lens leaves every layer as it is
        return h_btd.astype(jnp.float32)

    def transform_all(self, h_lbtd: jax.Array) -> jax.Array:
        return h_lbtd.astype(jnp.float32)

    def layer_logits(self, h_btd: jax.Array, layer: int | jax.Array) -> jax.Array:
        """Logits `[..., V]` of one layer's hidden states `[..., d]`."""
        return self.decoder(self.transform_hidden(h_btd, layer))

    def all_logits(self, h_lbtd: jax.Array) -> jax.Array:
        """Logits `[L, ..., V]` of hidden states `[L, ..., d]` (all V-wide logits at once)."""
        return self.decoder(self.transform_all(h_lbtd))


@struct.dataclass
class TunedLens(LogitLens):
    """A logit lens preceded by one learned affine translator per layer."""

    translators: Translators

    @classmethod
    def untrained(cls, decoder: Decoder, num_layers: int, bias: bool = True) -> TunedLens:
        return cls(
            decoder=decoder, translators=Translators.zeros(num_layers, decoder.d_model, bias)
        )

    @property
    def num_layers(self) -> int:
        return self.translators.num_layers

    def transform_hidden(self, h_btd: jax.Array, layer: int | jax.Array) -> jax.Array:
        """h + h @ W_layer + b_layer, in float32. `layer` may be a traced index."""
        bias = self.translators.bias_ld
        return translate(
            self.translators.kernel_ldd[layer], None if bias is None else bias[layer], h_btd
        )

    def transform_all(self, h_lbtd: jax.Array) -> jax.Array:
        """Translates all L layers at once: `[L, ..., d] -> [L, ..., d]`, one einsum."""
        if h_lbtd.shape[0] != self.num_layers:
            raise ValueError(
                f"Expected hidden states of {self.num_layers} layers (the lens's translators); "
                f"got {h_lbtd.shape[0]}. Pass hidden_lbtd[:-1]: the last entry is the output."
            )
        h = h_lbtd.astype(jnp.float32)
        out = h + precision.einsum("l...d,lde->l...e", h, self.translators.kernel_ldd)
        if self.translators.bias_ld is not None:
            bias = self.translators.bias_ld.reshape(
                (self.num_layers,) + (1,) * (h.ndim - 2) + (-1,)
            )
            out = out + bias
        return out
