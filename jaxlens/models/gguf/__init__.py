"""Torch-free reading of Llama-architecture GGUF checkpoints (such as SmolLM2).

`reader` parses a GGUF file (the llama.cpp format) into its metadata and tensors; `weights` turns
those into a `transformers.LlamaConfig` dict and a float32 state dict named as the PyTorch model's;
`tokenizer` rebuilds the byte-level BPE tokenizer stored in the file. Only the `gguf` package's
type tables and numpy dequantizers are used. To read both weights and tokenizer of one file,
parse it once and pass the `GGUFFile` to both:

    f = GGUFFile.open(path)
    checkpoint, tokenizer = read_gguf(f), load_gguf_tokenizer(f)
"""

from jaxlens.models.gguf.reader import GGUFFile
from jaxlens.models.gguf.tokenizer import load_gguf_tokenizer
from jaxlens.models.gguf.weights import GGUFCheckpoint, read_gguf

__all__ = ["GGUFCheckpoint", "GGUFFile", "load_gguf_tokenizer", "read_gguf"]
