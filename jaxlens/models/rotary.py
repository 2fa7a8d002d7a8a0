"""Rotary position embeddings (RoPE) as PyTorch transformers computes them, bit for bit in float32.

A `Rope` is the static description of one rotary embedding: how many dims of each head rotate,
the base, and the scaling scheme of the config's `rope_scaling`. Families use one (Llama, Qwen,
NeoX, Phi-3) or two (Gemma-3's local layers their own base, OLMo-3's sliding layers unscaled).
Inverse frequencies are computed in float32 with numpy by the same steps as transformers'
`ROPE_INIT_FUNCTIONS` (agreeing to an ulp or two: numpy's and torch's float32 `pow` may differ
in the last bit); cos and sin tables are built once per forward and shared by the layers that
use the same `Rope`.

Supported scalings: "default", "linear" (positions slowed by `factor`), "llama3" (Llama 3.1's
band-wise interpolation), "longrope" (Phi-3's per-frequency factors, short or long by the
sequence length, with its attention factor) and "yarn" (interpolated below a ramp of rotation
counts, extrapolated above, with its attention factor; OLMo-3, Qwen3 long-context). Anything else
("dynamic", which changes with the sequence length in a way a compiled forward does not follow) is
refused by `unsupported_scaling`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

SCALINGS = ("default", "linear", "llama3", "longrope", "yarn")


@dataclasses.dataclass(frozen=True)
class Rope:
    """One rotary embedding.

    Attributes:
      rotary_dim: how many leading dims of each head rotate (the rest pass through).
      theta: the base of the frequencies.
      scaling: the `rope_scaling` dict as sorted (key, value) pairs, values made hashable; empty
        for the default rope.
      original_max_positions: the pretraining context for longrope (which factors apply).
      max_positions: the config's `max_position_embeddings` (longrope's attention factor).
    """

    rotary_dim: int
    theta: float
    scaling: tuple = ()
    original_max_positions: int | None = None
    max_positions: int | None = None

    @property
    def kind(self) -> str:
        options = dict(self.scaling)
        return options.get("rope_type", options.get("type", "default"))


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


def scaling_of(config) -> tuple:
    """The config's `rope_scaling` as a hashable tuple (empty when none)."""
    scaling = getattr(config, "rope_scaling", None) or {}
    return tuple(sorted((k, _hashable(v)) for k, v in scaling.items()))


def unsupported_scaling(config) -> list[str]:
    """Reasons (empty if none) why jaxlens cannot reproduce the config's `rope_scaling`."""
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in SCALINGS:
        return []
    return [f"rope_scaling type {kind!r} (supported: {', '.join(SCALINGS)})"]


def head_dim(config) -> int:
    """The per-head width: `config.head_dim` when set, else hidden_size // heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_of(config, rotary_dim: int | None = None, **changes) -> Rope:
    """The `Rope` a config describes (`changes` override fields, e.g. a local base)."""
    rope = Rope(
        rotary_dim=rotary_dim or head_dim(config),
        theta=float(getattr(config, "rope_theta", None) or 10000.0),
        scaling=scaling_of(config),
        original_max_positions=getattr(config, "original_max_position_embeddings", None),
        max_positions=getattr(config, "max_position_embeddings", None),
    )
    return dataclasses.replace(rope, **changes)


def inverse_frequencies(rope: Rope, tokens: int | None = None) -> tuple[np.ndarray, float]:
    """Inverse frequencies `[rotary_dim // 2]` (float32) and the factor on cos and sin.

    Args:
      rope: the embedding.
      tokens: the sequence length (longrope uses its long factors beyond the original context).
    Returns:
      `(inv_freq, attention_scaling)`; the scaling is 1 except for longrope.
    """
    dim = rope.rotary_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    powers = (np.float32(rope.theta) ** exponents).astype(np.float32)
    options = dict(rope.scaling)
    kind = rope.kind
    if kind == "default":
        return (1.0 / powers).astype(np.float32), 1.0
    if kind == "linear":
        return ((1.0 / powers) / np.float32(options["factor"])).astype(np.float32), 1.0
    if kind == "llama3":
        return _llama3_scaled((1.0 / powers).astype(np.float32), options), 1.0
    if kind == "longrope":
        return _longrope(rope, powers, options, tokens)
    if kind == "yarn":
        return _yarn(rope, powers, options)
    raise NotImplementedError(f"rope_scaling type {kind!r} (supported: {', '.join(SCALINGS)})")


def _llama3_scaled(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
    # Llama 3.1's scheme: long wavelengths are slowed by `factor`, short ones kept, and the band
    # between is interpolated smoothly in 1/wavelength.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelength = 2 * np.pi / inv_freq
    scaled = np.where(wavelength > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= context / high) & (wavelength <= context / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _longrope(rope: Rope, powers, options, tokens):
    # Phi-3's LongRoPE: each frequency divided by its own factor, the short list within the
    # pretraining context and the long one beyond it (transformers switches on the largest
    # position + 1, which here is the sequence length); cos and sin are scaled by the attention
    # factor sqrt(1 + ln(s) / ln(original context)) with s the context extension.
    original = rope.original_max_positions
    factor = options.get("factor")
    if original:
        factor = rope.max_positions / original
    else:
        original = rope.max_positions
    attention_factor = options.get("attention_factor")
    if attention_factor is None:
        attention_factor = (
            1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        )
    long = tokens is not None and tokens > original
    ext = np.asarray(options["long_factor" if long else "short_factor"], np.float32)
    return (1.0 / (ext * powers)).astype(np.float32), float(attention_factor)


def _yarn(rope: Rope, powers, options):
    # YaRN: frequencies that turn fewer than `beta_slow` times over the original context are
    # interpolated (divided by `factor`), those turning more than `beta_fast` times kept, with a
    # linear ramp between; cos and sin are scaled by 0.1 ln(factor) + 1 (or the mscale ratio).
    dim, base, factor = rope.rotary_dim, rope.theta, options["factor"]
    original = options.get("original_max_position_embeddings") or rope.max_positions

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = options.get("attention_factor")
    if attention_factor is None:
        if options.get("mscale") and options.get("mscale_all_dim"):
            attention_factor = mscale(factor, options["mscale"]) / mscale(
                factor, options["mscale_all_dim"]
            )
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = correction_dim(options.get("beta_fast") or 32)
    high = correction_dim(options.get("beta_slow") or 1)
    if options.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = (1 - ramp).astype(np.float32)  # the extrapolated (unscaled) share of each frequency
    interpolated = (1.0 / (factor * powers)).astype(np.float32)
    extrapolated = (1.0 / powers).astype(np.float32)
    inv_freq = interpolated * (1 - keep) + extrapolated * keep
    return inv_freq.astype(np.float32), float(attention_factor)


def rotary_tables(positions_bt: jax.Array, rope: Rope, tokens: int):
    """cos and sin `[b, t, r]` (float32) of the rotary angles at each position."""
    inv_freq_r2, attention_scaling = inverse_frequencies(rope, tokens)
    angles_btr2 = positions_bt[..., None].astype(jnp.float32) * jnp.asarray(inv_freq_r2)
    angles_btr = jnp.concatenate([angles_btr2, angles_btr2], axis=-1)
    cos, sin = jnp.cos(angles_btr), jnp.sin(angles_btr)
    if attention_scaling != 1.0:
        cos, sin = cos * attention_scaling, sin * attention_scaling
    return cos, sin


def rotate_half(x):
    """`[x1, x2] -> [-x2, x1]` over the last axis (the pairing transformers' rope uses)."""
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x_bthe: jax.Array, cos_btr: jax.Array, sin_btr: jax.Array) -> jax.Array:
    """Rotates the first r of each head's e dims (the rest pass through), in x's dtype.

    Args:
      x_bthe: queries or keys `[b, t, heads, e]`.
      cos_btr, sin_btr: from `rotary_tables`, r <= e.
    Returns:
      `[b, t, heads, e]`.
    """
    rotary = cos_btr.shape[-1]
    cos = cos_btr[:, :, None].astype(x_bthe.dtype)  # PyTorch casts the tables to x's dtype too
    sin = sin_btr[:, :, None].astype(x_bthe.dtype)
    x_rot, x_pass = x_bthe[..., :rotary], x_bthe[..., rotary:]
    rotated = x_rot * cos + rotate_half(x_rot) * sin
    if rotary == x_bthe.shape[-1]:
        return rotated
    return jnp.concatenate([rotated, x_pass], axis=-1)
