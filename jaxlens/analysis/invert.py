"""Inverting the unembedding: the hidden state whose decoded distribution matches given logits.

The model's head decodes a hidden state h as `q(h) = softmax(unembed(final_norm(h)))`. Given
target logits with distribution p, `invert` finds `h* = argmin_h KL(p || q(h))` with L-BFGS
(`optax.lbfgs`, zoom line search), as tuned-lens's `Unembed.invert` does. With d < V the head's
image is a d-dimensional family of distributions (the softmax bottleneck), so in general only the
closest one is reached; logits that some hidden state produced are reached exactly.

The start is the least-squares preimage the tuned-lens docstring promises (its code starts from
zeros): the logits, with the lm_head bias removed (and a soft-cap undone), are solved for the
normed state z in `U z + c 1 ≈ logits` through the pseudo-inverse of the unembedding U (the
constant c is free, since softmax ignores it: both sides are centred over the vocabulary), then
the norm's affine part is undone, `h0 = (z - bias) / gain`. For logits in the image this start
already decodes to them (the norm's scaling is the only part it does not undo, and it need not).

Each row is inverted on its own (`jax.vmap` of the L-BFGS loop), so a batch converges row by row.

Example:

    target_v = model(ids).logits_btv[0, -1]
    out = invert(model.decoder(), target_v)
    out.kl, out.grad_norm            # KL(p || q(preimage)) in nats, and its gradient's norm
    model.decoder()(out.preimage_d)  # logits with (nearly) the target's distribution

Axis letters: n row (any leading axes, flattened), d model width, v vocabulary.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxlens.decoder import Decoder


class InversionOutput(NamedTuple):
    """What `invert` returns (tuned-lens's `InversionOutput`, per row).

    Attributes:
      preimage_d: the hidden state `[..., d]` before the final norm: `decoder(preimage_d)`
        decodes to the target's distribution.
      normed_d: `final_norm(preimage_d)` `[..., d]`, what tuned-lens calls its preimage.
      grad_norm: `[...]`, the norm of the KL's gradient at the preimage.
      kl: `[...]`, `KL(p || q(preimage))` in nats (tuned-lens's loss: there is no prior term).
      num_steps: `[...]` int32, the L-BFGS iterations taken.
    """

    preimage_d: jax.Array
    normed_d: jax.Array
    grad_norm: jax.Array
    kl: jax.Array
    num_steps: jax.Array


def kl_to_decoded(decoder: Decoder, target_logits_v: jax.Array, h_d: jax.Array) -> jax.Array:
    """`KL(p || q(h))` in nats over the last axis, p = softmax(target), q = softmax(decoder(h))."""
    log_p = jax.nn.log_softmax(target_logits_v.astype(jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(decoder(h_d), axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def pseudo_inverse_start(decoder: Decoder, target_logits_v: jax.Array) -> jax.Array:
    """The least-squares preimage `[..., d]` of logits `[..., V]` (see the module docstring)."""
    raw_v = target_logits_v.astype(jnp.float32)
    if decoder.logit_softcap is not None:  # undo c * tanh(x / c) where it is invertible
        cap = decoder.logit_softcap
        raw_v = cap * jnp.arctanh(jnp.clip(raw_v / cap, -1.0 + 1e-6, 1.0 - 1e-6))
    if decoder.unembed_bias_v is not None:
        raw_v = raw_v - decoder.unembed_bias_v.astype(jnp.float32)
    unembed_vd = decoder.unembed_vd.astype(jnp.float32)
    centred_vd = unembed_vd - unembed_vd.mean(axis=0)
    centred_v = raw_v - raw_v.mean(axis=-1, keepdims=True)
    z_d = centred_v @ jnp.linalg.pinv(centred_vd).T
    gain_d, bias_d = decoder.norm_affine()
    if bias_d is not None:
        z_d = z_d - bias_d
    if gain_d is not None:  # a zero gain leaves its coordinate free: start it at 0
        z_d = jnp.where(gain_d == 0, 0.0, z_d / jnp.where(gain_d == 0, 1.0, gain_d))
    return z_d


def invert(
    decoder: Decoder,
    target_logits_v: jax.Array,
    *,
    h0_d: jax.Array | None = None,
    max_iter: int = 500,
    tol: float = 1e-6,
) -> InversionOutput:
    """Finds hidden states whose decoded distributions match `target_logits_v` in KL.

    Args:
      decoder: the model's final norm and unembedding.
      target_logits_v: `[..., V]` logits to invert (any leading axes).
      h0_d: the start `[..., d]` (default: `pseudo_inverse_start`).
      max_iter: the most L-BFGS iterations per row.
      tol: a row stops once its gradient's norm is below this (in float32 it levels off near
        1e-6, where the KL is within about 1e-7 of its minimum).
    Returns:
      `InversionOutput`, every field with the target's leading axes.
    Raises:
      ValueError: for logits of another vocabulary width or a start of the wrong shape.
    """
    target = jnp.asarray(target_logits_v)
    if target.ndim == 0 or target.shape[-1] != decoder.vocab_size:
        raise ValueError(
            f"Target logits of shape {target.shape} do not end in this decoder's vocabulary of "
            f"{decoder.vocab_size}; pass logits [..., {decoder.vocab_size}] of the same model."
        )
    leading = target.shape[:-1]
    if h0_d is None:
        h0_d = pseudo_inverse_start(decoder, target)
    elif jnp.shape(h0_d) != (*leading, decoder.d_model):
        raise ValueError(
            f"The start h0_d has shape {jnp.shape(h0_d)}; it must be {(*leading, decoder.d_model)} "
            f"for target logits of shape {target.shape}."
        )
    flat = _invert_rows(
        decoder,
        target.reshape(-1, decoder.vocab_size),
        jnp.asarray(h0_d, jnp.float32).reshape(-1, decoder.d_model),
        max_iter=max_iter,
        tol=tol,
    )
    return InversionOutput(*(x.reshape(*leading, *x.shape[1:]) for x in flat))


@functools.partial(jax.jit, static_argnames=("max_iter", "tol"))
def _invert_rows(decoder, target_nv, h0_nd, *, max_iter, tol):
    """`InversionOutput` fields `[n, ...]`, each row by its own L-BFGS loop."""
    solve = functools.partial(_invert_row, max_iter=max_iter, tol=tol)
    return jax.vmap(solve, in_axes=(None, 0, 0))(decoder, target_nv, h0_nd)


def _invert_row(decoder, target_v, h0_d, *, max_iter, tol):
    """L-BFGS on one row: the row's `InversionOutput` fields."""
    objective = functools.partial(kl_to_decoded, decoder, target_v)
    optimizer = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry):
        h_d, state = carry
        value, grad_d = value_and_grad(h_d, state=state)
        updates, state = optimizer.update(
            grad_d, state, h_d, value=value, grad=grad_d, value_fn=objective
        )
        return optax.apply_updates(h_d, updates), state

    def going(carry):
        _, state = carry
        count = optax.tree.get(state, "count")
        grad_norm = optax.tree.norm(optax.tree.get(state, "grad"))
        return (count == 0) | ((count < max_iter) & (grad_norm >= tol))

    h_d, state = jax.lax.while_loop(going, step, (h0_d, optimizer.init(h0_d)))
    kl, grad_d = jax.value_and_grad(objective)(h_d)
    steps = optax.tree.get(state, "count").astype(jnp.int32)
    return h_d, decoder.final_norm(h_d), jnp.linalg.norm(grad_d), kl, steps
