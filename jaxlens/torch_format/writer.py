"""Writing a state dict of numpy arrays as a `torch.save` zip archive, without torch.

A `torch.save` archive is a stored (uncompressed) zip: `<name>/data.pkl` is a protocol-2 pickle of
an `OrderedDict` whose tensors are `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
requires_grad, hooks)` calls, each storage a persistent id `('storage', torch.FloatStorage, key,
'cpu', numel)` whose raw little-endian bytes are the record `<name>/data/<key>`. We write that
pickle opcode by opcode: a `pickle.Pickler` cannot name torch's globals without importing torch.
The bytes depend only on the arrays and the file's stem, so one lens always gives one file.
"""

from __future__ import annotations

import hashlib
import math
import os
import pathlib
import pickle
import struct
import zipfile

import numpy as np

from jaxlens.torch_format.dtypes import DTYPES, STORAGE_CLASS, dtype_name

# torch.save starts every record's data at a multiple of 64 bytes (so `torch.load(mmap=True)` can
# map tensors in place), padding the local zip header with an extra field it tags "FB".
_ALIGNMENT = 64


def _p_int(n: int) -> bytes:
    if 0 <= n < 1 << 8:
        return pickle.BININT1 + struct.pack("<B", n)
    if 0 <= n < 1 << 16:
        return pickle.BININT2 + struct.pack("<H", n)
    if -(1 << 31) <= n < 1 << 31:
        return pickle.BININT + struct.pack("<i", n)
    body = n.to_bytes(n.bit_length() // 8 + 1, "little", signed=True)
    return pickle.LONG1 + struct.pack("<B", len(body)) + body


def _p_str(text: str) -> bytes:
    body = text.encode("utf-8")
    return pickle.BINUNICODE + struct.pack("<I", len(body)) + body


def _p_global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii")


def _p_tuple(*items: bytes) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE if items else pickle.EMPTY_TUPLE


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    # torch's row-major strides, counting an empty dimension as 1 as torch does.
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _pickle_state_dict(entries: list[tuple[str, str, tuple[int, ...]]]) -> bytes:
    """Protocol-2 pickle of an OrderedDict of tensors, one storage per tensor, keys "0", "1"..."""
    empty_ordered_dict = (
        _p_global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE
    )
    out = [pickle.PROTO + b"\x02", empty_ordered_dict, pickle.MARK]
    for index, (key, stored, shape) in enumerate(entries):
        storage_id = _p_tuple(
            _p_str("storage"),
            _p_global("torch", STORAGE_CLASS[stored]),
            _p_str(str(index)),
            _p_str("cpu"),
            _p_int(math.prod(shape)),
        )
        rebuild_args = _p_tuple(
            storage_id + pickle.BINPERSID,
            _p_int(0),  # storage offset
            _p_tuple(*map(_p_int, shape)),
            _p_tuple(*map(_p_int, _contiguous_strides(shape))),
            pickle.NEWFALSE,  # requires_grad
            empty_ordered_dict,  # backward hooks
        )
        out += [_p_str(key), _p_global("torch._utils", "_rebuild_tensor_v2")]
        out += [rebuild_args, pickle.REDUCE]
    out += [pickle.SETITEMS, pickle.STOP]
    return b"".join(out)


def _write_record(zf: zipfile.ZipFile, f, name: str, data) -> None:
    """Adds one stored zip record whose data starts at a multiple of `_ALIGNMENT`."""
    data = memoryview(data).cast("B")
    # zipfile appends a 20-byte zip64 field to the local header by this same rule.
    zip64 = data.nbytes * 1.05 > zipfile.ZIP64_LIMIT
    header_end = f.tell() + 30 + len(name.encode("utf-8")) + 4 + (20 if zip64 else 0)
    pad = -header_end % _ALIGNMENT
    info = zipfile.ZipInfo(name)  # fixed 1980 timestamp: the same lens gives the same bytes
    info.compress_type = zipfile.ZIP_STORED
    info.extra = struct.pack("<2sH", b"FB", pad) + b"Z" * pad
    info.file_size = data.nbytes
    with zf.open(info, "w", force_zip64=zip64) as dest:
        dest.write(data)


def save_torch_state_dict(path, tensors: dict[str, np.ndarray]) -> None:
    """Writes `tensors` as a file that `torch.load(path)` reads as an OrderedDict of tensors.

    The archive has the records torch 2.13's `torch.save` writes (data.pkl, .format_version,
    .storage_alignment, byteorder, data/<key>, version, .data/serialization_id), stored and
    64-byte aligned, so `torch.load(..., weights_only=True)` and `mmap=True` both work. The file is
    fsynced but not written atomically (`write_lens_dir` is).

    Args:
        path: file to write (its stem names the archive's folder, as in torch).
        tensors: name -> float32, float16 or bfloat16 (`ml_dtypes.bfloat16`) array of any shape.
    """
    path = pathlib.Path(path)
    entries, arrays = [], []
    for key, value in tensors.items():
        array = np.asarray(value)
        stored = dtype_name(array.dtype)
        if not isinstance(key, str) or stored is None:
            raise ValueError(
                f"Tensor {key!r} is {array.dtype}; a lens file holds str-named float32, float16 "
                "or bfloat16 arrays. Cast it first."
            )
        array = np.asarray(array, dtype=DTYPES[stored], order="C")  # keeps 0-d as 0-d
        entries.append((key, stored, array.shape))
        # torch records the byte order; we always write little-endian, as torch on x86/ARM does.
        width = array.dtype.itemsize
        arrays.append(array.reshape(-1).view(f"u{width}").astype(f"<u{width}", copy=False))
    data_pkl = _pickle_state_dict(entries)
    # torch names the archive's folder after the file's stem; where that is no plain folder name
    # (one the reader accepts), we use "archive", the name torch gives a buffer's.
    stem = path.stem
    archive = stem if stem.isascii() and stem not in ("", "..") and "\\" not in stem else "archive"
    with open(path, "wb") as f:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
            for name, data in [
                ("data.pkl", data_pkl),
                (".format_version", b"1"),
                (".storage_alignment", str(_ALIGNMENT).encode()),
                ("byteorder", b"little"),
                *((f"data/{i}", a) for i, a in enumerate(arrays)),
                ("version", b"3\n"),
            ]:
                _write_record(zf, f, f"{archive}/{name}", data)
            # torch draws a random 40-digit id; ours is derived from the content instead.
            digest = hashlib.sha256(b"".join(struct.pack("<I", i.CRC) for i in zf.infolist()))
            serial = f"{int.from_bytes(digest.digest()[:16], 'big'):040d}".encode()
            _write_record(zf, f, f"{archive}/.data/serialization_id", serial)
        f.flush()
        os.fsync(f.fileno())
