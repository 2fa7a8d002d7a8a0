"""torch_format.writer against torch 2.13: what torch.load reads from our archives, their layout.

Values are compared bit for bit (through unsigned-integer views, so NaN payloads and -0.0 count).
"""

from __future__ import annotations

import collections
import pickletools
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch
from torch_format_reference import (
    SHAPES,
    TORCH_DTYPES,
    as_torch,
    bits,
    data_offsets,
    random_bits,
    torch_bits,
)

from jaxlens import torch_format


@pytest.mark.parametrize("weights_only", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_torch_load_reads_our_files_bit_for_bit(tmp_path, dtype, weights_only):
    rng = np.random.default_rng(0)
    tensors = {name: random_bits(rng, shape, dtype) for name, shape in SHAPES.items()}
    torch_format.save_torch_state_dict(tmp_path / "params.pt", tensors)

    loaded = torch.load(tmp_path / "params.pt", weights_only=weights_only)
    assert isinstance(loaded, collections.OrderedDict)
    assert list(loaded) == list(tensors)
    for name, array in tensors.items():
        assert loaded[name].dtype == TORCH_DTYPES[dtype], name
        assert tuple(loaded[name].shape) == array.shape, name
        np.testing.assert_array_equal(torch_bits(loaded[name]), bits(array), err_msg=name)


def test_our_archive_has_torch_saves_records_alignment_and_globals(tmp_path):
    rng = np.random.default_rng(3)
    tensors = {"0.weight": rng.normal(size=(3, 5)).astype(np.float32)}
    tensors["0.bias"] = rng.normal(size=(3,)).astype(np.float16)
    tensors["1.weight"] = rng.normal(size=(2, 2)).astype(ml_dtypes.bfloat16)
    (tmp_path / "ours").mkdir()
    (tmp_path / "theirs").mkdir()
    ours, theirs = tmp_path / "ours" / "params.pt", tmp_path / "theirs" / "params.pt"
    torch_format.save_torch_state_dict(ours, tensors)
    torch.save(collections.OrderedDict((k, as_torch(v)) for k, v in tensors.items()), theirs)

    z_ours, z_theirs = zipfile.ZipFile(ours), zipfile.ZipFile(theirs)
    assert z_ours.namelist() == z_theirs.namelist()
    for name in z_ours.namelist():
        assert z_ours.getinfo(name).compress_type == zipfile.ZIP_STORED
        if "serialization_id" not in name and not name.endswith("data.pkl"):
            assert z_ours.read(name) == z_theirs.read(name), name
    for path in (ours, theirs):
        assert {n: o % 64 for n, o in data_offsets(path).items()} == dict.fromkeys(
            z_ours.namelist(), 0
        )

    def globals_of(data_pkl: bytes) -> set[str]:
        return {arg for op, arg, _ in pickletools.genops(data_pkl) if op.name == "GLOBAL"}

    assert globals_of(z_ours.read("params/data.pkl")) == globals_of(
        z_theirs.read("params/data.pkl")
    )


def test_saving_rejects_other_dtypes(tmp_path):
    with pytest.raises(ValueError, match=r"'steps' is int64.*float32, float16 or bfloat16"):
        torch_format.save_torch_state_dict(tmp_path / "p.pt", {"steps": np.arange(3)})


@pytest.mark.parametrize(
    "filename, folder",
    [("params.pt", "params"), ("..pt", "."), ("...pt", "archive"), ("a\\b.pt", "archive")],
)
def test_the_archive_folder_is_the_stem_where_that_is_a_plain_folder_name(
    tmp_path, filename, folder
):
    # As torch, we name the folder after the stem ("..pt" gives "." in torch too); a stem that
    # would climb out ("..") or hold a Windows separator gets torch's name for a buffer's.
    tensors = {"w": np.arange(3, dtype=np.float32)}
    torch_format.save_torch_state_dict(tmp_path / filename, tensors)
    assert zipfile.ZipFile(tmp_path / filename).namelist()[0] == f"{folder}/data.pkl"
    np.testing.assert_array_equal(
        torch_format.load_torch_state_dict(tmp_path / filename)["w"], tensors["w"]
    )
    np.testing.assert_array_equal(torch.load(tmp_path / filename)["w"].numpy(), tensors["w"])
