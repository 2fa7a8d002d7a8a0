"""Small synthetic GGUF files for the tests of jaxlens.models.gguf."""

from __future__ import annotations

import gguf
import numpy as np


def write_gguf(path, arch: str, tokenizer_model: str) -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
