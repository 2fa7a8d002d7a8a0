"""Removing a subspace from residual-stream vectors, and the derangements that resampling needs.

`remove_subspace` replaces the component of each vector along the column space of a basis and
keeps the rest: with "zero" the component becomes zero (an orthogonal projection), with "mean" it
becomes the mean component over all vectors, with "resample" it becomes the component of another
vector, chosen by a derangement (a permutation without fixed points, so no vector keeps its own).
For an orthonormal basis B (`[d, k]`) and a replacement r_d of h_d, the result is

    h + (r - h) @ B @ B.T

which changes h only along col(B). This is tuned-lens 0.2.0's `remove_subspace`; its "mean" and
"resample" pool every vector of the input (all leading axes flattened), and so do we.

Example:

    basis_dk = jnp.linalg.qr(jax.random.normal(key, (d, 4)))[0]
    ablated_btd = remove_subspace(h_btd, basis_dk, "resample", key=jax.random.key(0))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MODES = ("zero", "mean", "resample")


def sample_derangement(key: jax.Array, n: int) -> jax.Array:
    """A uniformly random permutation of `range(n)` with no fixed point.

    Draws permutations until one has no fixed point (about e ≈ 2.7 draws on average), inside a
    `lax.while_loop`, so it is jittable with `n` static.

    Args:
      key: a `jax.random` key.
      n: the number of items; at least 2 (no derangement of one item exists).
    Returns:
      int32 indices `[n]` with `perm[i] != i` for every i.
    """
    if n < 2:
        raise ValueError(
            f"A derangement needs at least 2 items, got {n}: resample ablation swaps each vector "
            "with another one, so pass a batch of at least 2 vectors."
        )
    positions = jnp.arange(n)

    def draw(state):
        key, _ = state
        key, subkey = jax.random.split(key)
        return key, jax.random.permutation(subkey, n)

    def has_fixed_point(state):
        return jnp.any(state[1] == positions)

    _, perm = jax.lax.while_loop(has_fixed_point, draw, draw((key, positions)))
    return perm.astype(jnp.int32)


def derange(key: jax.Array, x_n: jax.Array) -> jax.Array:
    """Shuffles `x` along its first axis by a random derangement: no row stays where it was."""
    return x_n[sample_derangement(key, x_n.shape[0])]


def remove_subspace(
    h_d: jax.Array,
    basis_dk: jax.Array,
    mode: str = "zero",
    *,
    key: jax.Array | None = None,
    derangement: jax.Array | None = None,
    orthonormalize: bool = False,
) -> jax.Array:
    """Removes the information in `h` along the column space of `basis`.

    Args:
      h_d: vectors `[..., d]`. "mean" and "resample" pool all of them (leading axes flattened).
      basis_dk: the subspace's basis `[d, k]`, or one direction `[d]`.
      mode: "zero", "mean" or "resample" (see the module docstring).
      key: for "resample": the `jax.random` key that draws the derangement.
      derangement: for "resample", instead of `key`: int indices `[N]` (N = the number of
        vectors in `h`), a permutation without fixed points, e.g. from `sample_derangement`.
      orthonormalize: orthonormalise the basis first (QR). Leave it False only for a basis that
        is already orthonormal. (True is tuned-lens's `orthonormal=False`: the projector onto
        col(basis) for any full-rank basis.)
    Returns:
      vectors `[..., d]` in h's dtype (computed in at least float32).
    """
    if mode not in MODES:
        raise ValueError(f"Unknown ablation mode {mode!r}; use one of {MODES}.")
    if basis_dk.ndim == 1:
        basis_dk = basis_dk[:, None]
    if basis_dk.ndim != 2 or basis_dk.shape[0] != h_d.shape[-1]:
        raise ValueError(
            f"The basis has shape {basis_dk.shape} but the vectors are {h_d.shape[-1]} wide; "
            f"pass a basis of shape [{h_d.shape[-1]}, k] (its columns span the subspace)."
        )
    if basis_dk.shape[1] > basis_dk.shape[0]:
        raise ValueError(
            f"A basis of {basis_dk.shape[1]} directions in {basis_dk.shape[0]} dimensions cannot "
            f"be independent; pass at most {basis_dk.shape[0]} columns."
        )
    dtype = jnp.promote_types(h_d.dtype, jnp.float32)
    h = h_d.astype(dtype)
    basis = basis_dk.astype(dtype)
    if orthonormalize:
        basis, _ = jnp.linalg.qr(basis)

    rows_nd = h.reshape(-1, h.shape[-1])
    if mode == "zero":
        replacement = jnp.zeros_like(h)
    elif rows_nd.shape[0] < 2:
        raise ValueError(
            f"{mode!r} ablation replaces each vector's component by other vectors', but the input "
            f"holds only {rows_nd.shape[0]}; pass at least 2 vectors, or use mode 'zero'."
        )
    elif mode == "mean":
        replacement = jnp.broadcast_to(rows_nd.mean(0), h.shape)
    else:
        indices_n = _resample_indices(key, derangement, rows_nd.shape[0])
        replacement = rows_nd[indices_n].reshape(h.shape)

    coefficients_k = (replacement - h) @ basis
    return (h + coefficients_k @ basis.T).astype(h_d.dtype)


def _resample_indices(key: jax.Array | None, derangement: jax.Array | None, n: int) -> jax.Array:
    """The derangement "resample" uses: the one given, or one drawn from `key`."""
    if (key is None) == (derangement is None):
        raise ValueError(
            "Resample ablation needs exactly one of `key` (to draw a derangement) or "
            "`derangement` (indices to use); pass one of them."
        )
    if derangement is None:
        return sample_derangement(key, n)
    if derangement.shape != (n,):
        raise ValueError(
            f"The derangement has shape {derangement.shape} but the input holds {n} vectors; "
            f"pass indices of shape ({n},)."
        )
    return derangement
