"""`GGUFFile`: one parsed GGUF file, its metadata and its tensors, held by the caller.

A GGUF file (the llama.cpp format, version 2 or 3) is a header, then key-value metadata (the
model's hyperparameters and its whole tokenizer: ~100k vocabulary and merge strings for
SmolLM2), then one record per tensor (name, ggml shape, type, offset), then the tensor bytes,
aligned. We parse the header and records ourselves with `struct` over the memory-mapped file:
the `gguf` package's `GGUFReader` builds a numpy view per string and took 3.3 s for SmolLM2,
against about 0.1 s here. Only its type tables and dequantizers (`gguf.quants`) are used.

A caller typically wants both the weights and the tokenizer of one file, so `read_gguf` and
`load_gguf_tokenizer` accept an opened `GGUFFile` as well as a path: open the file once and pass
it to both. Nothing is cached behind the caller's back (a cache keyed on the path would have to
guess when the file changed); the caller decides how long the parse lives.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import struct
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
_MISSING = object()

# GGUF metadata value types -> struct format (scalars); 8 is a string and 9 an array.
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9
# Tensor types stored as plain numbers, and their numpy dtypes; every other type is ggml blocks.
_PLAIN_DTYPES = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file.

    Attributes:
        name: the GGUF name, e.g. ``blk.0.attn_q.weight``.
        shape: ggml dimensions, fastest-varying first (the reverse of numpy's order).
        tensor_type: its `gguf.GGMLQuantizationType`.
        data: a read-only view of the memory-mapped bytes: for plain types an array of the
            type's dtype in numpy order; for block-quantized types uint8 ``[rows..., row_bytes]``
            (what `gguf.quants.dequantize` takes).
    """

    name: str
    shape: tuple[int, ...]
    tensor_type: GGMLQuantizationType
    data: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class GGUFFile:
    """A parsed GGUF file.

    Attributes:
        path: the file.
        metadata: every metadata key, as a Python scalar, string or list.
        tensors: the tensors by GGUF name; their ``data`` are read-only views of the
            memory-mapped file, so holding a `GGUFFile` keeps the file mapped.
    """

    path: str
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]

    @classmethod
    def open(cls, path: str | os.PathLike) -> GGUFFile:
        """Parse the file at ``path``.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: the file is not a valid GGUF (truncated or corrupt).
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No GGUF file at {path}.")
        with open(path, "rb") as f:
            try:
                buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # an empty file cannot be mapped
                raise ValueError(f"{path} is not a valid GGUF file: it is empty.") from None
        try:
            metadata, tensors = _Parser(buffer).parse()
        except (struct.error, ValueError, KeyError, UnicodeDecodeError, OverflowError) as err:
            raise ValueError(
                f"{path} is not a valid GGUF file (truncated or corrupt?): {err}"
            ) from err
        return cls(path, metadata, tensors)

    @classmethod
    def of(cls, source: str | os.PathLike | GGUFFile) -> GGUFFile:
        """``source`` itself if it is already opened, else the file at that path, parsed."""
        return source if isinstance(source, GGUFFile) else cls.open(source)

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """Return metadata ``key`` as a Python scalar, string or list (``default`` if absent)."""
        if key not in self.metadata:
            if default is _MISSING:
                raise ValueError(f"{self.path} lacks the GGUF metadata key {key!r}.")
            return default
        return self.metadata[key]


class _Parser:
    """Reads a GGUF buffer front to back; `parse` returns `(metadata, tensors)`."""

    def __init__(self, buffer: mmap.mmap):
        self.buffer = buffer
        self.offset = 0
        self.order = "<"

    def parse(self) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
        if self.buffer[:4] != _MAGIC:
            raise ValueError(f"it does not start with {_MAGIC!r}")
        self.offset = 4
        version = self._scalar("I")
        if version & 0xFFFF == 0:  # written on a big-endian machine: every number is swapped
            self.order = ">"
            version = struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (only versions 2 and 3 are read)")
        tensor_count, kv_count = self._scalar("Q"), self._scalar("Q")
        metadata = {}
        for _ in range(kv_count):
            key = self._string()
            metadata[key] = self._value(self._scalar("I"))
        records = []
        for _ in range(tensor_count):
            name = self._string()
            shape = tuple(self._scalar("Q") for _ in range(self._scalar("I")))
            records.append(
                (name, shape, GGMLQuantizationType(self._scalar("I")), self._scalar("Q"))
            )
        alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        data_start = -(-self.offset // alignment) * alignment
        tensors = {name: self._tensor(name, *rest, data_start) for name, *rest in records}
        return metadata, tensors

    def _scalar(self, code: str):
        (value,) = struct.unpack_from(self.order + code, self.buffer, self.offset)
        self.offset += struct.calcsize(code)
        return value

    def _string(self) -> str:
        size = self._scalar("Q")
        end = self.offset + size
        if end > len(self.buffer):
            raise ValueError("a string runs past the end of the file")
        text = self.buffer[self.offset : end].decode("utf-8")
        self.offset = end
        return text

    def _value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self._scalar(_SCALARS[kind])
        if kind == _STRING:
            return self._string()
        if kind != _ARRAY:
            raise ValueError(f"unknown metadata value type {kind}")
        item_kind, count = self._scalar("I"), self._scalar("Q")
        if item_kind in _SCALARS:  # one unpack for the whole array
            code = f"{self.order}{count}{_SCALARS[item_kind]}"
            values = list(struct.unpack_from(code, self.buffer, self.offset))
            self.offset += struct.calcsize(code)
            return values
        return [self._value(item_kind) for _ in range(count)]

    def _tensor(self, name, shape, tensor_type, offset, data_start) -> GGUFTensor:
        numpy_shape = tuple(reversed(shape))
        if tensor_type in _PLAIN_DTYPES:
            dtype = np.dtype(_PLAIN_DTYPES[tensor_type]).newbyteorder(self.order)
            count, view_shape = math.prod(shape), numpy_shape
        else:
            block_size, block_bytes = GGML_QUANT_SIZES[tensor_type]
            if shape[0] % block_size:
                raise ValueError(f"{name}'s rows are not whole {tensor_type.name} blocks")
            dtype = np.dtype(np.uint8)
            row_bytes = shape[0] // block_size * block_bytes
            count, view_shape = math.prod(shape[1:]) * row_bytes, (*numpy_shape[:-1], row_bytes)
        start = data_start + offset
        if start + count * dtype.itemsize > len(self.buffer):
            raise ValueError(f"tensor {name} runs past the end of the file")
        data = np.frombuffer(self.buffer, dtype, count, start).reshape(view_shape)
        return GGUFTensor(name, shape, tensor_type, data)
