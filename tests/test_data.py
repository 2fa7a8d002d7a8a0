"""Tests of jaxlens.data with the real SmolLM2 tokenizer and real Shakespeare text: chunking and
EOS placement against hand computations, parity with tuned-lens's `chunk_and_tokenize`, the
held-out split, the deterministic multi-host `ChunkStream`, file loading and `global_batch`."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from jaxlens import assets, data
from jaxlens.models.gguf import load_gguf_tokenizer

EOS = "<|im_end|>"  # SmolLM2-Instruct's EOS token, id 2


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return load_gguf_tokenizer(smollm2_path)


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
# ChunkStream


def take(stream: data.ChunkStream, batch_sizes) -> np.ndarray:
    """Chunk indices of the given batches, in order (rows of `synthetic` name themselves)."""
    return np.concatenate([stream.next_global_batch(b)[:, 0] for b in batch_sizes])


def test_stream_order_is_the_seeded_permutation_per_epoch():
    chunks = synthetic(23).chunks
    order = take(data.ChunkStream(chunks, seed=7), [5] * 14)  # 70 sequences: three epochs and one
    expected = [np.random.default_rng([7, e]).permutation(23) for e in range(4)]
    np.testing.assert_array_equal(order, np.concatenate(expected)[:70])
    for e in range(3):
        assert sorted(order[23 * e : 23 * (e + 1)]) == list(range(23))  # each chunk once
    assert not np.array_equal(order[:23], order[23:46])  # epochs reshuffle
    np.testing.assert_array_equal(order, take(data.ChunkStream(chunks, seed=7), [5] * 14))
    assert not np.array_equal(order, take(data.ChunkStream(chunks, seed=8), [5] * 14))


def test_stream_resumes_exactly_from_state():
    chunks = synthetic(17).chunks
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
    chunks = synthetic(19).chunks
    single = data.ChunkStream(chunks, seed=5, position=11)
    hosts = [data.ChunkStream(chunks, seed=5, position=11) for _ in range(process_count)]
    for _ in range(6):
        global_rows = single.next_global_batch(8)
        local = [s.next_local_batch(8, i, process_count) for i, s in enumerate(hosts)]
        assert all(x.shape == (8 // process_count, 3) for x in local)
        np.testing.assert_array_equal(np.concatenate(local), global_rows)
    assert {s.position for s in hosts} == {single.position} == {11 + 48}


def test_stream_refuses_bad_batches_and_foreign_states():
    chunks = synthetic(10).chunks
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


# --------------------------------------------------------------------------------------------
# Loading text


def test_load_txt_file_directory_and_glob(tmp_path):
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first ünïcode", encoding="utf-8")
    assert data.load_texts(str(tmp_path / "a.txt")) == ["first ünïcode"]
    assert data.load_texts(str(tmp_path)) == ["first ünïcode", "second"]  # sorted by name
    assert data.load_texts(str(tmp_path / "*.txt"), max_documents=1) == ["first ünïcode"]
    (tmp_path / "c.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="not .txt files"):
        data.load_texts(str(tmp_path / "*"))


def test_load_jsonl_json_and_parquet_round_trip(tmp_path):
    from datasets import Dataset

    docs = ["To be, or not to be,", "", "that is the question — “quoted”"]
    with open(tmp_path / "c.jsonl", "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, "body": doc}) + "\n")
    (tmp_path / "c.json").write_text(json.dumps([{"body": d} for d in docs]), encoding="utf-8")
    Dataset.from_dict({"body": docs, "id": [0, 1, 2]}).to_parquet(str(tmp_path / "c.parquet"))
    for name in ("c.jsonl", "c.json", "c.parquet"):
        assert data.load_texts(str(tmp_path / name), text_field="body") == docs
        with pytest.raises(ValueError, match=r"no field 'text'; its fields are \[.*'body'.*\]"):
            data.load_texts(str(tmp_path / name))
    first_two = data.load_texts(str(tmp_path / "c.parquet"), text_field="body", max_documents=2)
    assert first_two == docs[:2]


def test_load_refuses_missing_and_empty_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="No file or directory"):
        data.load_texts(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="No .txt files"):
        data.load_texts(str(tmp_path))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="holds no text"):
        data.load_texts(str(tmp_path / "empty.txt"))
    (tmp_path / "x.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match="supported files are .txt"):
        data.load_texts(str(tmp_path / "x.csv"))


def test_load_shakespeare(texts):
    loaded = data.load_texts("shakespeare")
    assert len(loaded) == 42 and loaded == texts
    assert data.load_texts("shakespeare", max_documents=2) == texts[:2]


def test_document_blocks_cut_like_array_split():
    for n in range(0, 9):
        for count in range(1, 5):
            blocks = [data.document_block(n, i, count) for i in range(count)]
            expected = np.array_split(np.arange(n), count)
            assert [list(b) for b in blocks] == [list(e) for e in expected]


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


def test_a_host_does_not_open_the_other_hosts_files(tmp_path):
    for i in range(4):
        (tmp_path / f"{i}.txt").write_text(f"document {i}", encoding="utf-8")
    (tmp_path / "3.txt").write_bytes(b"\xff\xfe not UTF-8")  # in the second host's block
    assert data.load_texts(str(tmp_path), process_index=0, process_count=2) == [
        "document 0",
        "document 1",
    ]
    with pytest.raises(UnicodeDecodeError):
        data.load_texts(str(tmp_path), process_index=1, process_count=2)


def test_multi_host_hub_streaming_needs_max_documents():
    with pytest.raises(ValueError, match="set max_documents"):
        data.load_texts("someone/some-dataset", process_index=0, process_count=2)
    with pytest.raises(ValueError, match=r"process_index=2 is not in \[0, 2\)"):
        data.load_texts("shakespeare", process_index=2, process_count=2)


def test_gather_streams_is_the_identity_on_one_process(tokenizer):
    stream = data.tokenize_stream(["To be, or not to be"], tokenizer)
    assert data.gather_streams(stream) is stream


# --------------------------------------------------------------------------------------------
# Global arrays


def test_global_batch_single_process_equals_device_put():
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    spec = PartitionSpec("data")
    stream = data.ChunkStream(synthetic(10, seq_len=4).chunks, seed=0)
    block = data.process_row_block(mesh, spec, (6, 4))
    assert block == (0, 1)
    rows = stream.next_local_batch(6, *block)
    array = data.global_batch(rows, mesh, spec)
    expected = jax.device_put(rows, jax.sharding.NamedSharding(mesh, spec))
    assert array.shape == (6, 4) and array.sharding == expected.sharding
    np.testing.assert_array_equal(np.asarray(array), np.asarray(expected))


def test_row_block_of_multi_host_layouts():
    # The rows one process's devices hold -> (block, num_blocks) for next_local_batch.
    assert data._row_block([(0, 2), (2, 4)], 8) == (0, 2)
    assert data._row_block([(4, 6), (6, 8)], 8) == (1, 2)
    assert data._row_block([(0, 8)], 8) == (0, 1)  # replicated: every process loads all rows
    with pytest.raises(ValueError, match="not one block"):
        data._row_block([(0, 2), (4, 6)], 8)
    with pytest.raises(ValueError, match="not one block"):
        data._row_block([(2, 5)], 9)
