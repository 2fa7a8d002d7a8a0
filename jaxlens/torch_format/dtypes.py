"""The float dtypes a lens file holds, and the names torch gives their storages."""

from __future__ import annotations

import ml_dtypes
import numpy as np

DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
# The storage classes torch pickles for each dtype (torch 2.13 still writes these names).
STORAGE_CLASS = {
    "float32": "FloatStorage",
    "float16": "HalfStorage",
    "bfloat16": "BFloat16Storage",
}


def dtype_name(dtype: np.dtype) -> str | None:
    """The `DTYPES` name of `dtype` in either byte order, or None for any other dtype."""
    for name, reference in DTYPES.items():
        if dtype == reference or (dtype.kind == "f" and dtype.newbyteorder("=") == reference):
            return name
    return None
