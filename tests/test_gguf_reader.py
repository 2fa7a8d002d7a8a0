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
from gguf_files import write_gguf

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
    writer = gguf.GGUFWriter(str(path), "llama", endianess=endian)
    writer.add_custom_alignment(64)
    writer.add_uint8("u8", 200)
    writer.add_int8("i8", -100)
    writer.add_uint16("u16", 60_000)
    writer.add_int16("i16", -30_000)
    writer.add_uint32("u32", 4_000_000_000)
    writer.add_int32("i32", -2_000_000_000)
    writer.add_uint64("u64", 2**63 + 5)
    writer.add_int64("i64", -(2**62))
    writer.add_float32("f32", 0.25)
    writer.add_float64("f64", 1e-300)
    writer.add_bool("yes", True)
    writer.add_string("text", "Ünïcödé ✓")
    writer.add_array("ints", [1, -2, 3])
    writer.add_array("words", ["a", "", "ç"])
    writer.add_array("nested", [[1, 2], [3]])
    rng = np.random.default_rng(0)
    writer.add_tensor("f32.weight", rng.standard_normal((3, 5)).astype(np.float32))
    writer.add_tensor("f16.weight", rng.standard_normal((2, 7)).astype(np.float16))
    writer.add_tensor("i32.weight", np.arange(6, dtype=np.int32))
    q8 = gguf.quants.quantize(
        rng.standard_normal((4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0
    )
    writer.add_tensor("q8.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = GGUFFile.open(path)
    _assert_same_parse(ours, path, nested=("nested",))
    assert ours.get("nested") == [[1, 2], [3]]
    assert ours.get("text") == "Ünïcödé ✓" and ours.get("u64") == 2**63 + 5
    assert ours.tensors["q8.weight"].shape == (64, 4) and ours.tensors["q8.weight"].data.shape == (
        4,
        68,
    )


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
