"""Tests of jaxlens.models.gguf.tokenizer: the SmolLM2 tokenizer rebuilt from the GGUF file against
transformers' own (PyTorch) GGUF tokenizer loading, its special tokens and digit splitting, and the
refusal of other tokenizer models."""

from __future__ import annotations

import pytest
from gguf_files import write_gguf

from jaxlens.models.gguf import load_gguf_tokenizer


def test_tokenizer_matches_transformers_on_shakespeare(
    smollm2_path, tokenizer, shakespeare_passage
):
    # transformers' GGUF tokenizer loading needs torch. (It reads the model type from the file
    # too, so the PyTorch model itself is not needed here.)
    pytest.importorskip("torch")
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)
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


def test_other_tokenizer_model_is_rejected(tmp_path):
    path = tmp_path / "spm.gguf"
    write_gguf(path, "llama", "llama")
    with pytest.raises(ValueError, match="'llama' tokenizer.*byte-level BPE"):
        load_gguf_tokenizer(path)
