"""Tests of jaxlens.sharding's batch placement: which rows of a global batch a process loads, and
`global_batch`, which assembles them into one sharded array."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from jaxlens import data, sharding


def synthetic(num_chunks: int, seq_len: int) -> np.ndarray:
    """Chunks whose every token is the chunk's index, so rows identify themselves."""
    return np.repeat(np.arange(num_chunks, dtype=np.int32)[:, None], seq_len, axis=1)


def test_global_batch_single_process_equals_device_put():
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    spec = PartitionSpec("data")
    stream = data.ChunkStream(synthetic(10, seq_len=4), seed=0)
    block = sharding.process_row_block(mesh, spec, (6, 4))
    assert block == (0, 1)
    rows = stream.next_local_batch(6, *block)
    array = sharding.global_batch(rows, mesh, spec)
    expected = jax.device_put(rows, jax.sharding.NamedSharding(mesh, spec))
    assert array.shape == (6, 4) and array.sharding == expected.sharding
    np.testing.assert_array_equal(np.asarray(array), np.asarray(expected))


def test_row_block_of_multi_host_layouts():
    # The rows one process's devices hold -> (block, num_blocks) for next_local_batch.
    assert sharding._row_block([(0, 2), (2, 4)], 8) == (0, 2)
    assert sharding._row_block([(4, 6), (6, 8)], 8) == (1, 2)
    assert sharding._row_block([(0, 8)], 8) == (0, 1)  # replicated: every process loads all rows
    with pytest.raises(ValueError, match="not one block"):
        sharding._row_block([(0, 2), (4, 6)], 8)
    with pytest.raises(ValueError, match="not one block"):
        sharding._row_block([(2, 5)], 9)
