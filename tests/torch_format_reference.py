"""The torch and tuned-lens references the torch_format tests compare against, and bit helpers.

Values are compared bit for bit, through unsigned-integer views, so NaN payloads and -0.0 count.
"""

from __future__ import annotations

import pathlib
import struct
import zipfile

import numpy as np
import torch
import transformers
from tuned_lens import TunedLens

from jaxlens import torch_format
from jaxlens.torch_format.dtypes import dtype_name

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TORCH_INTS = {4: torch.int32, 2: torch.int16}
# Tensors of every rank a state dict can hold, empty ones included.
SHAPES = {"0.weight": (5, 7), "0.bias": (7,), "cube": (2, 3, 4), "scalar": (), "empty": (0, 3)}


def bits(array) -> np.ndarray:
    array = np.asarray(array)
    return array.view(f"u{array.dtype.itemsize}")


def torch_bits(tensor: torch.Tensor) -> np.ndarray:
    width = tensor.element_size()
    return tensor.contiguous().view(TORCH_INTS[width]).numpy().view(f"u{width}")


def random_bits(rng, shape, dtype: str) -> np.ndarray:
    """Arbitrary bit patterns of `dtype`: NaNs with payloads, infinities, -0.0, subnormals."""
    width = torch_format.DTYPES[dtype].itemsize
    raw = rng.integers(0, 1 << (8 * width), size=shape, dtype=np.uint64).astype(f"u{width}")
    return raw.view(torch_format.DTYPES[dtype])


def as_torch(array: np.ndarray) -> torch.Tensor:
    width = array.dtype.itemsize
    dtype = TORCH_DTYPES[dtype_name(array.dtype)]
    return torch.from_numpy(array.view(f"i{width}").copy()).view(dtype)


def data_offsets(path) -> dict[str, int]:
    """Where each zip record's data starts (from the local headers, as torch's reader does)."""
    raw = pathlib.Path(path).read_bytes()
    offsets = {}
    for info in zipfile.ZipFile(path).infolist():
        name_len, extra_len = struct.unpack(
            "<HH", raw[info.header_offset + 26 : info.header_offset + 30]
        )
        offsets[info.filename] = info.header_offset + 30 + name_len + extra_len
    return offsets


def tiny_gpt2() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50)
    return transformers.GPT2LMHeadModel(config).eval()


def save_tuned_lens(model, directory: pathlib.Path) -> pathlib.Path:
    """A lens saved by tuned-lens itself, with random (non-symmetric, non-zero) translators."""
    lens = TunedLens.from_model(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for translator in lens.layer_translators:
            translator.weight.copy_(torch.randn(translator.weight.shape, generator=generator))
            translator.bias.copy_(torch.randn(translator.bias.shape, generator=generator))
    lens.save(directory)
    return directory


def lens_dir_with_params(tmp_path, tuned_lens_dir, params: bytes) -> pathlib.Path:
    """A lens directory with tuned-lens's config.json and `params` as its params.pt."""
    lens = tmp_path / "crafted"
    lens.mkdir(exist_ok=True)
    (lens / "config.json").write_bytes((tuned_lens_dir / "config.json").read_bytes())
    (lens / "params.pt").write_bytes(params)
    return lens
