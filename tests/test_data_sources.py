"""Tests of jaxlens.data.sources: .txt files, directories and globs, json/jsonl/parquet files,
the bundled Shakespeare, per-host document blocks, and the errors on missing, empty, unsupported
and non-UTF-8 sources."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxlens import assets, data


@pytest.fixture(scope="module")
def texts():
    return assets.shakespeare_texts()


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


def test_a_host_does_not_open_the_other_hosts_files(tmp_path):
    for i in range(4):
        (tmp_path / f"{i}.txt").write_text(f"document {i}", encoding="utf-8")
    (tmp_path / "3.txt").write_bytes(b"\xff\xfe not UTF-8")  # in the second host's block
    assert data.load_texts(str(tmp_path), process_index=0, process_count=2) == [
        "document 0",
        "document 1",
    ]
    with pytest.raises(ValueError, match=r"3\.txt is not UTF-8"):
        data.load_texts(str(tmp_path), process_index=1, process_count=2)


def test_multi_host_hub_streaming_needs_max_documents():
    with pytest.raises(ValueError, match="set max_documents"):
        data.load_texts("someone/some-dataset", process_index=0, process_count=2)
    with pytest.raises(ValueError, match=r"process_index=2 is not in \[0, 2\)"):
        data.load_texts("shakespeare", process_index=2, process_count=2)


def test_non_utf8_txt_file_is_refused_with_its_name_and_offset(tmp_path):
    # The bad byte lies well past the 8 KiB a text reader decodes at a time, on line 3.
    text = "x" * 10_000 + "\n" + "y" * 10_000 + "\n" + "Café"
    latin1 = tmp_path / "corpus" / "latin1.txt"
    latin1.parent.mkdir()
    latin1.write_bytes(text.encode("latin-1"))
    offset = 10_000 + 1 + 10_000 + 1 + 3
    for source in (latin1, latin1.parent, latin1.parent / "*.txt"):
        with pytest.raises(ValueError) as caught:
            data.load_texts(str(source))
        message = str(caught.value)
        assert not isinstance(caught.value, UnicodeDecodeError)
        assert (
            f"{latin1} is not UTF-8 text: byte {offset} (counting from 0; line 3) is 0xe9"
            in message
        )
        assert f"iconv -f latin1 -t utf-8 {latin1} > {latin1}.utf8" in message
    # Converted as the message says, it reads.
    latin1.write_text(latin1.read_bytes().decode("latin-1"), encoding="utf-8")
    assert data.load_texts(str(latin1)) == [text]


def test_non_utf8_json_and_parquet_rows_are_refused_with_file_and_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [b'{"text": "a"}', b'{"text": "b"}', b'{"text": "caf\xe9 au lait"}', b'{"text": "d"}']
    jsonl = tmp_path / "latin1.jsonl"
    jsonl.write_bytes(b"\n".join(rows) + b"\n")
    # Arrow's json reader keeps the bad bytes; only turning them into str fails.
    with pytest.raises(ValueError) as caught:
        data.load_texts(str(jsonl))
    message = str(caught.value)
    assert f"{jsonl}: row 2 (counting from 0) of field 'text' is not UTF-8 text" in message
    assert "its byte 3 is 0xe9" in message and "iconv -f latin1 -t utf-8" in message
    # The host whose block ends before the bad row reads its documents; the other host's error
    # counts rows from the start of the file, not of its block.
    assert data.load_texts(str(jsonl), process_index=0, process_count=2) == ["a", "b"]
    with pytest.raises(ValueError, match=r"row 2 \(counting from 0\)"):
        data.load_texts(str(jsonl), process_index=1, process_count=2)

    # A parquet string column can hold invalid UTF-8 too, if its writer did not check; the
    # search for the bad row steps over a missing value.
    raw = pa.array([b"ok", None, b"na\xefve"], type=pa.binary())
    column = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())
    parquet = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text": column}), parquet)
    with pytest.raises(ValueError, match=r"bad\.parquet: row 2 .*its byte 2 is 0xef.*Write the"):
        data.load_texts(str(parquet))
