"""Tests of jaxlens.data.stream: `ChunkStream`'s seeded order per epoch, exact resumption from its
state, hosts' local batches that make up the global batch, and the refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxlens import data


def synthetic(num_chunks: int, seq_len: int = 3) -> np.ndarray:
    """Chunks whose every token is the chunk's index, so rows identify themselves."""
    return np.repeat(np.arange(num_chunks, dtype=np.int32)[:, None], seq_len, axis=1)


def take(stream: data.ChunkStream, batch_sizes) -> np.ndarray:
    """Chunk indices of the given batches, in order (rows of `synthetic` name themselves)."""
    return np.concatenate([stream.next_global_batch(b)[:, 0] for b in batch_sizes])


def test_stream_order_is_the_seeded_permutation_per_epoch():
    chunks = synthetic(23)
    order = take(data.ChunkStream(chunks, seed=7), [5] * 14)  # 70 sequences: three epochs and one
    expected = [np.random.default_rng([7, e]).permutation(23) for e in range(4)]
    np.testing.assert_array_equal(order, np.concatenate(expected)[:70])
    for e in range(3):
        assert sorted(order[23 * e : 23 * (e + 1)]) == list(range(23))  # each chunk once
    assert not np.array_equal(order[:23], order[23:46])  # epochs reshuffle
    np.testing.assert_array_equal(order, take(data.ChunkStream(chunks, seed=7), [5] * 14))
    assert not np.array_equal(order, take(data.ChunkStream(chunks, seed=8), [5] * 14))


def test_stream_resumes_exactly_from_state():
    chunks = synthetic(17)
    uninterrupted = take(data.ChunkStream(chunks, seed=1), [6] * 12)
    for stop in (1, 3, 5):  # positions 6, 18 and 30 (mid-epoch and across an epoch end)
        first = data.ChunkStream(chunks, seed=1)
        head = take(first, [6] * stop)
        state = json.loads(json.dumps(first.state()))
        assert state == {"position": 6 * stop, "seed": 1, "num_chunks": 17, "seq_len": 3}
        resumed = data.ChunkStream.from_state(chunks, state, seed=1)
        tail = take(resumed, [6] * (12 - stop))
        np.testing.assert_array_equal(np.concatenate([head, tail]), uninterrupted)


@pytest.mark.parametrize("process_count", [2, 4])
def test_local_batches_concatenate_to_the_global_batch(process_count):
    chunks = synthetic(19)
    single = data.ChunkStream(chunks, seed=5, position=11)
    hosts = [data.ChunkStream(chunks, seed=5, position=11) for _ in range(process_count)]
    for _ in range(6):
        global_rows = single.next_global_batch(8)
        local = [s.next_local_batch(8, i, process_count) for i, s in enumerate(hosts)]
        assert all(x.shape == (8 // process_count, 3) for x in local)
        np.testing.assert_array_equal(np.concatenate(local), global_rows)
    assert {s.position for s in hosts} == {single.position} == {11 + 48}


def test_stream_refuses_bad_batches_and_foreign_states():
    chunks = synthetic(10)
    stream = data.ChunkStream(chunks, seed=0)
    with pytest.raises(ValueError, match="multiple of process_count=3"):
        stream.next_local_batch(8, 0, 3)
    state = stream.state()
    with pytest.raises(ValueError, match="saved for 10 chunks of 3 tokens.*now has 9 chunks of 3"):
        data.ChunkStream.from_state(chunks[:9], state)
    with pytest.raises(ValueError, match="saved for 10 chunks of 3 tokens.*now has 10 chunks of 2"):
        data.ChunkStream.from_state(chunks[:, :2], state)
    with pytest.raises(ValueError, match="saved with seed 0, but seed 4 was requested"):
        data.ChunkStream.from_state(chunks, state, seed=4)
    with pytest.raises(ValueError, match=r"lacks \['position'\]"):
        data.ChunkStream.from_state(chunks, {"seed": 0, "num_chunks": 10})


def test_check_enough_refuses_too_little_data_with_the_numbers():
    stream = data.ChunkStream(np.zeros((100, 2048), np.int32), seed=0)
    assert stream.check_enough(num_steps=25, batch_size=4) == 1.0
    expected = (
        "The training split has 100 sequences of 2048 tokens (204800 tokens); num_steps x "
        "tokens_per_step = 26 x 8192 needs 212992 tokens: lower num_steps/tokens_per_step, or "
        "add data"
    )
    with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        stream.check_enough(num_steps=26, batch_size=4)
    assert stream.check_enough(num_steps=50, batch_size=4, allow_repeat=True) == 2.0
