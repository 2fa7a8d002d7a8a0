"""A tuned-lens lens directory: `config.json` and the translators' weights, read and written.

The weights are a state dict of `torch.nn.ModuleList([Linear] * L)`: "0.weight", "0.bias", ...
in torch Linear layout `[out, in]`, the transpose of jaxlens's `h @ kernel`, stored as `params.pt`
(what tuned-lens reads) or `params.safetensors` (same names and layout). The unembedding and final
norm are not stored: they come from the model. A directory is written atomically: into a
temporary sibling, synced, then renamed into place, so it appears complete or not at all.

Array names end in their axes: `l` layers, `d` model width.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
import uuid
import warnings

import numpy as np
import safetensors
import safetensors.numpy

from jaxlens.torch_format.dtypes import DTYPES, dtype_name
from jaxlens.torch_format.errors import LensFileError
from jaxlens.torch_format.reader import load_torch_state_dict
from jaxlens.torch_format.schema import complete_config, read_config
from jaxlens.torch_format.writer import save_torch_state_dict

PARAMS_FILES = {"pt": "params.pt", "safetensors": "params.safetensors"}


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
    lens_config = complete_config(config, num_layers, d_model, bias_ld is not None)
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
    config = read_config(config_file)
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
        if array.shape != shape or dtype_name(array.dtype) is None:
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
        dtype=dtype_name(tensors["0.weight"].dtype),
    )
