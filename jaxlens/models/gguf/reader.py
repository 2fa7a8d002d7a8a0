"""`GGUFFile`: one parsed GGUF file, its metadata and its tensors, held by the caller.

A GGUF file (the llama.cpp format) holds a model's hyperparameters, its tokenizer and its possibly
quantized weights. Parsing one takes seconds (`gguf.GGUFReader` walks ~100k vocabulary strings in
Python), and a caller typically wants both the weights and the tokenizer of the same file, so
`read_gguf` and `load_gguf_tokenizer` accept an opened `GGUFFile` as well as a path: open the file
once and pass it to both. Nothing is cached behind the caller's back (a cache keyed on the path
would have to guess when the file changed); the caller decides how long the parse lives.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from gguf import GGUFReader, ReaderTensor

_MISSING = object()


@dataclasses.dataclass(frozen=True, eq=False)
class GGUFFile:
    """A parsed GGUF file.

    Attributes:
        path: the file.
        metadata: every metadata key, as a Python scalar, string or list.
        tensors: the tensors by GGUF name; their ``data`` are read-only views of the
            memory-mapped file, so holding a `GGUFFile` keeps the file mapped.
    """

    path: str
    metadata: dict[str, Any]
    tensors: dict[str, ReaderTensor]

    @classmethod
    def open(cls, path: str | os.PathLike) -> GGUFFile:
        """Parse the file at ``path``.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: the file is not a valid GGUF (truncated or corrupt).
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No GGUF file at {path}.")
        try:
            reader = GGUFReader(path)
            metadata = {name: field.contents() for name, field in reader.fields.items()}
        except OSError:
            raise
        except Exception as err:  # the reader fails in assorted ways on bad bytes
            raise ValueError(
                f"{path} is not a valid GGUF file (truncated or corrupt?): {err}"
            ) from err
        # The reader itself is not kept: its per-field numpy views take far more memory (~170 MB
        # for SmolLM2) than the plain values parsed from them (9 MB).
        return cls(path, metadata, {t.name: t for t in reader.tensors})

    @classmethod
    def of(cls, source: str | os.PathLike | GGUFFile) -> GGUFFile:
        """``source`` itself if it is already opened, else the file at that path, parsed."""
        return source if isinstance(source, GGUFFile) else cls.open(source)

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """Return metadata ``key`` as a Python scalar, string or list (``default`` if absent)."""
        if key not in self.metadata:
            if default is _MISSING:
                raise ValueError(f"{self.path} lacks the GGUF metadata key {key!r}.")
            return default
        return self.metadata[key]
