"""`ChunkStream`: the seeded, resumable order in which training sees the chunks.

Which chunks form each global batch follows from ``(seed, position)`` alone: epoch ``e`` visits
the chunks in the order of a permutation seeded by ``[seed, e]``, and every host computes only
its own rows of a batch. So a run resumes exactly from a saved position and gives the same
batches on any number of hosts. Placing a batch's rows on the device mesh is
`jaxlens.sharding.global_batch`'s job.
"""

from __future__ import annotations

import numpy as np


class ChunkStream:
    """Deterministic, resumable batches of chunks, each host taking its own rows.

    Global sequence number ``n`` (counted from the start of training over all hosts) is chunk
    ``permutation(n // num_chunks)[n % num_chunks]``, where ``permutation(e)`` is
    ``np.random.default_rng([seed, e]).permutation(num_chunks)``. So the order depends only on
    ``(seed, num_chunks)``, every chunk appears once per epoch, batches run on across epoch ends,
    and ``position`` (sequences consumed so far) is the whole state.

    Args:
        chunks: ``[num_chunks, seq_len]`` token ids.
        seed: non-negative integer that fixes the order.
        position: global sequences already consumed (0 for a fresh run).
    """

    def __init__(self, chunks: np.ndarray, *, seed: int, position: int = 0):
        if chunks.ndim != 2 or chunks.shape[0] == 0:
            raise ValueError(
                f"chunks must be a non-empty [num_chunks, seq_len] array, got {chunks.shape}."
            )
        if seed < 0 or position < 0:
            raise ValueError(f"seed={seed} and position={position} must both be non-negative.")
        self.chunks = chunks
        self.seed = int(seed)
        self.position = int(position)
        self._cached: tuple[int, np.ndarray] | None = None

    @property
    def num_chunks(self) -> int:
        return self.chunks.shape[0]

    @property
    def seq_len(self) -> int:
        return self.chunks.shape[1]

    def next_global_batch(self, batch_size: int) -> np.ndarray:
        """Return the next ``[batch_size, seq_len]`` sequences and advance past them."""
        return self.next_local_batch(batch_size, 0, 1)

    def next_local_batch(
        self, batch_size: int, process_index: int, process_count: int
    ) -> np.ndarray:
        """Return this host's rows of the next global batch and advance past the whole batch.

        Args:
            batch_size: global batch size, divisible by ``process_count``.
            process_index: which contiguous block of rows to return, ``0 <= i < process_count``.
            process_count: number of equal row blocks the global batch is cut into.

        Returns:
            ``[batch_size // process_count, seq_len]``: rows ``i * b : (i + 1) * b`` of what
            `next_global_batch` would return, ``b = batch_size // process_count``.
        """
        if batch_size < 1 or batch_size % process_count:
            raise ValueError(
                f"batch_size={batch_size} must be a positive multiple of process_count="
                f"{process_count}, so every host gets the same number of rows."
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} is not in [0, {process_count}).")
        rows = batch_size // process_count
        start = self.position + process_index * rows
        batch = self.chunks[self._chunk_indices(start, start + rows)]
        self.position += batch_size
        return batch

    def _chunk_indices(self, start: int, stop: int) -> np.ndarray:
        """Chunk indices of global sequence numbers ``start <= n < stop``."""
        out = np.empty(stop - start, np.int64)
        n = start
        while n < stop:
            epoch, offset = divmod(n, self.num_chunks)
            take = min(stop - n, self.num_chunks - offset)
            out[n - start : n - start + take] = self._permutation(epoch)[offset : offset + take]
            n += take
        return out

    def _permutation(self, epoch: int) -> np.ndarray:
        # A batch touches at most a few epochs in order, so caching the latest one suffices.
        if self._cached is None or self._cached[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._cached = (epoch, rng.permutation(self.num_chunks))
        return self._cached[1]

    def state(self) -> dict[str, int]:
        """The stream's state, as plain ints (JSON- and checkpoint-friendly)."""
        return {
            "position": self.position,
            "seed": self.seed,
            "num_chunks": self.num_chunks,
            "seq_len": self.seq_len,
        }

    @classmethod
    def from_state(
        cls, chunks: np.ndarray, state: dict[str, int], *, seed: int | None = None
    ) -> ChunkStream:
        """Resume a stream saved with `state`.

        Args:
            chunks: the training chunks; must be the ones the state was saved with.
            state: the dict from `state`.
            seed: the seed the caller's configuration asks for, if any; it must match the saved
                one, since a different seed would give a different order from the saved position.

        Raises:
            ValueError: the state does not belong to these chunks or this seed.
        """
        missing = {"position", "seed", "num_chunks"} - set(state)
        if missing:
            raise ValueError(
                f"The data state {state} lacks {sorted(missing)}; it is not a ChunkStream state."
            )
        seq_len = state.get("seq_len", chunks.shape[1])
        if (state["num_chunks"], seq_len) != chunks.shape:
            raise ValueError(
                f"The data state was saved for {state['num_chunks']} chunks of {seq_len} tokens, "
                f"but the training data now has {chunks.shape[0]} chunks of {chunks.shape[1]}: "
                "resume with the same corpus, tokenizer, seq_len and held-out split, or start a "
                "new run."
            )
        if seed is not None and seed != state["seed"]:
            raise ValueError(
                f"The data state was saved with seed {state['seed']}, but seed {seed} was "
                "requested: resume with the saved seed, or start a new run."
            )
        return cls(chunks, seed=state["seed"], position=state["position"])

    def epochs_needed(self, num_sequences: int) -> float:
        """Passes over the chunks that ``num_sequences`` sequences from the start make."""
        return num_sequences / self.num_chunks

    def check_enough(self, num_steps: int, batch_size: int, *, allow_repeat: bool = False) -> float:
        """Refuse a run that would see some training chunk twice, unless repetition is allowed.

        tuned-lens trains for at most one pass over its data, so by default so does jaxlens.

        Args:
            num_steps: optimizer steps of the whole run.
            batch_size: sequences per step.
            allow_repeat: permit more than one epoch.

        Returns:
            The number of epochs the run makes.

        Raises:
            ValueError: more than one epoch is needed and ``allow_repeat`` is false.
        """
        needed = num_steps * batch_size
        if needed > self.num_chunks and not allow_repeat:
            n, t = self.num_chunks, self.seq_len
            tokens_per_step = batch_size * t
            raise ValueError(
                f"The training split has {n} sequences of {t} tokens ({n * t} tokens); "
                f"num_steps x tokens_per_step = {num_steps} x {tokens_per_step} needs "
                f"{needed * t} tokens: lower num_steps/tokens_per_step, or add data (or allow "
                "repeating the data)."
            )
        return self.epochs_needed(needed)
