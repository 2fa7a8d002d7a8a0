"""Tests of jaxlens.models.gguf.reader and of the package as a whole: the parse equals the `gguf`
package's own reader, reading needs no torch, a file opened once serves weights and tokenizer,
nothing stale is reused, and missing or corrupt files are refused."""

from __future__ import annotations

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
from gguf_files import write_every_type, write_gguf

from jaxlens.models.gguf import GGUFFile, load_gguf_tokenizer, read_gguf


def _assert_same_parse(ours: GGUFFile, path, nested=()):
    """`ours` holds what `gguf.GGUFReader` (the llama.cpp project's reader) reads from `path`.
    Arrays of arrays (keys `nested`) are left out: that reader flattens them into one list."""
    theirs = gguf.GGUFReader(path)
    expected = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert {k: v for k, v in ours.metadata.items() if k not in nested} == {
        k: v for k, v in expected.items() if k not in nested
    }
    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert mine.shape == tuple(int(n) for n in t.shape) and mine.tensor_type == t.tensor_type
        assert mine.data.shape == t.data.shape and not mine.data.flags.writeable
        np.testing.assert_array_equal(mine.data, t.data)  # exact: the same bytes


def test_smollm2_parses_as_the_gguf_package_reads_it(smollm2_path):
    _assert_same_parse(GGUFFile.open(smollm2_path), smollm2_path)


@pytest.mark.parametrize("endian", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_every_value_and_tensor_type_parses_as_the_gguf_package_reads_it(tmp_path, endian):
    path = tmp_path / f"{endian.name}.gguf"
    write_every_type(path, endian)
    ours = GGUFFile.open(path)
    _assert_same_parse(ours, path, nested=("nested",))
    assert ours.get("nested") == [[1, 2], [3]]
    assert ours.get("text") == "Ünïcödé ✓" and ours.get("u64") == 2**63 + 5
    q8 = ours.tensors["q8.weight"]
    assert q8.shape == (64, 4) and q8.data.shape == (4, 68)  # 2 blocks of 34 bytes per row


# Runs in a fresh interpreter in which torch cannot be found or imported.
_TORCH_FREE_SCRIPT = """
import importlib.abc, importlib.util, json, sys

_find_spec = importlib.util.find_spec

def find_spec(name, *args, **kwargs):
    if name == "torch" or name.startswith("torch."):
        return None
    return _find_spec(name, *args, **kwargs)

class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
        return None

importlib.util.find_spec = find_spec
sys.meta_path.insert(0, BlockTorch())
try:
    import torch  # noqa: F401
    blocked = False
except ImportError:
    blocked = True

from jaxlens.models.gguf import load_gguf_tokenizer, read_gguf
import transformers.utils

path, text = sys.argv[1], sys.argv[2]
checkpoint = read_gguf(path)
tokenizer = load_gguf_tokenizer(path)
print(json.dumps({
    "blocked": blocked,
    "torch_available": transformers.utils.is_torch_available(),
    "num_tensors": len(checkpoint.state_dict),
    "ids": tokenizer(text).input_ids,
    "torch_loaded": "torch" in sys.modules,
}))
"""


def test_reading_needs_no_torch(smollm2_path, tokenizer, shakespeare_passage):
    proc = subprocess.run(
        [sys.executable, "-c", _TORCH_FREE_SCRIPT, str(smollm2_path), shakespeare_passage],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["blocked"] and not result["torch_available"]
    assert result["num_tensors"] == 272
    assert result["ids"] == tokenizer(shakespeare_passage).input_ids
    assert result["torch_loaded"] is False


@pytest.mark.parametrize("load", [read_gguf, load_gguf_tokenizer])
def test_missing_file(load, tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load(missing)


@pytest.mark.parametrize("load", [read_gguf, load_gguf_tokenizer])
def test_corrupt_files(load, smollm2_path, tmp_path):
    noise = tmp_path / "noise.gguf"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="not a valid GGUF"):
        load(noise)

    # A download cut short, here early in the vocabulary (the first 2 MB are metadata).
    truncated = tmp_path / "truncated.gguf"
    with open(smollm2_path, "rb") as f:
        truncated.write_bytes(f.read(100_000))
    with pytest.raises(ValueError, match="not a valid GGUF"):
        load(truncated)


def test_changed_file_is_parsed_again(tmp_path):
    # Given a path, each call parses the file as it is now: nothing stale is reused.
    path = tmp_path / "model.gguf"
    write_gguf(path, "llama", "llama")
    with pytest.raises(ValueError, match="'llama' tokenizer"):
        load_gguf_tokenizer(path)
    write_gguf(path, "llama", "gpt2")
    with pytest.raises(ValueError, match="lacks the GGUF metadata key 'tokenizer.ggml.tokens'"):
        load_gguf_tokenizer(path)


def test_a_file_opened_once_serves_weights_and_tokenizer(
    smollm2_path, tokenizer, shakespeare_passage, monkeypatch
):
    opened = GGUFFile.open(smollm2_path)
    assert opened.get("general.architecture") == "llama" and len(opened.tensors) == 272
    assert opened.get("no.such.key", None) is None
    with pytest.raises(ValueError, match="lacks the GGUF metadata key 'no.such.key'"):
        opened.get("no.such.key")

    def parse_again(*args, **kwargs):
        raise AssertionError("the opened file was parsed again")

    monkeypatch.setattr(GGUFFile, "open", parse_again)
    ours = load_gguf_tokenizer(opened)
    assert ours(shakespeare_passage).input_ids == tokenizer(shakespeare_passage).input_ids
    checkpoint = read_gguf(opened)
    assert len(checkpoint.state_dict) == 272 and checkpoint.config["num_hidden_layers"] == 30
    # Nothing returned is a (read-only) view of the file that the opened GGUFFile maps.
    assert all(array.flags.writeable for array in checkpoint.state_dict.values())
