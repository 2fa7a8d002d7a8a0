"""Reading a `torch.save`d state dict of float tensors without torch and without running code.

Two containers hold the pickle that `unpickler` reads. Since torch 1.6, `torch.save` writes a zip
archive with everything in one folder: `<name>/data.pkl`, and each storage's raw bytes as the
record `<name>/data/<key>`; we refuse an archive with any member outside that folder. Before 1.6
it wrote a "legacy" sequence of pickles followed by the storages' bytes. Either way a storage's
size is checked against the file before it is read, so a corrupt header cannot make us allocate
more than the file holds.
"""

from __future__ import annotations

import io
import math
import os
import pathlib
import pickle
import struct
import zipfile

import numpy as np

from jaxlens.torch_format.dtypes import DTYPES
from jaxlens.torch_format.errors import LensFileError, UnsafeLensFileError
from jaxlens.torch_format.unpickler import StorageRef, TensorRef, unpickle

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of a pre-1.6 torch.save file
_LEGACY_PROTOCOL = 1001


def _check_fits(f, nbytes: int) -> None:
    # A corrupt header can claim any size; reading it would allocate that much first.
    if nbytes > os.fstat(f.fileno()).st_size:
        raise LensFileError(f"claims a {nbytes}-byte storage, more than the whole file holds")


def _decode_storage(raw: bytes, ref: StorageRef, byteorder: str) -> np.ndarray:
    dtype = DTYPES[ref.dtype_name]
    if len(raw) != ref.numel * dtype.itemsize:
        raise LensFileError(
            f"storage {ref.key} has {len(raw)} bytes; {ref.numel} {ref.dtype_name} values need "
            f"{ref.numel * dtype.itemsize}"
        )
    order = "<" if byteorder == "little" else ">"
    width = dtype.itemsize
    return np.frombuffer(raw, f"{order}u{width}").astype(f"=u{width}").view(dtype)


def _materialize(name, ref: TensorRef, storage: np.ndarray) -> np.ndarray:
    if math.prod(ref.size) == 0:
        return np.zeros(ref.size, storage.dtype)
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
    if last >= storage.size:
        raise LensFileError(
            f"tensor {name!r} (offset {ref.offset}, size {ref.size}, stride {ref.stride}) reads "
            f"past the end of its storage of {storage.size} values"
        )
    # Views (slices, transposes) share one storage; torch saves all of it. The bounds check
    # above keeps as_strided inside the buffer; np.array copies the view out.
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[ref.offset :],
        shape=ref.size,
        strides=[s * itemsize for s in ref.stride],
        writeable=False,
    )
    return np.array(view, order="C")


def _state_dict(obj, storages: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise LensFileError(f"holds a {type(obj).__name__}, not a state dict of tensors")
    out = {}
    for name, ref in obj.items():
        if not isinstance(name, str) or not isinstance(ref, TensorRef):
            raise LensFileError(f"entry {name!r} is a {type(ref).__name__}, not a tensor")
        out[name] = _materialize(name, ref, storages[ref.storage.key])
    return out


def _archive_folder(zf: zipfile.ZipFile) -> str:
    """The folder holding data.pkl, with its slash, once every member is known to lie inside it.

    Only names are read here. This reader opens records by name, so a member elsewhere could not
    make it read outside the folder; but torch.save never writes one, torch refuses one outside the
    folder, and a tool that unzips the file could write it anywhere. So we refuse them all.
    """
    pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise LensFileError(f"is a zip archive but not a torch.save one (data.pkl: {pickles})")
    prefix = pickles[0].removesuffix("data.pkl")
    for name in zf.namelist():
        parts = name.split("/")
        # "\\" is a separator to Windows tools (and to torch); ".." and a leading "/" climb out.
        if not name.startswith(prefix) or not parts[0] or ".." in parts or "\\" in name:
            raise UnsafeLensFileError(
                f"holds the member {name!r}, outside the folder {prefix!r} that torch.save "
                "writes everything into; jaxlens refused to load it"
            )
    return prefix


def _load_zip(f) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(f) as zf:
        prefix = _archive_folder(zf)
        byteorder = "little"  # what torch assumes when the record is missing
        if prefix + "byteorder" in zf.namelist():
            byteorder = zf.read(prefix + "byteorder").decode("ascii", "replace")
            if byteorder not in ("little", "big"):
                raise LensFileError(f"has an unknown byte order {byteorder!r}")
        refs: dict[str, StorageRef] = {}
        obj = unpickle(io.BytesIO(zf.read(prefix + "data.pkl")), refs)
        storages = {}
        for key, ref in refs.items():
            record = f"{prefix}data/{key}"
            if record not in zf.namelist():
                raise LensFileError(f"lacks the record {record} for storage {key}")
            nbytes = ref.numel * DTYPES[ref.dtype_name].itemsize
            if zf.getinfo(record).file_size != nbytes:
                raise LensFileError(f"record {record} does not hold {ref.numel} values")
            _check_fits(f, nbytes)
            storages[key] = _decode_storage(zf.read(record), ref, byteorder)
    return _state_dict(obj, storages)


def _load_legacy(f) -> dict[str, np.ndarray]:
    # The sequence torch<1.6 wrote: magic number, protocol, sys info, the object (whose storages
    # are persistent ids), the sorted storage keys, then per key an int64 count and the values.
    if unpickle(f) != _LEGACY_MAGIC or unpickle(f) != _LEGACY_PROTOCOL:
        raise LensFileError("is neither a torch.save zip archive nor a legacy torch.save file")
    sys_info = unpickle(f)
    little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
    refs: dict[str, StorageRef] = {}
    obj = unpickle(f, refs, legacy=True)
    keys = unpickle(f)
    if not isinstance(keys, list) or sorted(refs) != sorted(keys):
        raise LensFileError(f"lists storages {keys!r} but its tensors use {sorted(refs)}")
    storages = {}
    for key in keys:
        (numel,) = struct.unpack("<q" if little else ">q", f.read(8))
        ref = refs[key]
        if numel != ref.numel:
            raise LensFileError(f"storage {key} has {numel} values; its tensors expect {ref.numel}")
        nbytes = numel * DTYPES[ref.dtype_name].itemsize
        _check_fits(f, nbytes)
        raw = f.read(nbytes)
        storages[key] = _decode_storage(raw, ref, "little" if little else "big")
    return _state_dict(obj, storages)


def load_torch_state_dict(path) -> dict[str, np.ndarray]:
    """Reads a `torch.save`d state dict of float tensors without torch and without running code.

    Args:
        path: a `torch.save` file: the zip archive of torch>=1.6, or the legacy format before it.

    Returns:
        name -> numpy array in the stored dtype (float32, float16 or `ml_dtypes.bfloat16`), in
        the file's order; views of a shared storage come back as their own contiguous copies.

    Raises:
        UnsafeLensFileError: the pickle names a global other than those a state dict needs.
        LensFileError: the file is truncated, corrupt or holds something else.
    """
    path = pathlib.Path(path)
    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(0)
        try:
            if head == b"PK":
                return _load_zip(f)
            if head[:1] == pickle.PROTO:
                return _load_legacy(f)
            raise LensFileError("does not start like a torch.save file (a zip or a pickle)")
        except LensFileError as error:
            raise type(error)(f"{path} {error}.") from None
        except Exception as error:  # anything a damaged zip or pickle can raise
            raise LensFileError(
                f"{path} is truncated or corrupt ({type(error).__name__}: {error}); "
                "write it again (jaxlens export or tuned-lens's lens.save)."
            ) from error
