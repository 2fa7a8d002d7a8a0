"""Text -> fixed-length token chunks -> the seeded, resumable order of training batches.

`sources` reads a corpus (or one host's block of it) as documents; `tokens` turns documents into
the tuned-lens token stream, chunks and a held-out split, with the bytes that convert nats to
bits; `stream` decides which chunks form each batch. Placing a batch on the device mesh is
`jaxlens.sharding.global_batch`.
"""

from jaxlens.data.sources import check_has_text, document_block, load_texts
from jaxlens.data.stream import ChunkStream
from jaxlens.data.tokens import (
    TokenizedCorpus,
    TokenStream,
    chunk_stream,
    gather_streams,
    split_heldout,
    tokenize_corpus,
    tokenize_stream,
)

__all__ = [
    "ChunkStream",
    "TokenStream",
    "TokenizedCorpus",
    "check_has_text",
    "chunk_stream",
    "document_block",
    "gather_streams",
    "load_texts",
    "split_heldout",
    "tokenize_corpus",
    "tokenize_stream",
]
