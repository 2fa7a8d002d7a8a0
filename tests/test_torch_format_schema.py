"""torch_format.schema against tuned-lens 0.2.0: the configs it writes and reads, unembed_hash."""

from __future__ import annotations

import json
import pathlib

import ml_dtypes
import numpy as np
import pytest
import torch
import torch_format_reference
import transformers
from torch_format_reference import lens_dir_with_params
from tuned_lens import TunedLens
from tuned_lens.nn.unembed import Unembed
from tuned_lens.utils import tensor_hash

from jaxlens import torch_format
from jaxlens.torch_format import LensFileError


@pytest.fixture(scope="module")
def tiny_gpt2():
    return torch_format_reference.tiny_gpt2()


@pytest.fixture(scope="module")
def tuned_lens_dir(tiny_gpt2, tmp_path_factory) -> pathlib.Path:
    directory = tmp_path_factory.mktemp("tuned_lens") / "lens"
    return torch_format_reference.save_tuned_lens(tiny_gpt2, directory)


@pytest.mark.parametrize("revision", [None, "a1b2c3"])
def test_lens_config_is_the_config_tuned_lens_writes(tiny_gpt2, tmp_path, revision):
    TunedLens.from_model(tiny_gpt2, model_revision=revision).save(tmp_path / "lens")
    config = torch_format.lens_config(
        base_model_name_or_path=None,  # a model built from a config, as tiny_gpt2 is
        revision=revision,
        num_layers=np.int64(2),  # numpy ints (from array shapes) become JSON ints
        d_model=16,
        bias=True,
        unembed_hash=torch_format.unembed_hash(tiny_gpt2.lm_head.weight.detach().numpy()),
    )
    assert list(config) == list(torch_format.LENS_CONFIG_KEYS)
    assert config["lens_type"] == torch_format.LENS_TYPE
    assert json.dumps(config).encode() == (tmp_path / "lens" / "config.json").read_bytes()


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

    from jaxlens.models.gguf import GGUFFile

    tensor = GGUFFile.open(smollm2_path).tensors["token_embd.weight"]
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


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c.pop("d_model"), "lacks d_model"),
        (lambda c: c.update(num_hidden_layers="2"), "num_hidden_layers = '2'"),
        (lambda c: c.update(lens_type="affine"), "lens_type = 'affine'"),
    ],
)
def test_bad_configs_are_lens_file_errors(tmp_path, tuned_lens_dir, edit, match):
    lens = lens_dir_with_params(
        tmp_path, tuned_lens_dir, (tuned_lens_dir / "params.pt").read_bytes()
    )
    config = json.loads((lens / "config.json").read_text())
    edit(config)
    (lens / "config.json").write_text(json.dumps(config))
    with pytest.raises(LensFileError, match=match):
        torch_format.read_lens_dir(lens)
