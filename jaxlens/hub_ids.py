"""The one rule for telling a Hugging Face hub id from a local path, shared by every source
jaxlens accepts (models, datasets, lenses): an id is `name` or `owner/name`, made of letters,
digits, `-`, `_` and `.`; anything that starts like a path (`.`, `/`, `~`), ends in `/`, or
names a file by its suffix is a path. So a mistyped local path fails as a missing file at once,
instead of as a network lookup of a strange id.
"""

from __future__ import annotations

import os
import re

_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# Suffixes of the files jaxlens reads; a source ending in one is a file, not a hub id.
FILE_SUFFIXES = (".txt", ".json", ".jsonl", ".parquet", ".gguf", ".pt", ".safetensors")


def is_hub_id(source: str | os.PathLike) -> bool:
    """Whether `source` is meant as a hub id rather than a local path."""
    text = os.fspath(source)
    return bool(_ID.fullmatch(text)) and not text.endswith(FILE_SUFFIXES)
