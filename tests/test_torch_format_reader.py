"""torch_format.reader against torch 2.13's torch.save, and every file it refuses.

Values are compared bit for bit (through unsigned-integer views, so NaN payloads and -0.0 count),
and every file the reader rejects has a test that it is rejected without running anything.
"""

from __future__ import annotations

import collections
import os
import pathlib
import pickle
import re
import struct
import zipfile

import numpy as np
import pytest
import torch
import torch_format_reference
from torch_format_reference import (
    SHAPES,
    as_torch,
    bits,
    data_offsets,
    lens_dir_with_params,
    random_bits,
)

from jaxlens import torch_format
from jaxlens.torch_format import LensFileError, UnsafeLensFileError


@pytest.fixture(scope="module")
def tiny_gpt2():
    return torch_format_reference.tiny_gpt2()


@pytest.fixture(scope="module")
def tuned_lens_dir(tiny_gpt2, tmp_path_factory) -> pathlib.Path:
    directory = tmp_path_factory.mktemp("tuned_lens") / "lens"
    return torch_format_reference.save_tuned_lens(tiny_gpt2, directory)


# Reading what torch wrote ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_we_read_torch_save_files_bit_for_bit(tmp_path, dtype):
    rng = np.random.default_rng(1)
    expected = {name: random_bits(rng, shape, dtype) for name, shape in SHAPES.items()}
    torch.save(
        collections.OrderedDict((k, as_torch(v)) for k, v in expected.items()), tmp_path / "t.pt"
    )

    loaded = torch_format.load_torch_state_dict(tmp_path / "t.pt")
    assert list(loaded) == list(expected)
    for name, array in expected.items():
        assert (
            loaded[name].dtype == torch_format.DTYPES[dtype] and loaded[name].shape == array.shape
        )
        np.testing.assert_array_equal(bits(loaded[name]), bits(array), err_msg=name)


def test_we_read_views_of_one_shared_storage(tmp_path):
    big = torch.arange(60, dtype=torch.float32).reshape(5, 12)
    views = {
        "row1": big[1],  # offset 12
        "row3": big[3],  # offset 36
        "column": big[:, 2],  # stride 12
        "transposed": big.T,  # strides (1, 12)
        "block": big[1:3, 4:8],
        "param": torch.nn.Parameter(big[4, ::2]),  # _rebuild_parameter around a strided view
    }
    torch.save(views, tmp_path / "views.pt")
    records = [n for n in zipfile.ZipFile(tmp_path / "views.pt").namelist() if "/data/" in n]
    assert records == ["views/data/0"]  # torch wrote the whole storage once

    loaded = torch_format.load_torch_state_dict(tmp_path / "views.pt")
    for name, view in views.items():
        np.testing.assert_array_equal(loaded[name], view.detach().numpy(), err_msg=name)
        assert loaded[name].flags.c_contiguous and loaded[name].flags.writeable


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_we_read_the_legacy_format(tmp_path, dtype):
    rng = np.random.default_rng(2)
    expected = {
        "0.weight": random_bits(rng, (4, 4), dtype),
        "0.bias": random_bits(rng, (4,), dtype),
    }
    state = {k: as_torch(v) for k, v in expected.items()}
    state["view"] = as_torch(expected["0.weight"])[1:, ::2]
    torch.save(state, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(tmp_path / "old.pt")

    loaded = torch_format.load_torch_state_dict(tmp_path / "old.pt")
    for name, array in expected.items():
        np.testing.assert_array_equal(bits(loaded[name]), bits(array), err_msg=name)
    np.testing.assert_array_equal(bits(loaded["view"]), bits(expected["0.weight"][1:, ::2]))


# Refusing unsafe and broken files ------------------------------------------------------------


class _Payload:
    """Unpickling this runs `func(*args)`: the classic pickle exploit."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(sentinel: pathlib.Path):
    # Keyed by the global the error must name (protocol 2 spells builtins "__builtin__").
    return {
        "posix.system": _Payload(os.system, f"touch {sentinel}"),
        "__builtin__.exec": _Payload(exec, f"open({str(sentinel)!r}, 'w').close()"),
        "__builtin__.eval": _Payload(eval, f"open({str(sentinel)!r}, 'w').close()"),
        # a method is reached through getattr(pathlib.Path, "touch")
        "__builtin__.getattr": _Payload(pathlib.Path.touch, sentinel),
    }


def _zip_with_data_pkl(path: pathlib.Path, data_pkl: bytes) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("params/data.pkl", data_pkl)
        zf.writestr("params/byteorder", "little")
        zf.writestr("params/version", "3\n")


@pytest.mark.parametrize("forbidden", list(_payloads(pathlib.Path("x"))))
def test_pickles_that_run_code_are_refused_and_nothing_runs(tmp_path, tuned_lens_dir, forbidden):
    # The payload is live: a plain unpickler runs it.
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_payloads(proof)[forbidden], protocol=2))
    assert proof.exists()

    sentinel = tmp_path / "sentinel"
    state = collections.OrderedDict({"0.weight": _payloads(sentinel)[forbidden]})
    _zip_with_data_pkl(tmp_path / "evil.pt", pickle.dumps(state, protocol=2))
    lens = lens_dir_with_params(tmp_path, tuned_lens_dir, (tmp_path / "evil.pt").read_bytes())
    with pytest.raises(UnsafeLensFileError, match=rf"{forbidden}.*refused"):
        torch_format.read_lens_dir(lens)
    # Not zipped: a bare pickle (what a legacy-format file starts with).
    (tmp_path / "bare.pt").write_bytes(pickle.dumps(_payloads(sentinel)[forbidden], protocol=2))
    with pytest.raises(UnsafeLensFileError, match=forbidden):
        torch_format.load_torch_state_dict(tmp_path / "bare.pt")
    # A legacy file with valid headers and the payload as its object.
    headers = b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, {}))
    (tmp_path / "legacy.pt").write_bytes(headers + pickle.dumps(state, protocol=2))
    with pytest.raises(UnsafeLensFileError, match=forbidden):
        torch_format.load_torch_state_dict(tmp_path / "legacy.pt")
    assert not sentinel.exists()
    assert issubclass(UnsafeLensFileError, ValueError)


def test_storage_beyond_its_record_is_refused(tmp_path):
    # Our own file with the storage offset bumped from 0 to 2: the tensor would read past the end.
    torch_format.save_torch_state_dict(tmp_path / "p.pt", {"w": np.zeros(4, np.float32)})
    with zipfile.ZipFile(tmp_path / "p.pt") as zf:
        records = {n: zf.read(n) for n in zf.namelist()}
    assert records["p/data.pkl"].count(b"QK\x00") == 1
    records["p/data.pkl"] = records["p/data.pkl"].replace(b"QK\x00", b"QK\x02")
    with zipfile.ZipFile(tmp_path / "p.pt", "w") as zf:
        for name, data in records.items():
            zf.writestr(name, data)
    with pytest.raises(LensFileError, match="past the end of its storage of 4 values"):
        torch_format.load_torch_state_dict(tmp_path / "p.pt")


def test_other_tensor_dtypes_are_refused(tmp_path):
    torch.save({"0.weight": torch.zeros(2, 2, dtype=torch.float64)}, tmp_path / "p.pt")
    with pytest.raises(LensFileError, match="DoubleStorage.*float32, float16 or bfloat16"):
        torch_format.load_torch_state_dict(tmp_path / "p.pt")


def test_truncated_corrupt_and_random_files_are_lens_file_errors(tmp_path, tuned_lens_dir):
    good = (tuned_lens_dir / "params.pt").read_bytes()
    flipped = bytearray(good)
    storage_start = data_offsets(tuned_lens_dir / "params.pt")["params/data/0"]
    flipped[storage_start + 3] ^= 0xFF  # caught by the zip CRC
    cases = {
        "half": good[: len(good) // 2],
        "random": np.random.default_rng(7).bytes(len(good)),
        "pickle": pickle.dumps([1, 2, 3], protocol=2),
        "empty": b"",
        "flipped": bytes(flipped),
    }
    for case, content in cases.items():
        (tmp_path / case).mkdir()
        lens = lens_dir_with_params(tmp_path / case, tuned_lens_dir, content)
        with pytest.raises(LensFileError, match=r"params\.pt.*(truncated or corrupt|torch\.save)"):
            torch_format.read_lens_dir(lens)


def test_a_storage_larger_than_the_file_is_refused_before_reading(tmp_path):
    # A legacy file whose storage claims 10**12 values (in the pickle and in its count): reading
    # that many bytes would allocate 4 TB before finding out the file is short.
    torch.save({"w": torch.zeros(3)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    raw = (tmp_path / "old.pt").read_bytes()
    huge = 10**12
    assert raw.count(b"K\x03Nt") == 1 and raw.count(struct.pack("<q", 3)) == 1
    raw = raw.replace(b"K\x03Nt", b"\x8a\x06" + huge.to_bytes(6, "little") + b"Nt")
    (tmp_path / "old.pt").write_bytes(raw.replace(struct.pack("<q", 3), struct.pack("<q", huge)))
    with pytest.raises(LensFileError, match="more than the whole file holds"):
        torch_format.load_torch_state_dict(tmp_path / "old.pt")


def _archive_with(tmp_path, rename=lambda name: name, extra=()) -> pathlib.Path:
    """torch.save's own archive of one tensor, its members renamed and `extra` ones added."""
    torch.save({"w": torch.arange(3.0)}, tmp_path / "params.pt")
    with zipfile.ZipFile(tmp_path / "params.pt") as zf:
        records = {name: zf.read(name) for name in zf.namelist()}
    assert list(records)[0] == "params/data.pkl"
    with zipfile.ZipFile(tmp_path / "params.pt", "w") as zf:
        for name, data in records.items():
            zf.writestr(rename(name), data)
        for name in extra:
            zf.writestr(name, b"anything")
    return tmp_path / "params.pt"


def _refused_unread(path, member: str, monkeypatch) -> None:
    def no_reading(*args, **kwargs):
        raise AssertionError("a record was read before the member names were checked")

    monkeypatch.setattr(zipfile.ZipFile, "open", no_reading)
    with pytest.raises(UnsafeLensFileError, match=rf"member {re.escape(repr(member))}, outside"):
        torch_format.load_torch_state_dict(path)


def test_the_archives_of_the_unsafe_member_tests_are_otherwise_valid(tmp_path):
    path = _archive_with(tmp_path, extra=["params/notes/x"])  # a member inside is fine
    np.testing.assert_array_equal(torch_format.load_torch_state_dict(path)["w"], [0, 1, 2])


@pytest.mark.parametrize(
    "member, torch_refuses",
    [
        ("params/../x", False),  # climbs out of the folder after entering it
        ("params/data/../../x", False),
        ("../x", True),
        ("/x", True),  # absolute
        ("/params/x", True),
        ("params\\..\\x", True),  # a path separator to Windows tools
        ("params/..\\..\\x", False),
        ("other/x", True),  # a folder other than the one holding data.pkl
        ("other/data/0", True),
    ],
)
def test_members_outside_the_archive_folder_are_refused_unread(
    tmp_path, monkeypatch, member, torch_refuses
):
    path = _archive_with(tmp_path, extra=[member])
    if torch_refuses:  # torch 2.13 lets names with ".." inside its folder pass; we do not
        with pytest.raises(RuntimeError, match="not in a subdirectory"):
            torch.load(path)
    _refused_unread(path, member, monkeypatch)


@pytest.mark.parametrize("folder", ["..", ""])
def test_an_archive_folder_outside_the_archive_is_refused_unread(tmp_path, monkeypatch, folder):
    # Every member lies in one folder, but that folder is "../" or "/": torch 2.13 reads these.
    path = _archive_with(tmp_path, rename=lambda name: name.replace("params/", f"{folder}/", 1))
    _refused_unread(path, f"{folder}/data.pkl", monkeypatch)
