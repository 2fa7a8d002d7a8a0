"""Tests of jaxlens.data.tokens with the real SmolLM2 tokenizer and real Shakespeare text: chunking
and EOS placement against hand computations, parity with tuned-lens's `chunk_and_tokenize`,
per-host streams that join into the corpus's, and the held-out split."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jaxlens import assets, data
from jaxlens.models.gguf import load_gguf_tokenizer

EOS = "<|im_end|>"  # SmolLM2-Instruct's EOS token, id 2


@pytest.fixture(scope="module")
def texts():
    return assets.shakespeare_texts()


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------------------------
# Tokenizing


def test_chunks_and_eos_positions_match_hand_computation(tokenizer):
    assert tokenizer.eos_token == EOS and tokenizer.eos_token_id == 2
    docs = ["To be, or not to be,", "", "that is the question:", "Whether 'tis nobler"]
    corpus = data.tokenize_corpus(docs, tokenizer, seq_len=5)

    # By hand: EOS, then each document's own tokens, EOS between documents, none at the end.
    stream = []
    for doc in docs:
        stream += [2] + ids(tokenizer, doc)
    assert corpus.num_tokens == len(stream)
    n = len(stream) // 5
    assert len(stream) % 5 != 0  # so a remainder is really dropped
    np.testing.assert_array_equal(corpus.chunks, np.array(stream[: n * 5]).reshape(n, 5))
    assert corpus.chunks.dtype == np.int32
    # EOS sits exactly at the document starts: 0, then after each document's tokens and EOS.
    starts = np.cumsum([0] + [1 + len(ids(tokenizer, d)) for d in docs[:-1]])
    flat = corpus.chunks.ravel()
    np.testing.assert_array_equal(np.flatnonzero(flat == 2), starts[starts < flat.size])
    # And the chunks decode back to the joined text.
    assert tokenizer.decode(flat) == (EOS + EOS.join(docs))[: len(tokenizer.decode(flat))]


def test_per_document_tokenizing_equals_joined_string(tokenizer, texts):
    # The splice of per-document ids must equal tokenizing the giant joined string, including
    # where text touches the EOS without whitespace and where documents start with a space.
    docs = [texts[1][:20000], "word", "word", " spaced ", "\n\nnewlines\n", texts[7][-20000:]]
    joined = EOS + EOS.join(docs)
    corpus = data.tokenize_corpus(docs, tokenizer, seq_len=7)
    reference = np.array(ids(tokenizer, joined), np.int32)
    assert corpus.num_tokens == reference.size
    np.testing.assert_array_equal(corpus.chunks.ravel(), reference[: corpus.chunks.size])


def test_nats_to_bpb_hand_count(tokenizer):
    docs = ["héllo", "wörld"]  # 6 UTF-8 bytes each (é, ö take two)
    corpus = data.tokenize_corpus(docs, tokenizer, seq_len=2)
    assert corpus.num_bytes == 2 * len(EOS) + 6 + 6 == 32
    num_tokens = len(ids(tokenizer, EOS + "héllo" + EOS + "wörld"))
    assert corpus.num_tokens == num_tokens
    assert corpus.nats_to_bpb == pytest.approx(num_tokens / 32 / math.log(2), rel=1e-15)


def test_tokenizer_without_eos_and_too_little_text_refused(tokenizer):
    no_eos = load_gguf_tokenizer(assets.smollm2_gguf_path())
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="no EOS token"):
        data.tokenize_corpus(["text"], no_eos, seq_len=4)
    with pytest.raises(ValueError, match=r"has 3 tokens, fewer than one chunk of seq_len=4"):
        data.tokenize_corpus(["Hello world"], tokenizer, seq_len=4)  # EOS Hello Ġworld


@pytest.mark.parametrize("seq_len", [64, 13, 52])
def test_parity_with_tuned_lens_chunk_and_tokenize(tokenizer, texts, seq_len):
    tl_data = pytest.importorskip("tuned_lens.data")
    from datasets import Dataset

    docs = [texts[0][:3000], "", "Café naïve — “quoted”", texts[5][1000:2500], "end"]
    ours = data.tokenize_corpus(docs, tokenizer, seq_len)
    # num_proc=None maps in this process. tuned-lens maps batches of 2048 documents and drops
    # each batch's remainder; with fewer than 2048 documents there is one batch, as here. For
    # larger corpora it keeps fewer chunks than we do (one remainder per batch, not one in all)
    # and its chunks differ after the first batch; its nats_to_bpb still counts every token.
    theirs, ratio = tl_data.chunk_and_tokenize(
        Dataset.from_dict({"text": docs}),
        tokenizer,
        format="numpy",
        num_proc=None,
        max_length=seq_len,
        load_from_cache_file=False,
    )
    theirs = np.stack(list(theirs["input_ids"]))
    assert ours.num_tokens == 1404  # = 2^2 3^3 13, so 13 and 52 divide it and 64 does not
    if ours.num_tokens % seq_len:
        np.testing.assert_array_equal(theirs, ours.chunks)
    else:
        # tuned-lens drops the last chunk even when it is full; we keep every full chunk.
        np.testing.assert_array_equal(theirs, ours.chunks[:-1])
    assert abs(ours.nats_to_bpb - ratio) <= 1e-9


# --------------------------------------------------------------------------------------------
# Held-out split


def synthetic(num_chunks: int, seq_len: int = 3) -> data.TokenizedCorpus:
    """Chunks whose every token is the chunk's index, so rows identify themselves."""
    chunks = np.repeat(np.arange(num_chunks, dtype=np.int32)[:, None], seq_len, axis=1)
    return data.TokenizedCorpus(chunks, num_tokens=num_chunks * seq_len + 1, num_bytes=12345)


def test_split_heldout_is_disjoint_contiguous_and_deterministic():
    corpus = synthetic(50)
    train, heldout = data.split_heldout(corpus, heldout_chunks=8, seed=3)
    held, kept = heldout.chunks[:, 0], train.chunks[:, 0]
    assert set(held).isdisjoint(kept)
    assert sorted([*held, *kept]) == list(range(50))
    np.testing.assert_array_equal(held, np.arange(held[0], held[0] + 8))
    np.testing.assert_array_equal(kept, np.sort(kept))
    again, _ = data.split_heldout(corpus, heldout_chunks=8, seed=3)
    np.testing.assert_array_equal(again.chunks, train.chunks)
    heldouts = [data.split_heldout(corpus, heldout_chunks=8, seed=s)[1] for s in range(5)]
    starts = {h.chunks[0, 0] for h in heldouts}
    assert len(starts) > 1  # the seed moves the block
    with pytest.raises(ValueError, match="choose a value from 1 to 49"):
        data.split_heldout(corpus, heldout_chunks=50, seed=0)


def test_split_heldout_keeps_bytes_per_token(tokenizer, texts):
    corpus = data.tokenize_corpus([texts[3][:30000]], tokenizer, seq_len=32)
    train, heldout = data.split_heldout(corpus, heldout_chunks=10, seed=0)
    assert heldout.chunks.shape == (10, 32)
    assert train.num_chunks == corpus.num_chunks - 10
    assert train.num_tokens == train.chunks.size and heldout.num_tokens == 320
    assert train.num_bytes + heldout.num_bytes < corpus.num_bytes  # the remainder is dropped
    for part in (train, heldout):
        assert part.nats_to_bpb == pytest.approx(corpus.nats_to_bpb, rel=1e-12)


# --------------------------------------------------------------------------------------------
# Hosts' streams


def _blocks(source, count, **kwargs):
    return [
        data.load_texts(source, process_index=i, process_count=count, **kwargs)
        for i in range(count)
    ]


@pytest.mark.parametrize("count", [2, 3, 5])
def test_hosts_blocks_join_into_the_whole_corpus(tmp_path, tokenizer, count):
    from datasets import Dataset

    docs = [f"Document {i}: " + "to be or not " * i for i in range(7)]
    for i, doc in enumerate(docs):
        (tmp_path / f"{i:02d}.txt").write_text(doc, encoding="utf-8")
    Dataset.from_dict({"text": docs}).to_parquet(str(tmp_path / "c.parquet"))
    sources = [
        (str(tmp_path), {}),
        (str(tmp_path / "*.txt"), {"max_documents": 6}),
        (str(tmp_path / "c.parquet"), {}),
        (str(tmp_path / "c.parquet"), {"max_documents": 4}),
        (str(tmp_path / "03.txt"), {}),
        ("shakespeare", {"max_documents": 4}),
    ]
    for source, kwargs in sources:
        whole = data.load_texts(source, **kwargs)
        blocks = _blocks(source, count, **kwargs)
        assert sum(blocks, []) == whole, source
        # The hosts' token streams, joined in process order, are the whole corpus's stream.
        streams = [data.tokenize_stream(b, tokenizer) for b in blocks]
        expected = data.tokenize_stream(whole, tokenizer)
        np.testing.assert_array_equal(np.concatenate([s.tokens for s in streams]), expected.tokens)
        assert sum(s.num_bytes for s in streams) == expected.num_bytes


def test_gather_streams_is_the_identity_on_one_process(tokenizer):
    stream = data.tokenize_stream(["To be, or not to be"], tokenizer)
    assert data.gather_streams(stream) is stream
