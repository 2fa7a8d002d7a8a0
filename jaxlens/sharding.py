"""The device mesh and how each of jaxlens's arrays is laid out on it.

One ("data", "model") mesh serves training and evaluation. Token batches are split over "data";
the translator bank's output dimension over "model"; the frozen model's weights are replicated, or
(for models too large for one chip) each split over "model" along its last evenly dividing axis,
XLA inserting the collectives. In a multi-host run every host holds the same host-local values
(the model, the corpus, a loaded lens), and `put` turns them into global arrays. A token batch is
the exception: each host loads only the rows its devices hold (`process_row_block`), and
`global_batch` assembles the hosts' rows into one global array.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh(data: int, model: int) -> Mesh:
    """A ("data", "model") mesh over all devices; one size may be -1 (fills the rest)."""
    count = jax.device_count()
    if data == -1 and model == -1:
        raise ValueError("At most one of --config.mesh.data/model may be -1.")
    data = count // model if data == -1 else data
    model = count // data if model == -1 else model
    if data * model != count:
        raise ValueError(
            f"--config.mesh.data={data} x --config.mesh.model={model} must equal the "
            f"{count} devices available."
        )
    # transformers' Flax models do not support Explicit axes, jax.make_mesh's new default.
    return jax.make_mesh((data, model), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def model_param_shardings(params, mesh: Mesh, shard: bool):
    """Replicated frozen weights, or (shard=True) each split over "model" along its last axis
    that divides evenly, for models too large for one chip; XLA inserts the collectives."""
    size = mesh.shape["model"]

    def spec(leaf):
        if shard and size > 1:
            for axis in reversed(range(leaf.ndim)):
                if leaf.ndim >= 2 and leaf.shape[axis] % size == 0:
                    names = [None] * leaf.ndim
                    names[axis] = "model"
                    return NamedSharding(mesh, P(*names))
        return NamedSharding(mesh, P())

    return jax.tree.map(spec, params)


def bank_shardings(mesh: Mesh, translators_or_state):
    """The bank's output dimension split over "model" (kernels `[L, d, d]`, biases `[L, d]`,
    and optimizer moments of the same shapes); everything else replicated."""

    def spec(leaf):
        if getattr(leaf, "ndim", 0) == 3:
            return NamedSharding(mesh, P(None, None, "model"))
        if getattr(leaf, "ndim", 0) == 2:
            return NamedSharding(mesh, P(None, "model"))
        return NamedSharding(mesh, P())

    return jax.tree.map(spec, translators_or_state)


def put(tree, shardings):
    """Global arrays laid out as `shardings` from values every host holds whole.

    Works on one host and on many (where `jax.device_put` of a host value to devices of other
    hosts is not an option): each device takes its slice of the host's copy. Arrays that are
    already laid out so are passed through untouched.
    """

    def one(value, sharding):
        if isinstance(value, jax.Array) and value.sharding == sharding:
            return value
        if isinstance(value, jax.Array) and value.is_fully_addressable:
            return jax.device_put(value, sharding)
        host = np.asarray(value)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)


def process_row_block(mesh: Mesh, spec: P, global_shape: Sequence[int]) -> tuple[int, int]:
    """Which block of a global batch's rows this process's devices hold under a sharding.

    Pass the result as ``(process_index, process_count)`` to `ChunkStream.next_local_batch`. It
    is ``(jax.process_index(), jax.process_count())`` for the usual data-parallel mesh, but
    processes that replicate each other (a model axis across hosts) share a block, and a mesh may
    order hosts differently from their process indices.

    Args:
        mesh: the device mesh.
        spec: partition spec of the batch; its first entry shards the rows.
        global_shape: shape of the global batch, ``[batch_size, seq_len]``.

    Returns:
        ``(block, num_blocks)``: this process holds rows ``block * b : (block + 1) * b`` with
        ``b = batch_size // num_blocks``.

    Raises:
        ValueError: this process's rows are not one block of equal-sized blocks.
    """
    index_map = NamedSharding(mesh, spec).addressable_devices_indices_map(tuple(global_shape))
    rows = {idx[0].indices(global_shape[0])[:2] for idx in index_map.values()}
    return _row_block(sorted(rows), global_shape[0])


def _row_block(rows: list[tuple[int, int]], batch_size: int) -> tuple[int, int]:
    """The block that sorted row ranges ``[(start, stop), ...]`` cover together; see above."""
    start, stop = rows[0][0], rows[-1][1]
    gaps = [(a, b) for (_, a), (b, _) in itertools.pairwise(rows) if a < b]
    size = stop - start
    if gaps or batch_size % size or start % size:
        raise ValueError(
            f"This process holds rows {rows} of a batch of {batch_size}, not one block of "
            "equal-sized blocks; shard the batch dimension so each host's devices are contiguous "
            "along the data axis."
        )
    return start // size, batch_size // size


def global_batch(local_rows: np.ndarray, mesh: Mesh, spec: P) -> jax.Array:
    """Assemble the hosts' rows into one global, sharded array.

    Args:
        local_rows: ``[rows_on_this_host, ...]``, this process's block of the global batch, as
            given by `ChunkStream.next_local_batch` with `process_row_block`.
        mesh: the device mesh.
        spec: partition spec of the global batch.

    Returns:
        A `jax.Array` of the global shape (rows times the number of blocks), sharded by
        ``NamedSharding(mesh, spec)``. With one process it equals ``jax.device_put``.
    """
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_process_local_data(sharding, local_rows)
