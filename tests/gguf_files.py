"""Small synthetic GGUF files for the tests of jaxlens.models.gguf."""

from __future__ import annotations

import gguf
import numpy as np


def write_gguf(path, arch: str, tokenizer_model: str) -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    _finish(writer)


def write_every_type(path, endian: gguf.GGUFEndian) -> None:
    """A file holding every GGUF metadata value type (strings, arrays of strings, an array of
    arrays), F32/F16/I32/Q8_0 tensors and a custom alignment, in the given byte order."""
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
    _finish(writer)


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
