"""torch_format.lens_dir against tuned-lens 0.2.0 and torch 2.13, and its atomic writes.

Values are compared bit for bit (through unsigned-integer views, so NaN payloads and -0.0 count).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib

import numpy as np
import pytest
import safetensors.torch
import torch
import torch_format_reference
from torch_format_reference import TORCH_DTYPES, bits, lens_dir_with_params, torch_bits
from tuned_lens import TunedLens

from jaxlens import torch_format
from jaxlens.torch_format import LensFileError, lens_dir, writer


def snapshot(directory: pathlib.Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny_gpt2():
    return torch_format_reference.tiny_gpt2()


@pytest.fixture(scope="module")
def tuned_lens_dir(tiny_gpt2, tmp_path_factory) -> pathlib.Path:
    directory = tmp_path_factory.mktemp("tuned_lens") / "lens"
    return torch_format_reference.save_tuned_lens(tiny_gpt2, directory)


# Reading and writing what tuned-lens reads ----------------------------------------------------


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
    lens = lens_dir_with_params(tmp_path, tuned_lens_dir, buffer.getvalue())
    with pytest.raises(LensFileError, match=match):
        torch_format.read_lens_dir(lens)


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
    real_write_record = writer._write_record

    def failing_write_record(zf, f, name, data):
        calls.append(name)
        if name.endswith("/data/1"):  # data.pkl and the first tensor are on disk by now
            raise OSError(28, "No space left on device")
        real_write_record(zf, f, name, data)

    monkeypatch.setattr(writer, "_write_record", failing_write_record)
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

    monkeypatch.setattr(lens_dir, "_write_config", crash_instead_of_config)
    with pytest.raises(RuntimeError, match="simulated crash"):
        torch_format.write_lens_dir(
            existing_lens, *_lens_arrays(), config=CONFIG, file_format="safetensors", overwrite=True
        )
    assert written == ["params.safetensors"]
    assert snapshot(existing_lens) == before and _siblings(existing_lens) == ["lens"]
