"""Tests of jaxlens.models.gguf against transformers' own (PyTorch) GGUF loading of the real
SmolLM2-135M checkpoint, plus the torch-free guarantee and the errors on bad files."""

from __future__ import annotations

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest

from jaxlens.models.gguf import _unpermute_rotary_rows, load_gguf_tokenizer, read_gguf

CONFIG_FIELDS = [
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "max_position_embeddings",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
]


@pytest.fixture(scope="module")
def checkpoint(smollm2_path):
    return read_gguf(smollm2_path)


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return load_gguf_tokenizer(smollm2_path)


@pytest.fixture(scope="module")
def torch_model(smollm2_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32
    )


def test_state_dict_equals_transformers_pytorch_loading(checkpoint, torch_model):
    reference = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    ours = checkpoint.state_dict
    # The PyTorch model lists its tied lm_head as a separate entry; the file has no output.weight.
    assert set(reference) - set(ours) == {"lm_head.weight"}
    assert set(ours) <= set(reference)
    np.testing.assert_array_equal(reference["lm_head.weight"], ours["model.embed_tokens.weight"])
    assert len(ours) == 2 + 9 * 30
    for name, array in ours.items():
        assert type(array) is np.ndarray and array.dtype == np.float32, name
        assert array.shape == reference[name].shape, name
        np.testing.assert_allclose(array, reference[name], rtol=0, atol=1e-6, err_msg=name)


def test_config_agrees_with_transformers_and_the_known_facts(checkpoint, torch_model):
    from transformers import LlamaConfig

    config = checkpoint.config
    for field in CONFIG_FIELDS:
        assert config[field] == getattr(torch_model.config, field), field
    assert "rope_scaling" not in config and torch_model.config.rope_scaling is None
    assert LlamaConfig(**config).to_dict()["rope_theta"] == 100000.0
    # SmolLM2-135M as published: 30 layers, d=576, 9 heads of 64, 3 KV heads, tied embeddings.
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (
        30,
        576,
        1536,
    )
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert (config["head_dim"], config["vocab_size"], config["rope_theta"]) == (64, 49152, 1e5)
    assert config["tie_word_embeddings"] is True
    assert checkpoint.state_dict["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert checkpoint.state_dict["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)


def test_unpermute_inverts_llama_cpp_rotary_interleaving():
    heads, head_dim, cols = 3, 8, 5
    hf = np.arange(heads * head_dim * cols, dtype=np.float32).reshape(heads * head_dim, cols)
    # llama.cpp's converter: per head, interleave the rows of the two rotary halves.
    interleaved = (
        hf.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(heads * head_dim, cols)
    )
    assert not np.array_equal(interleaved, hf)
    np.testing.assert_array_equal(_unpermute_rotary_rows(interleaved, heads), hf)


def test_tokenizer_matches_transformers_on_shakespeare(
    smollm2_path, tokenizer, torch_model, shakespeare_passage
):
    # transformers' GGUF tokenizer loading needs torch (torch_model skips the test without it).
    from transformers import AutoTokenizer

    # Passing the config spares AutoTokenizer a second parse of the file to find the model type.
    reference = AutoTokenizer.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name, config=torch_model.config
    )
    assert type(reference).__name__ == "LlamaTokenizerFast"
    ours = tokenizer(shakespeare_passage, add_special_tokens=False).input_ids
    theirs = reference(shakespeare_passage, add_special_tokens=False).input_ids
    assert len(ours) > 200
    assert ours == theirs
    # The file says add_bos_token = false, so nothing is added. (transformers builds a
    # LlamaTokenizerFast that prepends <|im_start|> regardless.)
    assert tokenizer(shakespeare_passage).input_ids == ours
    assert tokenizer.decode(ours) == shakespeare_passage


def test_tokenizer_special_tokens_and_digits(tokenizer):
    ids = tokenizer("<|im_start|>user\nIn 1601<|im_end|>").input_ids
    assert ids[0] == 1 and ids[-1] == 2
    # llama.cpp's "smollm" pre-tokenizer (like the original SmolLM2 tokenizer) splits digits.
    assert tokenizer.convert_ids_to_tokens(ids)[-5:-1] == ["1", "6", "0", "1"]
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tokenizer.unk_token == "<|endoftext|>"
    assert len(tokenizer) == 49152
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert "<|im_start|>user\nHi<|im_end|>" in chat


# Runs in a fresh interpreter in which torch cannot be found or imported.
_TORCH_FREE_SCRIPT = """
import importlib.abc, importlib.util, json, sys

_find_spec = importlib.util.find_spec

def find_spec(name, *args, **kwargs):
    if name == "torch" or name.startswith("torch."):
        return None
    return _find_spec(name, *args, **kwargs)

class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
        return None

importlib.util.find_spec = find_spec
sys.meta_path.insert(0, BlockTorch())
try:
    import torch  # noqa: F401
    blocked = False
except ImportError:
    blocked = True

from jaxlens.models.gguf import load_gguf_tokenizer, read_gguf
import transformers.utils

path, text = sys.argv[1], sys.argv[2]
checkpoint = read_gguf(path)
tokenizer = load_gguf_tokenizer(path)
print(json.dumps({
    "blocked": blocked,
    "torch_available": transformers.utils.is_torch_available(),
    "num_tensors": len(checkpoint.state_dict),
    "ids": tokenizer(text).input_ids,
    "torch_loaded": "torch" in sys.modules,
}))
"""


def test_reading_needs_no_torch(smollm2_path, tokenizer, shakespeare_passage):
    proc = subprocess.run(
        [sys.executable, "-c", _TORCH_FREE_SCRIPT, str(smollm2_path), shakespeare_passage],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["blocked"] and not result["torch_available"]
    assert result["num_tensors"] == 272
    assert result["ids"] == tokenizer(shakespeare_passage).input_ids
    assert result["torch_loaded"] is False


@pytest.mark.parametrize("load", [read_gguf, load_gguf_tokenizer])
def test_missing_file(load, tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load(missing)


@pytest.mark.parametrize("load", [read_gguf, load_gguf_tokenizer])
def test_corrupt_files(load, smollm2_path, tmp_path):
    noise = tmp_path / "noise.gguf"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="not a valid GGUF"):
        load(noise)

    # A download cut short, here early in the vocabulary (the first 2 MB are metadata).
    truncated = tmp_path / "truncated.gguf"
    with open(smollm2_path, "rb") as f:
        truncated.write_bytes(f.read(100_000))
    with pytest.raises(ValueError, match="not a valid GGUF"):
        load(truncated)


def _write_gguf(path, arch: str, tokenizer_model: str) -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_other_architecture_is_rejected(tmp_path):
    path = tmp_path / "gpt2.gguf"
    _write_gguf(path, "gpt2", "gpt2")
    with pytest.raises(ValueError, match="'gpt2' model.*'llama'"):
        read_gguf(path)


def test_other_tokenizer_model_is_rejected(tmp_path):
    path = tmp_path / "spm.gguf"
    _write_gguf(path, "llama", "llama")
    with pytest.raises(ValueError, match="'llama' tokenizer.*byte-level BPE"):
        load_gguf_tokenizer(path)


def test_changed_file_is_parsed_again(tmp_path):
    # The metadata of the last file read is reused; a rewritten file must not be served from it.
    path = tmp_path / "model.gguf"
    _write_gguf(path, "llama", "llama")
    with pytest.raises(ValueError, match="'llama' tokenizer"):
        load_gguf_tokenizer(path)
    _write_gguf(path, "llama", "gpt2")
    with pytest.raises(ValueError, match="lacks the GGUF metadata key 'tokenizer.ggml.tokens'"):
        load_gguf_tokenizer(path)
