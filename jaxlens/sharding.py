"""The device mesh and how each of jaxlens's arrays is laid out on it.

One ("data", "model") mesh serves training and evaluation. Token batches are split over "data";
the translator bank's output dimension over "model"; the frozen model's weights are replicated, or
(for models too large for one chip) each split over "model" along its last evenly dividing axis,
XLA inserting the collectives. In a multi-host run every host holds the same host-local values
(the model, the corpus, a loaded lens), and `put` turns them into global arrays.
"""

from __future__ import annotations

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
