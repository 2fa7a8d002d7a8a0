"""Checksums of checkpointed arrays, computed on device where the arrays lie.

Orbax detects truncated or missing files but restores flipped bits inside large arrays' data
silently; `checkpointing` stores these sums beside each step and compares them on restore.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def leaf_checksum(x: jax.Array) -> jax.Array:
    """Two wrapping uint32 sums of `x`'s bits: plain (any single flipped bit changes it) and
    position-weighted (moved or swapped words change it). Not cryptographic; it detects damage."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        words = x.astype(jnp.uint32)
    elif x.dtype.itemsize >= 4:  # 64-bit types gain a trailing axis of two words
        words = jax.lax.bitcast_convert_type(x, jnp.uint32)
    else:
        unsigned = jnp.dtype(f"uint{8 * x.dtype.itemsize}")
        words = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    # The row-major position of each word, built from iotas rather than by flattening, so a
    # sharded array is summed where it lies and only two scalars cross devices.
    strides = np.cumprod((words.shape + (1,))[:0:-1])[::-1] if words.ndim else ()
    position = jnp.ones(words.shape, jnp.uint32)
    for axis, stride in enumerate(strides):
        iota = jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)
        position = position + iota * np.uint32(stride % 2**32)
    return jnp.stack([words.sum(dtype=jnp.uint32), (words * position).sum(dtype=jnp.uint32)])


def checksums_of(arrays: Mapping[str, Any]) -> dict[str, list[int]]:
    """`{item/key path: [sum, weighted sum]}` of every array of every item, computed on device.

    One jitted call per leaf rather than one for the tree: leaves may live on different devices
    (a step counter on one device, translators sharded over a mesh), which one call rejects.
    """
    sums = {
        f"{name}/{jax.tree_util.keystr(path)}": leaf_checksum(leaf)
        for name, tree in arrays.items()
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
    # Each sum is replicated on its leaf's devices, so any local copy is the global value.
    return {key: [int(v) for v in jax.device_get(s.addressable_data(0))] for key, s in sums.items()}
