"""Ablations in the model's forward pass: a whole layer's contribution, or a subspace of its output.

Both return edits for `interventions.forward_with_edits`, so they run inside `jax.jit` for every
family. `ablate_layer` is tuned-lens 0.2.0's `ablate_layer`: block l reads h_in and writes
h_out = h_in + c, and its contribution c is replaced, with h_in kept:

- "zero": by zero (block l is skipped);
- "mean": by the mean contribution, over the batch at each token position (mode "batch") or over
  every token of the batch (mode "token");
- "resample": by the contribution of another sequence at the same position (mode "batch") or of
  another token anywhere in the batch (mode "token"), chosen by a derangement (`subspace`), so no
  row keeps its own.

`ablate_subspace` is tuned-lens's `ablate_subspace`: `subspace.remove_subspace` applied to block
l's output, pooling every token of the batch for "mean" and "resample".

Example:

    @jax.jit
    def ablated(params, ids_bt, key):
        edits = {2: ablate_layer("resample", mode="token", key=key)}
        return forward_with_edits(model, params, ids_bt, edits).logits_btv

    direction_d = ...  # e.g. a causal basis vector of layer 1
    edits = {1: ablate_subspace(direction_d, "mean")}
    logits_btv = forward_with_edits(model, model.params, ids_bt, edits).logits_btv
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlens.analysis.interventions import BlockEdit, Edit
from jaxlens.analysis.subspace import MODES, _resample_indices, remove_subspace

POOLS = ("batch", "token")


def ablate_layer(
    method: str,
    *,
    mode: str = "batch",
    key: jax.Array | None = None,
    derangement: jax.Array | None = None,
) -> BlockEdit:
    """An edit that replaces a block's contribution to the residual stream.

    Args:
      method: "zero", "mean" or "resample" (see the module docstring).
      mode: "batch" (pool the sequences at each token position) or "token" (pool every token).
      key: for "resample": the `jax.random` key that draws the derangement.
      derangement: for "resample", instead of `key`: int indices, a permutation without fixed
        points of the pooled rows: `[batch]` in mode "batch", `[batch * tokens]` (row-major) in
        mode "token". Pass tuned-lens's own permutation here for a like-for-like comparison.
    Returns:
      a `BlockEdit` for `forward_with_edits`.
    """
    if method not in MODES:
        raise ValueError(f"Unknown ablation method {method!r}; use one of {MODES}.")
    if mode not in POOLS:
        raise ValueError(f"Unknown ablation mode {mode!r}; use one of {POOLS}.")

    def ablate(h_in_btd: jax.Array, h_out_btd: jax.Array) -> jax.Array:
        if method == "zero":
            return h_in_btd
        contribution_btd = (h_out_btd - h_in_btd).astype(
            jnp.promote_types(h_in_btd.dtype, jnp.float32)
        )
        # Rows are what "mean" averages and "resample" shuffles: sequences or single tokens.
        rows = (
            contribution_btd
            if mode == "batch"
            else contribution_btd.reshape(-1, h_in_btd.shape[-1])
        )
        if rows.shape[0] < 2:
            row, instead = _ROW_AND_ALTERNATIVE[mode]
            raise ValueError(
                f"{method!r} ablation in mode {mode!r} replaces each {row}'s contribution with "
                f"other {row}s', but the batch holds only one {row}; pass at least 2, or use "
                f"{instead}."
            )
        if method == "mean":
            replaced = jnp.broadcast_to(rows.mean(0, keepdims=True), rows.shape)
        else:
            replaced = rows[_resample_indices(key, derangement, rows.shape[0])]
        return (h_in_btd + replaced.reshape(h_in_btd.shape)).astype(h_out_btd.dtype)

    return BlockEdit(ablate)


_ROW_AND_ALTERNATIVE = {
    "batch": ("sequence", "mode 'token' or method 'zero'"),
    "token": ("token", "method 'zero'"),
}


def ablate_subspace(
    basis_dk: jax.Array,
    mode: str = "zero",
    *,
    key: jax.Array | None = None,
    derangement: jax.Array | None = None,
    orthonormalize: bool = False,
) -> Edit:
    """An edit that removes a subspace from a block's output (`subspace.remove_subspace`).

    Args:
      basis_dk: the subspace's basis `[d, k]`, or one direction `[d]`.
      mode: "zero", "mean" or "resample".
      key, derangement: for "resample": a `jax.random` key, or indices `[batch * tokens]`.
      orthonormalize: orthonormalise the basis first (leave False for an orthonormal basis).
    Returns:
      an `Edit` for `forward_with_edits`.
    """
    if mode not in MODES:
        raise ValueError(f"Unknown ablation mode {mode!r}; use one of {MODES}.")

    def ablate(h_btd: jax.Array) -> jax.Array:
        return remove_subspace(
            h_btd,
            basis_dk,
            mode,
            key=key,
            derangement=derangement,
            orthonormalize=orthonormalize,
        )

    return ablate
