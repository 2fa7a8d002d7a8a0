"""Documents -> the tuned-lens token stream -> fixed-length chunks, with the bytes behind them.

Documents are joined with the EOS token as separator (a leading EOS too), tokenized, and cut into
consecutive chunks of ``seq_len`` tokens, the short remainder dropped, as tuned-lens does, so that
losses and bits per byte compare with the PyTorch package: ``nats_to_bpb = (tokens / UTF-8
bytes) / ln 2`` turns a loss in nats per token into bits per byte. In a multi-host run each host
tokenizes only its own block of documents and `gather_streams` joins the blocks' streams into
the corpus's, identical on every host. `split_heldout` sets a contiguous block of chunks aside
for evaluation. Everything here is numpy on the host.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import jax
import numpy as np

# Documents handed to the tokenizer per call: enough for a fast tokenizer to spread them over its
# threads, few enough that the Python lists of ids it returns stay small.
_DOCS_PER_CALL = 256


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
