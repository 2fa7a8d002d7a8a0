"""The restricted unpickler: a `torch.save` pickle read as a state dict, running no code from it.

A `.pt` file is a pickle, and a general unpickler calls whatever globals the file names. Ours
knows only the handful a tensor state dict needs (`OrderedDict`, torch's two tensor rebuilders and
its float storage classes) and hands out stand-ins that record where each tensor's data lies
(`TensorRef`, `StorageRef`); the readers in `reader` then fetch that data from the archive.
"""

from __future__ import annotations

import collections
import dataclasses
import pickle

from jaxlens.torch_format.dtypes import STORAGE_CLASS
from jaxlens.torch_format.errors import LensFileError, UnsafeLensFileError


@dataclasses.dataclass(frozen=True)
class _StorageClass:
    """What the unpickler hands out for `torch.FloatStorage` & co: a dtype, nothing callable."""

    dtype_name: str


@dataclasses.dataclass(frozen=True)
class StorageRef:
    """A storage the pickle names: its record key, dtype and length in values."""

    key: str
    dtype_name: str
    numel: int


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """A tensor as a strided view of a storage, in values (not bytes), as torch records it."""

    storage: StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _rebuild_tensor(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    """Stands in for torch._utils._rebuild_tensor_v2: records where the tensor's data is."""
    del requires_grad, hooks  # meaningless for stored weights
    if not (
        isinstance(storage, StorageRef)
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
    return TensorRef(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad, hooks, *rest):
    """Stands in for torch._utils._rebuild_parameter: a Parameter's data is its tensor."""
    del requires_grad, hooks, rest
    if not isinstance(data, TensorRef):
        raise LensFileError(f"malformed parameter record ({data!r})")
    return data


_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    # torch < 1.13 named the storages of CUDA tensors torch.cuda.FloatStorage & co.
    **{
        (module, cls): _StorageClass(dtype_name)
        for dtype_name, cls in STORAGE_CLASS.items()
        for module in ("torch", "torch.cuda")
    },
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can build a tensor state dict and nothing else.

    Every global a pickle names passes through `find_class`; we hand out only `_SAFE_GLOBALS`,
    whose callables build plain records, so no code from the file can run.
    """

    def __init__(self, file, storages: dict[str, StorageRef] | None, legacy: bool = False):
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
        ref = StorageRef(pid[2], pid[1].dtype_name, pid[4])
        if self._storages.setdefault(ref.key, ref) != ref:
            raise LensFileError(f"storage {ref.key} is declared twice with different dtypes/sizes")
        return ref


def unpickle(file, storages: dict[str, StorageRef] | None = None, legacy: bool = False):
    """Reads one pickle from `file`, refusing every global a tensor state dict does not need.

    Args:
        file: a binary file positioned at the pickle.
        storages: filled with key -> `StorageRef` for each storage the pickle's tensors use; None
            for a pickle that must hold no tensors (the legacy format's headers).
        legacy: the pickle is a pre-1.6 `torch.save` object, whose storage ids have six fields.

    Returns:
        The unpickled object: dicts, lists and numbers as they are, tensors as `TensorRef`s.
    """
    return _RestrictedUnpickler(file, storages, legacy).load()
