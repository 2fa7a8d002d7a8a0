"""tuned-lens lens directories (`config.json` + `params.pt`) read and written without torch.

This is the only module of jaxlens that knows the PyTorch file format. A lens directory holds a
seven-key `config.json` and a `torch.save` archive of the translators' state dict ("0.weight",
"0.bias", ... in torch Linear layout `[out, in]`, the transpose of jaxlens's `h @ kernel`). A
`torch.save` archive is a stored (uncompressed) zip: `<name>/data.pkl` is a protocol-2 pickle of
an `OrderedDict` whose tensors are `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
requires_grad, hooks)` calls, each storage a persistent id `('storage', torch.FloatStorage, key,
'cpu', numel)` whose raw little-endian bytes are the record `<name>/data/<key>`. We write that
pickle opcode by opcode (a `pickle.Pickler` cannot name torch's globals without importing torch),
and read it with an unpickler that knows only the handful of globals a tensor state dict needs:
a `.pt` file is a pickle, and a general unpickler runs whatever code the file names. Files from
torch before 1.6 (the "legacy" sequence of pickles) are read the same way. Lens directories are
written atomically: into a temporary sibling directory, then renamed into place.

Array names end in their axes: `l` layers, `d` model width, `v` vocabulary.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import math
import os
import pathlib
import pickle
import shutil
import struct
import tempfile
import uuid
import warnings
import zipfile

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

LENS_CONFIG_KEYS = (
    "base_model_name_or_path",
    "d_model",
    "num_hidden_layers",
    "bias",
    "base_model_revision",
    "unembed_hash",
    "lens_type",
)
LENS_TYPE = "linear_tuned_lens"  # the only lens type tuned-lens 0.2.0 has
DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
PARAMS_FILES = {"pt": "params.pt", "safetensors": "params.safetensors"}

# The storage classes torch pickles for each dtype (torch 2.13 still writes these names).
_STORAGE_CLASS = {
    "float32": "FloatStorage",
    "float16": "HalfStorage",
    "bfloat16": "BFloat16Storage",
}
# torch.save starts every record's data at a multiple of 64 bytes (so `torch.load(mmap=True)` can
# map tensors in place), padding the local zip header with an extra field it tags "FB".
_ALIGNMENT = 64
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of a pre-1.6 torch.save file
_LEGACY_PROTOCOL = 1001
# numpy's default print options: the hash must not depend on a caller's np.set_printoptions.
_DEFAULT_PRINT = dict(
    edgeitems=3,
    threshold=1000,
    linewidth=75,
    suppress=False,
    nanstr="nan",
    infstr="inf",
    sign="-",
    floatmode="maxprec",
    legacy=False,
)


class LensFileError(ValueError):
    """A lens file that is truncated, corrupt, or not what a tuned-lens directory holds."""


class UnsafeLensFileError(LensFileError):
    """A pickle in a lens file that names a global a tensor state dict never needs."""


@dataclasses.dataclass(frozen=True)
class LensFile:
    """A tuned-lens directory as read from disk.

    Attributes:
        config: the seven `LENS_CONFIG_KEYS`, in order.
        kernel_ldd: float32 `[L, d, d]` translator kernels in `h @ kernel` layout.
        bias_ld: float32 `[L, d]` translator biases, or None for a lens without them.
        dtype: the dtype the weights were stored in ("float32", "float16" or "bfloat16").
    """

    config: dict
    kernel_ldd: np.ndarray
    bias_ld: np.ndarray | None
    dtype: str


def unembed_hash(unembed_vd: np.ndarray) -> str:
    """tuned-lens's fingerprint of a model's unembedding, to tell lenses of other models apart.

    Args:
        unembed_vd: `[vocab, d_model]` unembedding matrix (torch `lm_head.weight` layout), any
            float dtype; it is hashed as float32, as tuned-lens does.

    Returns:
        The hex sha256 of `numpy.array_str(U, precision=1)`. numpy summarises arrays of more than
        1000 elements, so only the corner values enter the hash: cheap for big vocabularies and
        blind to small perturbations, which is what tuned-lens wants from it.
    """
    u_vd = np.asarray(unembed_vd, dtype=np.float32)
    if u_vd.ndim != 2:
        raise ValueError(f"unembed_vd must be [vocab, d_model]; got shape {u_vd.shape}.")
    with np.printoptions(**_DEFAULT_PRINT):
        text = np.array_str(u_vd, precision=1)
    return hashlib.sha256(text.encode()).hexdigest()


# Writing torch.save archives -----------------------------------------------------------------


def _dtype_name(dtype: np.dtype) -> str | None:
    for name, reference in DTYPES.items():
        if dtype == reference or (dtype.kind == "f" and dtype.newbyteorder("=") == reference):
            return name
    return None


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
    for index, (key, dtype_name, shape) in enumerate(entries):
        storage_id = _p_tuple(
            _p_str("storage"),
            _p_global("torch", _STORAGE_CLASS[dtype_name]),
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
        path: file to write (its stem names the archive's top folder, as in torch).
        tensors: name -> float32, float16 or bfloat16 (`ml_dtypes.bfloat16`) array of any shape.
    """
    path = pathlib.Path(path)
    entries, arrays = [], []
    for key, value in tensors.items():
        array = np.asarray(value)
        dtype_name = _dtype_name(array.dtype)
        if not isinstance(key, str) or dtype_name is None:
            raise ValueError(
                f"Tensor {key!r} is {array.dtype}; a lens file holds str-named float32, float16 "
                "or bfloat16 arrays. Cast it first."
            )
        array = np.asarray(array, dtype=DTYPES[dtype_name], order="C")  # keeps 0-d as 0-d
        entries.append((key, dtype_name, array.shape))
        # torch records the byte order; we always write little-endian, as torch on x86/ARM does.
        width = array.dtype.itemsize
        arrays.append(array.reshape(-1).view(f"u{width}").astype(f"<u{width}", copy=False))
    data_pkl = _pickle_state_dict(entries)
    archive = path.stem if path.stem and path.stem.isascii() else "archive"
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


# Reading torch.save archives -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _StorageClass:
    """What the unpickler hands out for `torch.FloatStorage` & co: a dtype, nothing callable."""

    dtype_name: str


@dataclasses.dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype_name: str
    numel: int


@dataclasses.dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _rebuild_tensor(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    """Stands in for torch._utils._rebuild_tensor_v2: records where the tensor's data is."""
    del requires_grad, hooks  # meaningless for stored weights
    if not (
        isinstance(storage, _StorageRef)
        and _is_index(offset)
        and isinstance(size, tuple)
        and isinstance(stride, tuple)
        and len(size) == len(stride)
        and all(map(_is_index, size + stride))
    ):
        raise LensFileError(
            f"malformed tensor record (storage={storage!r}, offset={offset!r}, size={size!r}, "
            f"stride={stride!r})"
        )
    if metadata:
        raise LensFileError(f"tensor carries metadata {metadata!r}, which lens files never do")
    return _TensorRef(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad, hooks, *rest):
    """Stands in for torch._utils._rebuild_parameter: a Parameter's data is its tensor."""
    del requires_grad, hooks, rest
    if not isinstance(data, _TensorRef):
        raise LensFileError(f"malformed parameter record ({data!r})")
    return data


_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    # torch < 1.13 named the storages of CUDA tensors torch.cuda.FloatStorage & co.
    **{
        (module, cls): _StorageClass(dtype_name)
        for dtype_name, cls in _STORAGE_CLASS.items()
        for module in ("torch", "torch.cuda")
    },
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can build a tensor state dict and nothing else.

    Every global a pickle names passes through `find_class`; we hand out only `_SAFE_GLOBALS`,
    whose callables build plain records, so no code from the file can run.
    """

    def __init__(self, file, storages: dict[str, _StorageRef] | None, legacy: bool = False):
        super().__init__(file)
        self._storages = storages
        self._legacy = legacy

    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module in ("torch", "torch.cuda") and name.endswith("Storage"):
            raise LensFileError(
                f"holds a torch.{name} tensor; lens files hold float32, float16 or bfloat16"
            )
        raise UnsafeLensFileError(
            f"refers to the global {module}.{name}, which a tensor state dict never needs; "
            "jaxlens refused to load it (loading it could run code from the file)"
        )

    def persistent_load(self, pid):
        length = 6 if self._legacy else 5  # legacy ids end with a (here always None) view record
        if not (
            self._storages is not None
            and isinstance(pid, tuple)
            and len(pid) == length
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageClass)
            and isinstance(pid[2], str)
            and isinstance(pid[3], str)
            and _is_index(pid[4])
        ):
            raise LensFileError(f"unexpected persistent id {pid!r}")
        if self._legacy and pid[5] is not None:
            raise LensFileError("uses storage views from torch < 0.4; re-save it with torch>=1.6")
        ref = _StorageRef(pid[2], pid[1].dtype_name, pid[4])
        if self._storages.setdefault(ref.key, ref) != ref:
            raise LensFileError(f"storage {ref.key} is declared twice with different dtypes/sizes")
        return ref


def _unpickle(file, storages=None, legacy=False):
    return _RestrictedUnpickler(file, storages, legacy).load()


def _check_fits(f, nbytes: int) -> None:
    # A corrupt header can claim any size; reading it would allocate that much first.
    if nbytes > os.fstat(f.fileno()).st_size:
        raise LensFileError(f"claims a {nbytes}-byte storage, more than the whole file holds")


def _decode_storage(raw: bytes, ref: _StorageRef, byteorder: str) -> np.ndarray:
    dtype = DTYPES[ref.dtype_name]
    if len(raw) != ref.numel * dtype.itemsize:
        raise LensFileError(
            f"storage {ref.key} has {len(raw)} bytes; {ref.numel} {ref.dtype_name} values need "
            f"{ref.numel * dtype.itemsize}"
        )
    order = "<" if byteorder == "little" else ">"
    width = dtype.itemsize
    return np.frombuffer(raw, f"{order}u{width}").astype(f"=u{width}").view(dtype)


def _materialize(name, ref: _TensorRef, storage: np.ndarray) -> np.ndarray:
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
        if not isinstance(name, str) or not isinstance(ref, _TensorRef):
            raise LensFileError(f"entry {name!r} is a {type(ref).__name__}, not a tensor")
        out[name] = _materialize(name, ref, storages[ref.storage.key])
    return out


def _load_zip(f) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(f) as zf:
        pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise LensFileError(f"is a zip archive but not a torch.save one (data.pkl: {pickles})")
        prefix = pickles[0].removesuffix("data.pkl")
        byteorder = "little"  # what torch assumes when the record is missing
        if prefix + "byteorder" in zf.namelist():
            byteorder = zf.read(prefix + "byteorder").decode("ascii", "replace")
            if byteorder not in ("little", "big"):
                raise LensFileError(f"has an unknown byte order {byteorder!r}")
        refs: dict[str, _StorageRef] = {}
        obj = _unpickle(io.BytesIO(zf.read(pickles[0])), refs)
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
    if _unpickle(f) != _LEGACY_MAGIC or _unpickle(f) != _LEGACY_PROTOCOL:
        raise LensFileError("is neither a torch.save zip archive nor a legacy torch.save file")
    sys_info = _unpickle(f)
    little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
    refs: dict[str, _StorageRef] = {}
    obj = _unpickle(f, refs, legacy=True)
    keys = _unpickle(f)
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


# Lens directories ----------------------------------------------------------------------------


def _fsync_dir(path: pathlib.Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms that cannot open a directory (Windows) cannot sync one either
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lens_tensors(kernel_ldd, bias_ld, dtype: str) -> dict[str, np.ndarray]:
    """The state dict of `torch.nn.ModuleList([Linear] * L)`, cast to `dtype`."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: use one of {', '.join(DTYPES)}.")
    kernel_ldd = np.asarray(kernel_ldd)
    arrays = {"kernel_ldd": kernel_ldd}
    if bias_ld is not None:
        arrays["bias_ld"] = bias_ld = np.asarray(bias_ld)
    num_layers, d_model = kernel_ldd.shape[:2] if kernel_ldd.ndim == 3 else (0, 0)
    if kernel_ldd.shape != (num_layers, d_model, d_model) or num_layers * d_model == 0:
        raise ValueError(f"kernel_ldd must be [L, d, d] with L, d > 0; got {kernel_ldd.shape}.")
    if bias_ld is not None and bias_ld.shape != (num_layers, d_model):
        raise ValueError(f"bias_ld must be [{num_layers}, {d_model}]; got {bias_ld.shape}.")
    cast = {}
    for name, array in arrays.items():
        if array.dtype.kind != "f" and array.dtype != DTYPES["bfloat16"]:
            raise ValueError(f"{name} is {array.dtype}; translators must be floating point.")
        if not np.isfinite(array).all():
            raise ValueError(f"{name} has non-finite values: the lens diverged; export another.")
        with np.errstate(over="ignore"):  # an overflow is reported just below
            cast[name] = array.astype(DTYPES[dtype])
        if not np.isfinite(cast[name].astype(np.float32)).all():
            raise ValueError(
                f"{name} holds values up to {np.abs(array).max():.4g}, beyond {dtype}'s range; "
                "export with dtype float32 or bfloat16."
            )
    tensors = {}
    for i in range(num_layers):
        # jaxlens computes h @ kernel; torch's Linear stores [out, in] and computes h @ W.T.
        tensors[f"{i}.weight"] = np.ascontiguousarray(cast["kernel_ldd"][i].T)
        if bias_ld is not None:
            tensors[f"{i}.bias"] = cast["bias_ld"][i]
    return tensors


def _lens_config(config: dict, num_layers: int, d_model: int, bias: bool) -> dict:
    unknown = set(config) - set(LENS_CONFIG_KEYS)
    if unknown:
        raise ValueError(
            f"config has keys {sorted(unknown)}; a lens config has only these: "
            f"{', '.join(LENS_CONFIG_KEYS)}."
        )
    if "base_model_name_or_path" not in config:
        raise ValueError("config needs base_model_name_or_path (the model id the lens is for).")
    facts = {"d_model": d_model, "num_hidden_layers": num_layers, "bias": bias}
    for key, value in facts.items():
        if key in config and (config[key] != value or type(config[key]) is not type(value)):
            raise ValueError(
                f"config[{key!r}] = {config[key]!r}, but the arrays say {value!r} (kernel "
                f"[{num_layers}, {d_model}, {d_model}], bias {'given' if bias else 'None'})."
            )
    if config.get("lens_type", LENS_TYPE) != LENS_TYPE:
        raise ValueError(f"lens_type must be {LENS_TYPE!r}; got {config['lens_type']!r}.")
    defaults = {"base_model_revision": None, "unembed_hash": None, "lens_type": LENS_TYPE}
    merged = {**defaults, **facts, **config}
    return {key: merged[key] for key in LENS_CONFIG_KEYS}


def _write_params(directory: pathlib.Path, tensors: dict, file_format: str) -> None:
    path = directory / PARAMS_FILES[file_format]
    if file_format == "pt":
        save_torch_state_dict(path, tensors)
        return
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})  # pt: [out, in] layout
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_config(directory: pathlib.Path, config: dict) -> None:
    with open(directory / "config.json", "w") as f:
        json.dump(config, f)  # tuned-lens's own formatting, so the files compare equal
        f.flush()
        os.fsync(f.fileno())


def write_lens_dir(
    out_dir,
    kernel_ldd: np.ndarray,
    bias_ld: np.ndarray | None,
    *,
    config: dict,
    dtype: str = "float32",
    file_format: str = "pt",
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes a lens directory that `tuned_lens.TunedLens.from_model_and_pretrained` loads.

    The directory appears complete or not at all: it is written next to `out_dir` under a
    temporary name, synced, then renamed into place. With `overwrite`, the old directory is
    renamed aside first and deleted only once the new one is in place; any failure leaves it
    where it was.

    Args:
        out_dir: the lens directory to create.
        kernel_ldd: `[L, d, d]` translator kernels in `h @ kernel` layout (stored transposed).
        bias_ld: `[L, d]` translator biases, or None for a lens without biases.
        config: `base_model_name_or_path` and optionally the other `LENS_CONFIG_KEYS`;
            `d_model`, `num_hidden_layers` and `bias` must agree with the arrays if given.
        dtype: stored dtype, "float32", "float16" or "bfloat16".
        file_format: "pt" (`params.pt`, what tuned-lens reads) or "safetensors"
            (`params.safetensors`, same names and layout; tuned-lens itself cannot read it).
        overwrite: replace an existing `out_dir`.

    Returns:
        The absolute path of the lens directory.
    """
    out_dir = pathlib.Path(os.path.abspath(out_dir))
    if file_format not in PARAMS_FILES:
        raise ValueError(f"file_format={file_format!r}: use one of {', '.join(PARAMS_FILES)}.")
    tensors = _lens_tensors(kernel_ldd, bias_ld, dtype)
    num_layers, d_model = np.shape(kernel_ldd)[:2]
    lens_config = _lens_config(config, num_layers, d_model, bias_ld is not None)
    if (out_dir.exists() or out_dir.is_symlink()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass --overwrite (overwrite=True) to replace it.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(
        tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent)
    )
    try:
        _write_params(tmp, tensors, file_format)
        _write_config(tmp, lens_config)
        _fsync_dir(tmp)
        if out_dir.exists() or out_dir.is_symlink():
            backup = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex[:8]}.old")
            os.rename(out_dir, backup)
            try:
                os.rename(tmp, out_dir)
            except BaseException:
                os.rename(backup, out_dir)
                raise
            _remove(backup)
        else:
            os.rename(tmp, out_dir)
        _fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _remove(old: pathlib.Path) -> None:
    """Deletes the replaced lens; the new one is already in place, so failing here only warns."""
    try:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    except OSError as error:
        warnings.warn(
            f"Could not delete the replaced lens at {old} ({error}); delete it yourself.",
            stacklevel=3,
        )


def _read_config(path: pathlib.Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LensFileError(f"{path} is not valid JSON ({error}).") from None
    if not isinstance(raw, dict):
        raise LensFileError(f"{path} holds a {type(raw).__name__}, not a JSON object.")
    if "unembed_hash" not in raw and "unemebd_hash" in raw:  # older tuned-lens misspelt it
        raw["unembed_hash"] = raw["unemebd_hash"]
    missing = [
        k for k in ("base_model_name_or_path", "d_model", "num_hidden_layers") if k not in raw
    ]
    if missing:
        raise LensFileError(f"{path} lacks {', '.join(missing)}; it is not a tuned-lens config.")
    defaults = {"bias": True, "base_model_revision": None, "unembed_hash": None}
    config = {key: raw.get(key, defaults.get(key, LENS_TYPE)) for key in LENS_CONFIG_KEYS}
    for key in ("d_model", "num_hidden_layers"):
        if not _is_index(config[key]) or config[key] == 0:
            raise LensFileError(f"{path}: {key} = {config[key]!r}; expected a positive integer.")
    if not isinstance(config["bias"], bool):
        raise LensFileError(f"{path}: bias = {config['bias']!r}; expected true or false.")
    if config["lens_type"] != LENS_TYPE:
        raise LensFileError(
            f"{path}: lens_type = {config['lens_type']!r}; jaxlens reads {LENS_TYPE!r} lenses."
        )
    return config


def read_lens_dir(path) -> LensFile:
    """Reads a tuned-lens directory (`config.json` + `params.pt` or `params.safetensors`).

    `params.pt` wins when both params files are present: it is the one tuned-lens reads.

    Args:
        path: the lens directory.

    Returns:
        A `LensFile` whose arrays are float32 in jaxlens layout, checked against the config.

    Raises:
        FileNotFoundError: the directory, its config.json or its params file is missing.
        LensFileError: the files are corrupt, or their tensors do not match the config.
    """
    path = pathlib.Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"No lens directory at {path}.")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing; a lens directory needs config.json.")
    params_files = [path / name for name in PARAMS_FILES.values() if (path / name).is_file()]
    if not params_files:
        raise FileNotFoundError(
            f"{path} has neither {' nor '.join(PARAMS_FILES.values())}; a lens needs its weights."
        )
    config = _read_config(config_file)
    params_file = params_files[0]
    if params_file.suffix == ".pt":
        tensors = load_torch_state_dict(params_file)
    else:
        try:
            tensors = safetensors.numpy.load_file(params_file)
        except (safetensors.SafetensorError, OSError, ValueError) as error:
            raise LensFileError(f"{params_file} is truncated or corrupt ({error}).") from error
    num_layers, d_model, bias = config["num_hidden_layers"], config["d_model"], config["bias"]
    kinds = ("weight", "bias") if bias else ("weight",)
    expected = {f"{i}.{kind}" for i in range(num_layers) for kind in kinds}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise LensFileError(
            f"{params_file} does not match {config_file} ({num_layers} layers, bias={bias}): "
            f"missing keys {missing}, unexpected keys {extra}."
        )
    for name, array in tensors.items():
        shape = (d_model, d_model) if name.endswith(".weight") else (d_model,)
        if array.shape != shape or _dtype_name(array.dtype) is None:
            raise LensFileError(
                f"{params_file}: {name!r} is {array.dtype} {list(array.shape)}; d_model = "
                f"{d_model} needs a float32, float16 or bfloat16 {list(shape)}."
            )
    kernel_ldd = np.stack([tensors[f"{i}.weight"].T for i in range(num_layers)])
    bias_ld = None
    if bias:
        bias_ld = np.stack([tensors[f"{i}.bias"] for i in range(num_layers)])
        bias_ld = bias_ld.astype(np.float32, copy=False)
    return LensFile(
        config=config,
        kernel_ldd=kernel_ldd.astype(np.float32, copy=False),
        bias_ld=bias_ld,
        dtype=_dtype_name(tensors["0.weight"].dtype),
    )
