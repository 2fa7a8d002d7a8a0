"""Text -> fixed-length token chunks -> deterministic, resumable, per-host training batches.

The pipeline follows the tuned-lens convention so that losses and bits per byte compare with the
PyTorch package: documents are joined with the EOS token as separator (a leading EOS too),
tokenized, and cut into consecutive chunks of ``seq_len`` tokens, the short remainder dropped;
``nats_to_bpb = (tokens / UTF-8 bytes) / ln 2`` converts a loss in nats per token into bits per
byte. Everything up to the batch is numpy on the host. In a multi-host run each host reads and
tokenizes only its own contiguous block of documents, and `gather_streams` joins the blocks' token
streams into the corpus's, identical on every host. `ChunkStream` decides which chunks form
each global batch from ``(seed, position)`` alone: epoch ``e`` visits the chunks in the order of a
permutation seeded by ``[seed, e]``, and every host computes only its own rows of a batch, so a
run resumes exactly from a saved position and gives the same batches on any number of hosts.
`global_batch` assembles the hosts' rows into one sharded `jax.Array`.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Documents handed to the tokenizer per call: enough for a fast tokenizer to spread them over its
# threads, few enough that the Python lists of ids it returns stay small.
_DOCS_PER_CALL = 256
_TEXT_SUFFIXES = (".txt",)
_DATASETS_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


# --------------------------------------------------------------------------------------------
# Loading text


def load_texts(
    source: str,
    *,
    text_field: str = "text",
    split: str = "train",
    max_documents: int | None = None,
    hub_config: str | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> list[str]:
    """Read a corpus as a list of documents, or one host's contiguous block of them.

    Args:
        source: one of
            - ``"shakespeare"``: the 42 Shakespeare texts of `jaxlens.assets` (offline once cached);
            - a ``.txt`` file (one document), or a directory or glob of ``.txt`` files (one
              document per file, sorted by path);
            - a ``.jsonl``/``.json`` or ``.parquet`` file, documents in column ``text_field``;
            - anything else is taken as a Hugging Face hub dataset name, streamed (network).
        text_field: the column holding the text, for json/parquet files and hub datasets.
        split: the split of a hub dataset.
        max_documents: keep only the first this many documents (required to bound a hub
            stream, which otherwise is read to its end).
        hub_config: the configuration name of a hub dataset (``"wikitext-103-raw-v1"``).
        process_index, process_count: read only block ``process_index`` of ``process_count``
            contiguous blocks of documents (`document_block`): each host of a multi-host run
            reads and tokenizes its own share, and `gather_streams` joins the shares. Files of
            other blocks are not opened; a hub stream is read up to the end of this block.

    Returns:
        The documents (of this block), in corpus order.

    Raises:
        FileNotFoundError: ``source`` looks like a path but nothing is there.
        ValueError: no documents, only empty documents, a missing ``text_field`` (the message
            names the fields that exist), or a file type that is not supported.
    """
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max_documents={max_documents}; it must be at least 1, or None for all.")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count}).")
    block = _Block(max_documents, process_index, process_count)
    texts = _read_source(source, text_field, split, hub_config, block)
    if process_count == 1:
        check_has_text(len(texts), sum(map(len, texts)), source)
    return texts


def check_has_text(num_documents: int, num_characters: int, source: str) -> None:
    """Refuses a corpus whose documents are all empty."""
    if num_characters == 0:
        raise ValueError(
            f"{source!r} holds no text ({num_documents} documents, all empty); point the data "
            "source at a non-empty corpus."
        )


def document_block(num_documents: int, process_index: int, process_count: int) -> range:
    """The documents of block ``process_index`` of ``process_count`` contiguous blocks.

    The first ``num_documents % process_count`` blocks hold one document more than the others
    (as `numpy.array_split` cuts), so joining the blocks in order gives every document once.
    """
    size, extra = divmod(num_documents, process_count)
    start = process_index * size + min(process_index, extra)
    return range(start, start + size + (process_index < extra))


@dataclasses.dataclass(frozen=True)
class _Block:
    """Which documents to read: the first ``max_documents``, then block ``index`` of ``count``."""

    max_documents: int | None
    index: int
    count: int

    def of(self, num_documents: int) -> range:
        if self.max_documents is not None:
            num_documents = min(num_documents, self.max_documents)
        return document_block(num_documents, self.index, self.count)


def _read_source(source, text_field, split, hub_config, block: _Block) -> list[str]:
    """Dispatch on the kind of ``source``; see `load_texts`."""
    from jaxlens import assets

    if source == "shakespeare":
        texts = assets.shakespeare_texts()
        return [texts[i] for i in block.of(len(texts))]
    path = pathlib.Path(source).expanduser()
    if path.is_dir():
        return _read_txt_files(sorted(path.glob("*.txt")), f"directory {path}", block)
    if any(c in source for c in "*?["):
        files = sorted(pathlib.Path(p) for p in glob.glob(source))
        return _read_txt_files(files, source, block)
    if path.is_file():
        if path.suffix in _TEXT_SUFFIXES:
            return [path.read_text(encoding="utf-8") for _ in block.of(1)]
        if path.suffix in _DATASETS_BUILDERS:
            return _read_with_datasets(path, text_field, block)
        raise ValueError(
            f"{path} is a {path.suffix or 'suffix-less'} file; supported files are .txt, .jsonl, "
            ".json and .parquet."
        )
    if _looks_like_path(source):
        raise FileNotFoundError(f"No file or directory at {path} (from data source {source!r}).")
    return _read_hub(source, hub_config, split, text_field, block)


def _looks_like_path(source: str) -> bool:
    """Whether ``source`` is meant as a local path rather than a hub name like ``owner/name``."""
    known = _TEXT_SUFFIXES + tuple(_DATASETS_BUILDERS)
    return source.startswith((".", "/", "~")) or source.endswith(known + ("/",))


def _read_txt_files(files: Sequence[pathlib.Path], where: str, block: _Block) -> list[str]:
    if not files:
        raise ValueError(
            f"No .txt files in {where}; a corpus directory or glob needs at least one."
        )
    others = [str(f) for f in files if f.suffix not in _TEXT_SUFFIXES or not f.is_file()]
    if others:
        raise ValueError(
            f"{where} matches entries that are not .txt files: {others[:5]}; narrow the glob to "
            "'*.txt' (json and parquet files are read one file at a time)."
        )
    return [files[i].read_text(encoding="utf-8") for i in block.of(len(files))]


def _read_with_datasets(path: pathlib.Path, text_field: str, block: _Block) -> list[str]:
    import datasets

    data = datasets.load_dataset(
        _DATASETS_BUILDERS[path.suffix], data_files=str(path), split="train"
    )
    _check_field(text_field, data.column_names, str(path))
    rows = block.of(len(data))
    return _as_strings(data.select(rows)[text_field], str(path))


def _read_hub(name, hub_config, split, text_field, block: _Block) -> list[str]:
    import datasets

    if block.count == 1:
        start, stop = 0, block.max_documents  # None: to the end of the stream
    elif block.max_documents is None:
        raise ValueError(
            f"Hub dataset {name!r} on {block.count} hosts: set max_documents so that the hosts "
            "can split the documents into blocks (each host streams up to the end of its own)."
        )
    else:
        rows = block.of(block.max_documents)
        start, stop = rows.start, rows.stop
    try:
        stream = datasets.load_dataset(name, hub_config, split=split, streaming=True)
        examples = list(itertools.islice(stream, start, stop))
    except Exception as e:
        raise ValueError(
            f"Could not stream the hub dataset {name!r} (config {hub_config!r}, split {split!r}): "
            f"{e}\nIf {name!r} was meant as a local file, no such file exists; local corpora must "
            "end in .txt, .jsonl, .json or .parquet, or be a directory."
        ) from e
    if examples:
        _check_field(text_field, list(examples[0]), f"hub dataset {name!r}")
    return _as_strings([ex[text_field] for ex in examples], f"hub dataset {name!r}")


def _check_field(text_field: str, fields: list[str], where: str) -> None:
    if text_field not in fields:
        raise ValueError(
            f"{where} has no field {text_field!r}; its fields are {fields}. Pass the one that "
            "holds the text as text_field."
        )


def _as_strings(values: list[Any], where: str) -> list[str]:
    bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
    if bad is not None:
        raise ValueError(
            f"Document {bad} of {where} is a {type(values[bad]).__name__}, not a string; drop or "
            "fill such rows first."
        )
    return list(values)


# --------------------------------------------------------------------------------------------
# Tokenizing


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedCorpus:
    """A corpus cut into equal-length token chunks, with the counts that convert nats to bits.

    Attributes:
        chunks: int32 ``[num_chunks, seq_len]`` token ids.
        num_tokens: tokens of the text the byte count refers to. For a tokenized corpus that is
            the whole joined text, including the remainder that did not fill a chunk (as in
            tuned-lens); for a part made by `split_heldout`, the tokens of its chunks.
        num_bytes: UTF-8 bytes of that text. A part made by `split_heldout` gets its share of the
            corpus's bytes in proportion to its tokens, which need not be a whole number.
    """

    chunks: np.ndarray
    num_tokens: int
    num_bytes: float

    @property
    def num_chunks(self) -> int:
        return self.chunks.shape[0]

    @property
    def seq_len(self) -> int:
        return self.chunks.shape[1]

    @property
    def nats_to_bpb(self) -> float:
        """Factor that turns a loss in nats per token into bits per byte."""
        return (self.num_tokens / self.num_bytes) / math.log(2)


@dataclasses.dataclass(frozen=True, eq=False)
class TokenStream:
    """The tokens of ``eos + doc_1 + eos + doc_2 + ... + eos + doc_n``, with its byte counts.

    Attributes:
        tokens: int32 ``[num_tokens]`` token ids.
        text_bytes: UTF-8 bytes of the documents themselves.
        num_documents: how many documents (hence EOS separators) the stream holds.
        eos_bytes: UTF-8 bytes of the EOS token's text.
    """

    tokens: np.ndarray
    text_bytes: int
    num_documents: int
    eos_bytes: int

    @property
    def num_bytes(self) -> int:
        """Bytes of the joined text: every document plus one EOS each."""
        return self.text_bytes + self.num_documents * self.eos_bytes


def tokenize_corpus(texts: Sequence[str], tokenizer, seq_len: int) -> TokenizedCorpus:
    """Tokenize documents the tuned-lens way and cut them into chunks of ``seq_len`` tokens.

    Same as ``chunk_stream(tokenize_stream(texts, tokenizer), seq_len)``; see those two.
    """
    return chunk_stream(tokenize_stream(texts, tokenizer), seq_len)


def tokenize_stream(texts: Sequence[str], tokenizer) -> TokenStream:
    """Tokenize documents into the tuned-lens token stream.

    The token stream is that of ``eos + doc_1 + eos + doc_2 + ... + eos + doc_n`` (no trailing
    EOS, no other special tokens such as a BOS). Rather than tokenizing that one giant string,
    each document is tokenized on its own (a batch of documents per tokenizer call, which a fast
    tokenizer runs on several threads) and the EOS id is spliced in between. This is the same
    stream: a tokenizer splits its input at special tokens before anything else, so no merge ever
    crosses an EOS. (It could differ only for a tokenizer whose EOS is not registered as a special
    token, where text either side of the EOS string could merge with it.) For the same reason the
    streams of consecutive blocks of documents join into the stream of all of them, which is what
    lets each host tokenize only its own block (`gather_streams`).

    Args:
        texts: the documents.
        tokenizer: a transformers tokenizer with an EOS token.

    Raises:
        ValueError: the tokenizer has no EOS token.
    """
    eos_id = tokenizer.eos_token_id
    if eos_id is None or tokenizer.eos_token is None:
        raise ValueError(
            f"The tokenizer {type(tokenizer).__name__} has no EOS token, which separates "
            "documents; set tokenizer.eos_token to the model's end-of-text token first."
        )
    tokens = np.concatenate(
        [
            _tokenize_with_leading_eos(texts[i : i + _DOCS_PER_CALL], tokenizer, eos_id)
            for i in range(0, len(texts), _DOCS_PER_CALL)
        ]
        or [np.zeros(0, np.int32)]
    )
    return TokenStream(
        tokens=tokens,
        text_bytes=sum(len(t.encode("utf-8")) for t in texts),
        num_documents=len(texts),
        eos_bytes=len(tokenizer.eos_token.encode("utf-8")),
    )


def chunk_stream(stream: TokenStream, seq_len: int) -> TokenizedCorpus:
    """Cut a token stream into consecutive chunks of ``seq_len`` tokens.

    Returns:
        The chunks (the final ``num_tokens % seq_len`` tokens dropped), the number of tokens of
        the whole stream and the UTF-8 bytes of the joined text.

    Raises:
        ValueError: ``seq_len`` is not positive, or the stream has fewer than ``seq_len`` tokens.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len}; it must be a positive number of tokens.")
    tokens = stream.tokens
    num_chunks = tokens.size // seq_len
    if num_chunks == 0:
        raise ValueError(
            f"The corpus has {tokens.size} tokens, fewer than one chunk of seq_len={seq_len}; "
            "lower seq_len or add data."
        )
    chunks = tokens[: num_chunks * seq_len].reshape(num_chunks, seq_len)
    return TokenizedCorpus(chunks=chunks, num_tokens=int(tokens.size), num_bytes=stream.num_bytes)


def gather_streams(stream: TokenStream) -> TokenStream:
    """Joins every host's stream, in process order, into the stream of the whole corpus.

    Each host passes the stream of its own block of documents (`load_texts` with its
    ``process_index``); since blocks are contiguous and in process order, the joined stream is
    exactly the one a single process would tokenize, so batches, losses and resumption do not
    depend on the number of hosts. Only token ids (4 bytes each) cross hosts, never text. With
    one process this returns ``stream`` itself.
    """
    if jax.process_count() == 1:
        return stream
    from jax.experimental import multihost_utils

    # Counts travel as the 8 bytes of an int64: jax would narrow int64 to int32.
    counts = np.array([stream.tokens.size, stream.text_bytes, stream.num_documents], np.int64)
    gathered = multihost_utils.process_allgather(counts.view(np.uint8))
    sizes, text_bytes, documents = np.ascontiguousarray(gathered).view(np.int64).T
    padded = np.zeros(max(int(sizes.max()), 1), np.int32)
    padded[: stream.tokens.size] = stream.tokens
    all_tokens = multihost_utils.process_allgather(padded)
    return TokenStream(
        tokens=np.concatenate([row[:size] for row, size in zip(all_tokens, sizes, strict=True)]),
        text_bytes=int(text_bytes.sum()),
        num_documents=int(documents.sum()),
        eos_bytes=stream.eos_bytes,
    )


def _tokenize_with_leading_eos(texts: Sequence[str], tokenizer, eos_id: int) -> np.ndarray:
    """Return the int32 ids of ``eos + texts[0] + eos + texts[1] + ...``."""
    # verbose=False: documents longer than the model's context are expected here and would
    # otherwise log a warning about indexing errors.
    ids = tokenizer(
        list(texts), add_special_tokens=False, return_attention_mask=False, verbose=False
    )["input_ids"]
    total = sum(len(x) for x in ids) + len(ids)
    stream = itertools.chain.from_iterable(itertools.chain((eos_id,), x) for x in ids)
    return np.fromiter(stream, dtype=np.int32, count=total)


def split_heldout(
    corpus: TokenizedCorpus, *, heldout_chunks: int, seed: int
) -> tuple[TokenizedCorpus, TokenizedCorpus]:
    """Split off a held-out block of chunks for evaluation.

    The held-out part is one contiguous run of ``heldout_chunks`` chunks whose start the seed
    picks. Contiguous, because neighbouring chunks continue the same document: a scattered
    selection would leave the text just before and after almost every held-out chunk in the
    training split, while a block shares at most its two edges with it. The training part is
    everything else, in order. Both parts keep the corpus's bytes per token, so their
    `nats_to_bpb` is the corpus's.

    Args:
        corpus: the tokenized corpus.
        heldout_chunks: chunks to hold out, at least 1 and fewer than ``corpus.num_chunks``.
        seed: picks the block; the same seed gives the same split.

    Returns:
        ``(train, heldout)``, disjoint, together holding every chunk once.
    """
    n = corpus.num_chunks
    if not 1 <= heldout_chunks < n:
        raise ValueError(
            f"heldout_chunks={heldout_chunks}, but the corpus has {n} chunks and training needs at "
            f"least one: choose a value from 1 to {n - 1}, or add data."
        )
    start = int(np.random.default_rng(seed).integers(0, n - heldout_chunks + 1))
    stop = start + heldout_chunks
    train = np.concatenate([corpus.chunks[:start], corpus.chunks[stop:]])
    return _part(corpus, train), _part(corpus, corpus.chunks[start:stop])


def _part(corpus: TokenizedCorpus, chunks: np.ndarray) -> TokenizedCorpus:
    num_tokens = int(chunks.size)
    return TokenizedCorpus(chunks, num_tokens, num_tokens * corpus.num_bytes / corpus.num_tokens)


# --------------------------------------------------------------------------------------------
# Batching


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


# --------------------------------------------------------------------------------------------
# Assembling a global array


def process_row_block(
    mesh: Mesh, spec: PartitionSpec, global_shape: Sequence[int]
) -> tuple[int, int]:
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


def global_batch(local_rows: np.ndarray, mesh: Mesh, spec: PartitionSpec) -> jax.Array:
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
