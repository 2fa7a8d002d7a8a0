"""torch_format against the real references: torch 2.13 (save, load) and tuned-lens 0.2.0.

Values are compared bit for bit (through unsigned-integer views, so NaN payloads and -0.0 count),
and every file the module rejects has a test that it is rejected without running anything.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import pathlib
import pickle
import pickletools
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from tuned_lens import TunedLens
from tuned_lens.nn.unembed import Unembed
from tuned_lens.utils import tensor_hash

from jaxlens import torch_format
from jaxlens.torch_format import LensFileError, UnsafeLensFileError

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TORCH_INTS = {4: torch.int32, 2: torch.int16}


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
    dtype = TORCH_DTYPES[torch_format._dtype_name(array.dtype)]
    return torch.from_numpy(array.view(f"i{width}").copy()).view(dtype)


def snapshot(directory: pathlib.Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


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


# torch.save archives ---------------------------------------------------------------------------

SHAPES = {"0.weight": (5, 7), "0.bias": (7,), "cube": (2, 3, 4), "scalar": (), "empty": (0, 3)}


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


# tuned-lens interop ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def tuned_lens_dir(tiny_gpt2, tmp_path_factory) -> pathlib.Path:
    """A lens saved by tuned-lens itself, with random (non-symmetric, non-zero) translators."""
    lens = TunedLens.from_model(tiny_gpt2)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for translator in lens.layer_translators:
            translator.weight.copy_(torch.randn(translator.weight.shape, generator=generator))
            translator.bias.copy_(torch.randn(translator.bias.shape, generator=generator))
    directory = tmp_path_factory.mktemp("tuned_lens") / "lens"
    lens.save(directory)
    return directory


def test_read_lens_dir_reads_what_tuned_lens_saved(tuned_lens_dir, tiny_gpt2):
    state = torch.load(tuned_lens_dir / "params.pt")
    lens_file = torch_format.read_lens_dir(tuned_lens_dir)

    assert list(lens_file.config) == list(torch_format.LENS_CONFIG_KEYS)
    assert lens_file.config == json.loads((tuned_lens_dir / "config.json").read_text())
    assert lens_file.dtype == "float32" and lens_file.kernel_ldd.dtype == np.float32
    assert lens_file.kernel_ldd.shape == (2, 16, 16) and lens_file.bias_ld.shape == (2, 16)
    for i in range(2):
        weight = state[f"{i}.weight"].numpy()
        assert not np.array_equal(weight, weight.T)  # so a missing transpose would show
        np.testing.assert_array_equal(bits(lens_file.kernel_ldd[i]), bits(weight.T))
        np.testing.assert_array_equal(bits(lens_file.bias_ld[i]), bits(state[f"{i}.bias"].numpy()))


def test_our_lens_dir_loads_in_tuned_lens_unchanged(tuned_lens_dir, tiny_gpt2, tmp_path):
    lens_file = torch_format.read_lens_dir(tuned_lens_dir)
    out = torch_format.write_lens_dir(
        tmp_path / "ours", lens_file.kernel_ldd, lens_file.bias_ld, config=lens_file.config
    )
    assert out == tmp_path / "ours" and sorted(os.listdir(out)) == ["config.json", "params.pt"]

    original = TunedLens.from_model_and_pretrained(tiny_gpt2, str(tuned_lens_dir))
    reloaded = TunedLens.from_model_and_pretrained(tiny_gpt2, str(out))
    for a, b in zip(original.layer_translators, reloaded.layer_translators, strict=True):
        for name in ("weight", "bias"):
            np.testing.assert_array_equal(
                torch_bits(getattr(a, name).detach()), torch_bits(getattr(b, name).detach())
            )
    theirs, ours = torch.load(tuned_lens_dir / "params.pt"), torch.load(out / "params.pt")
    assert list(ours) == list(theirs) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype == torch.float32
        np.testing.assert_array_equal(torch_bits(ours[name]), torch_bits(theirs[name]))
    # Same JSON formatting as tuned-lens, so the config files are byte-identical.
    assert (out / "config.json").read_bytes() == (tuned_lens_dir / "config.json").read_bytes()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_lens_loads_in_tuned_lens_as_the_rounded_values(
    tuned_lens_dir, tiny_gpt2, tmp_path, dtype
):
    lens_file = torch_format.read_lens_dir(tuned_lens_dir)
    out = torch_format.write_lens_dir(
        tmp_path / dtype,
        lens_file.kernel_ldd,
        lens_file.bias_ld,
        config=lens_file.config,
        dtype=dtype,
    )
    stored = torch.load(out / "params.pt")
    assert {t.dtype for t in stored.values()} == {TORCH_DTYPES[dtype]}

    # tuned-lens builds float32 translators (the model's dtype) and load_state_dict casts into them.
    lens = TunedLens.from_model_and_pretrained(tiny_gpt2, str(out))
    original = torch.load(tuned_lens_dir / "params.pt")
    for i, translator in enumerate(lens.layer_translators):
        for name in ("weight", "bias"):
            value = getattr(translator, name).detach()
            rounded = original[f"{i}.{name}"].to(TORCH_DTYPES[dtype]).float()
            assert value.dtype == torch.float32
            np.testing.assert_array_equal(torch_bits(value), torch_bits(rounded))
            assert not torch.equal(value, original[f"{i}.{name}"])  # it really was rounded

    again = torch_format.read_lens_dir(out)
    assert again.dtype == dtype
    np.testing.assert_array_equal(again.kernel_ldd[0], stored["0.weight"].float().numpy().T)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_safetensors_round_trip(tuned_lens_dir, tmp_path, dtype):
    lens_file = torch_format.read_lens_dir(tuned_lens_dir)
    kwargs = dict(config=lens_file.config, dtype=dtype)
    st = torch_format.write_lens_dir(
        tmp_path / "st",
        lens_file.kernel_ldd,
        lens_file.bias_ld,
        file_format="safetensors",
        **kwargs,
    )
    pt = torch_format.write_lens_dir(
        tmp_path / "pt", lens_file.kernel_ldd, lens_file.bias_ld, **kwargs
    )
    assert sorted(os.listdir(st)) == ["config.json", "params.safetensors"]

    from_st, from_pt = torch_format.read_lens_dir(st), torch_format.read_lens_dir(pt)
    assert from_st.dtype == from_pt.dtype == dtype and from_st.config == from_pt.config
    np.testing.assert_array_equal(bits(from_st.kernel_ldd), bits(from_pt.kernel_ldd))
    np.testing.assert_array_equal(bits(from_st.bias_ld), bits(from_pt.bias_ld))
    # Same names, layout and dtype as params.pt, read by safetensors' own torch loader.
    by_torch, pt_state = (
        safetensors.torch.load_file(st / "params.safetensors"),
        torch.load(pt / "params.pt"),
    )
    assert sorted(by_torch) == sorted(pt_state)
    for name in pt_state:
        np.testing.assert_array_equal(torch_bits(by_torch[name]), torch_bits(pt_state[name]))


def test_lens_without_bias_round_trips(tmp_path):
    kernel = np.random.default_rng(4).normal(size=(3, 4, 4)).astype(np.float32)
    out = torch_format.write_lens_dir(
        tmp_path / "lens", kernel, None, config={"base_model_name_or_path": "m"}
    )
    lens_file = torch_format.read_lens_dir(out)
    assert lens_file.bias_ld is None and lens_file.config["bias"] is False
    assert lens_file.config["num_hidden_layers"] == 3 and lens_file.config["d_model"] == 4
    np.testing.assert_array_equal(lens_file.kernel_ldd, kernel)
    assert list(torch.load(out / "params.pt")) == ["0.weight", "1.weight", "2.weight"]


def test_misspelt_unembed_hash_is_used_and_unknown_keys_ignored(tuned_lens_dir, tmp_path):
    lens = tmp_path / "old"
    lens.mkdir()
    (lens / "params.pt").write_bytes((tuned_lens_dir / "params.pt").read_bytes())
    config = json.loads((tuned_lens_dir / "config.json").read_text())
    config["unemebd_hash"] = config.pop("unembed_hash")
    config["something_new"] = 1
    (lens / "config.json").write_text(json.dumps(config))
    read = torch_format.read_lens_dir(lens).config
    assert list(read) == list(torch_format.LENS_CONFIG_KEYS)
    assert read["unembed_hash"] == config["unemebd_hash"] is not None


def test_unembed_hash_matches_tuned_lens(tuned_lens_dir, tiny_gpt2):
    unembed_vd = tiny_gpt2.lm_head.weight.detach().numpy()  # 800 values: printed in full
    expected = json.loads((tuned_lens_dir / "config.json").read_text())["unembed_hash"]
    assert torch_format.unembed_hash(unembed_vd) == expected


def test_unembed_hash_matches_tuned_lens_on_smollm2(smollm2_path):
    import gguf

    reader = gguf.GGUFReader(smollm2_path)
    (tensor,) = [t for t in reader.tensors if t.name == "token_embd.weight"]
    unembed_vd = gguf.dequantize(tensor.data, tensor.tensor_type)  # SmolLM2 ties lm_head to it
    assert unembed_vd.shape == (49152, 576)  # numpy summarises it: only the corners count
    config = transformers.GPT2Config(n_layer=1, n_head=1, n_embd=576, vocab_size=49152)
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(config)
    model.lm_head.weight = torch.nn.Parameter(torch.from_numpy(unembed_vd), requires_grad=False)
    model.transformer.ln_f = torch.nn.LayerNorm(576)
    expected = Unembed(model).unembedding_hash()

    assert torch_format.unembed_hash(unembed_vd) == expected
    assert torch_format.unembed_hash(unembed_vd.astype(ml_dtypes.bfloat16)) != expected
    with np.printoptions(threshold=10, edgeitems=1):  # a caller's print options do not leak in
        assert torch_format.unembed_hash(unembed_vd) == expected
        assert tensor_hash(unembed_vd) != expected  # (they would have, through array_str)


# Writing lens directories: validation, overwrite, atomicity --------------------------------------


def _lens_arrays(seed=5, num_layers=2, d_model=4):
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(num_layers, d_model, d_model)).astype(np.float32)
    return kernel, rng.normal(size=(num_layers, d_model)).astype(np.float32)


CONFIG = {"base_model_name_or_path": "tiny", "unembed_hash": "abc"}


@pytest.fixture
def existing_lens(tmp_path) -> pathlib.Path:
    out = tmp_path / "lens"
    torch_format.write_lens_dir(out, *_lens_arrays(seed=6), config=CONFIG)
    (out / "notes.txt").write_text("the user's notes")
    return out


def _siblings(out: pathlib.Path) -> list[str]:
    return sorted(os.listdir(out.parent))


def test_existing_dir_needs_overwrite_and_is_left_untouched(existing_lens):
    before = snapshot(existing_lens)
    with pytest.raises(FileExistsError, match="--overwrite"):
        torch_format.write_lens_dir(existing_lens, *_lens_arrays(), config=CONFIG)
    assert snapshot(existing_lens) == before and _siblings(existing_lens) == ["lens"]


def test_overwrite_replaces_the_directory(existing_lens):
    kernel, bias = _lens_arrays()
    torch_format.write_lens_dir(existing_lens, kernel, bias, config=CONFIG, overwrite=True)
    assert sorted(os.listdir(existing_lens)) == ["config.json", "params.pt"]
    np.testing.assert_array_equal(torch_format.read_lens_dir(existing_lens).kernel_ldd, kernel)
    assert _siblings(existing_lens) == ["lens"]


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(kernel_ldd=np.zeros((2, 4, 4), np.complex64)), "complex64.*floating point"),
        (dict(kernel_ldd=np.zeros((2, 4, 3), np.float32)), r"\[L, d, d\].*\(2, 4, 3\)"),
        (dict(bias_ld=np.zeros((2, 5), np.float32)), r"bias_ld must be \[2, 4\]"),
        (dict(kernel_ldd=np.full((2, 4, 4), np.nan, np.float32)), "non-finite"),
        (dict(kernel_ldd=np.full((2, 4, 4), 1e5, np.float32), dtype="float16"), "bfloat16"),
        (dict(dtype="float64"), "float32, float16, bfloat16"),
        (dict(file_format="npz"), "pt, safetensors"),
        (dict(config={**CONFIG, "d_model": 8}), r"config\['d_model'\] = 8.*4"),
        (dict(config={**CONFIG, "bias": False}), r"config\['bias'\]"),
        (dict(config={"unembed_hash": None}), "base_model_name_or_path"),
        (dict(config={**CONFIG, "version": 2}), r"\['version'\]"),
    ],
)
def test_bad_inputs_are_rejected_before_touching_disk(existing_lens, change, match):
    kernel, bias = _lens_arrays()
    kwargs = {**dict(kernel_ldd=kernel, bias_ld=bias, config=CONFIG, overwrite=True), **change}
    before = snapshot(existing_lens)
    with pytest.raises(ValueError, match=match):
        torch_format.write_lens_dir(existing_lens, **kwargs)
    assert snapshot(existing_lens) == before and _siblings(existing_lens) == ["lens"]


@pytest.mark.parametrize("overwrite", [True, False])
def test_crash_in_the_middle_of_params_pt_leaves_nothing_behind(
    existing_lens, monkeypatch, overwrite
):
    out = existing_lens if overwrite else existing_lens.parent / "fresh"
    before = snapshot(existing_lens)
    calls = []
    real_write_record = torch_format._write_record

    def failing_write_record(zf, f, name, data):
        calls.append(name)
        if name.endswith("/data/1"):  # data.pkl and the first tensor are on disk by now
            raise OSError(28, "No space left on device")
        real_write_record(zf, f, name, data)

    monkeypatch.setattr(torch_format, "_write_record", failing_write_record)
    with pytest.raises(OSError, match="No space left"):
        torch_format.write_lens_dir(out, *_lens_arrays(), config=CONFIG, overwrite=overwrite)
    assert calls[-1].endswith("/data/1")
    assert snapshot(existing_lens) == before and _siblings(existing_lens) == ["lens"]


def test_crash_while_renaming_into_place_restores_the_old_lens(existing_lens, monkeypatch):
    before = snapshot(existing_lens)
    real_rename = os.rename

    def failing_rename(src, dst):
        if str(src).endswith(".tmp"):  # moving the new lens into place
            raise OSError(5, "Input/output error")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="Input/output"):
        torch_format.write_lens_dir(existing_lens, *_lens_arrays(), config=CONFIG, overwrite=True)
    assert snapshot(existing_lens) == before and _siblings(existing_lens) == ["lens"]


def test_crash_after_the_params_file_leaves_nothing_behind(existing_lens, monkeypatch):
    before = snapshot(existing_lens)
    written = []

    def crash_instead_of_config(directory, config):
        written.extend(os.listdir(directory))
        raise RuntimeError("simulated crash before config.json")

    monkeypatch.setattr(torch_format, "_write_config", crash_instead_of_config)
    with pytest.raises(RuntimeError, match="simulated crash"):
        torch_format.write_lens_dir(
            existing_lens, *_lens_arrays(), config=CONFIG, file_format="safetensors", overwrite=True
        )
    assert written == ["params.safetensors"]
    assert snapshot(existing_lens) == before and _siblings(existing_lens) == ["lens"]


# Reading: refusing unsafe and broken files -------------------------------------------------------


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


def _lens_dir_with_params(tmp_path, tuned_lens_dir, params: bytes) -> pathlib.Path:
    lens = tmp_path / "crafted"
    lens.mkdir(exist_ok=True)
    (lens / "config.json").write_bytes((tuned_lens_dir / "config.json").read_bytes())
    (lens / "params.pt").write_bytes(params)
    return lens


@pytest.mark.parametrize("forbidden", list(_payloads(pathlib.Path("x"))))
def test_pickles_that_run_code_are_refused_and_nothing_runs(tmp_path, tuned_lens_dir, forbidden):
    # The payload is live: a plain unpickler runs it.
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_payloads(proof)[forbidden], protocol=2))
    assert proof.exists()

    sentinel = tmp_path / "sentinel"
    state = collections.OrderedDict({"0.weight": _payloads(sentinel)[forbidden]})
    _zip_with_data_pkl(tmp_path / "evil.pt", pickle.dumps(state, protocol=2))
    lens = _lens_dir_with_params(tmp_path, tuned_lens_dir, (tmp_path / "evil.pt").read_bytes())
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
        lens = _lens_dir_with_params(tmp_path / case, tuned_lens_dir, content)
        with pytest.raises(LensFileError, match=r"params\.pt.*(truncated or corrupt|torch\.save)"):
            torch_format.read_lens_dir(lens)


def test_missing_files_are_file_not_found(tmp_path, tuned_lens_dir):
    with pytest.raises(FileNotFoundError, match="No lens directory"):
        torch_format.read_lens_dir(tmp_path / "nowhere")
    lens = tmp_path / "lens"
    lens.mkdir()
    (lens / "params.pt").write_bytes((tuned_lens_dir / "params.pt").read_bytes())
    with pytest.raises(FileNotFoundError, match="config.json"):
        torch_format.read_lens_dir(lens)
    (lens / "params.pt").unlink()
    (lens / "config.json").write_bytes((tuned_lens_dir / "config.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="params.pt"):
        torch_format.read_lens_dir(lens)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda s: s.update({"2.weight": torch.zeros(16, 16)}), r"unexpected keys \['2.weight'\]"),
        (lambda s: s.pop("1.bias"), r"missing keys \['1.bias'\]"),
        (
            lambda s: s.update({"0.weight": torch.zeros(16, 8)}),
            r"'0.weight'.*\[16, 8\].*\[16, 16\]",
        ),
        (lambda s: s.update({"1.bias": torch.zeros(17)}), r"'1.bias'.*\[17\]"),
    ],
)
def test_keys_and_shapes_must_match_the_config(tmp_path, tuned_lens_dir, edit, match):
    state = torch.load(tuned_lens_dir / "params.pt")
    edit(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    lens = _lens_dir_with_params(tmp_path, tuned_lens_dir, buffer.getvalue())
    with pytest.raises(LensFileError, match=match):
        torch_format.read_lens_dir(lens)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c.pop("d_model"), "lacks d_model"),
        (lambda c: c.update(num_hidden_layers="2"), "num_hidden_layers = '2'"),
        (lambda c: c.update(lens_type="affine"), "lens_type = 'affine'"),
    ],
)
def test_bad_configs_are_lens_file_errors(tmp_path, tuned_lens_dir, edit, match):
    lens = _lens_dir_with_params(
        tmp_path, tuned_lens_dir, (tuned_lens_dir / "params.pt").read_bytes()
    )
    config = json.loads((lens / "config.json").read_text())
    edit(config)
    (lens / "config.json").write_text(json.dumps(config))
    with pytest.raises(LensFileError, match=match):
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
