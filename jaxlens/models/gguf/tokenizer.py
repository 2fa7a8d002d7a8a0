"""The byte-level BPE tokenizer stored in a GGUF file, rebuilt without torch.

transformers' own GGUF tokenizer loading goes through its PyTorch checkpoint loader and refuses
to run without torch, so `load_gguf_tokenizer` builds the tokenizer with the `tokenizers`
library from the file's metadata: vocabulary, merges, special tokens, llama.cpp pre-tokenizer,
BOS/EOS handling and chat template.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from jaxlens.models.gguf.reader import GGUFFile

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# Tokens whose type is CONTROL (3) are special (never split, skipped when decoding); USER_DEFINED
# (4) ones are never split either. UNKNOWN (2) is the unk token. Values from gguf.TokenType.
_TOKEN_TYPE_UNKNOWN = 2
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# llama.cpp pre-tokenizer names (``tokenizer.ggml.pre``) whose splitting rules are the GPT-2
# regex, optionally preceded by splitting every digit off on its own (llama-vocab.cpp).
_GPT2_PRE = frozenset({"gpt2", "mpt", "olmo", "jais"})
_DIGITS_THEN_GPT2_PRE = frozenset(
    {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"}
)


def load_gguf_tokenizer(source: str | os.PathLike | GGUFFile) -> PreTrainedTokenizerFast:
    """Build the byte-level BPE tokenizer stored in a GGUF file, without torch.

    The vocabulary, merges, special tokens, pre-tokenizer (``tokenizer.ggml.pre``), BOS/EOS
    handling and chat template all come from the file's metadata. Tokens of type CONTROL become
    special tokens, so ``"<|im_start|>"`` encodes to its single id as in the original tokenizer.

    Args:
        source: the ``.gguf`` file, or the same file already opened (`GGUFFile.open`).

    Returns:
        A `transformers.PreTrainedTokenizerFast`.

    Raises:
        FileNotFoundError: no file at ``source``.
        ValueError: the file is not a valid GGUF, or its tokenizer is not a byte-level BPE
            ("gpt2") one with a pre-tokenizer this function knows.
    """
    # Imported here: transformers takes seconds to import and read_gguf does not need it.
    from transformers import PreTrainedTokenizerFast

    f = GGUFFile.of(source)
    model = f.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(
            f"{f.path} holds a {model!r} tokenizer; load_gguf_tokenizer only builds "
            "byte-level BPE ('gpt2') tokenizers."
        )
    pre = f.get("tokenizer.ggml.pre", "gpt2")
    if pre not in _GPT2_PRE | _DIGITS_THEN_GPT2_PRE:
        raise ValueError(
            f"{f.path} uses the llama.cpp pre-tokenizer {pre!r}, which load_gguf_tokenizer does "
            f"not implement (it knows {sorted(_GPT2_PRE | _DIGITS_THEN_GPT2_PRE)}); load the "
            "model's original tokenizer instead."
        )
    tokens: list[str] = f.get("tokenizer.ggml.tokens")

    def token(key: str) -> str | None:
        token_id = f.get(f"tokenizer.ggml.{key}_token_id", None)
        return None if token_id is None else tokens[int(token_id)]

    arch = f.get("general.architecture", None)
    kwargs = {
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "chat_template": f.get("tokenizer.chat_template", None),
        "model_max_length": f.get(f"{arch}.context_length", None),
    }
    backend = _bpe_backend(f, tokens, digits_apart=pre in _DIGITS_THEN_GPT2_PRE)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        # Decoding should give back the text that was encoded, byte for byte.
        clean_up_tokenization_spaces=False,
        **{k: v for k, v in kwargs.items() if v is not None},
    )


def _bpe_backend(f: GGUFFile, tokens: list[str], digits_apart: bool) -> Tokenizer:
    """Build the `tokenizers.Tokenizer` for a GGUF byte-level BPE vocabulary.

    Args:
        f: the opened file.
        tokens: the vocabulary, index = token id.
        digits_apart: split every digit off on its own before the GPT-2 regex (llama.cpp's
            "smollm" and similar pre-tokenizers; the original SmolLM2 tokenizer does the same).
    """
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in f.get("tokenizer.ggml.merges")]
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False))
    prefix_space = bool(f.get("tokenizer.ggml.add_space_prefix", False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space, use_regex=True)
    if digits_apart:
        digits = pre_tokenizers.Digits(individual_digits=True)
        backend.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()

    token_types = f.get("tokenizer.ggml.token_type")
    backend.add_tokens(
        [
            AddedToken(tok, special=typ != _TOKEN_TYPE_USER_DEFINED, normalized=False)
            for tok, typ in zip(tokens, token_types, strict=True)
            if typ in (_TOKEN_TYPE_UNKNOWN, _TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)
        ]
    )

    # BOS/EOS are added only where the file asks for them (SmolLM2's does not).
    ends = {}
    for end in ("bos", "eos"):
        token_id = f.get(f"tokenizer.ggml.{end}_token_id", None)
        if token_id is not None and f.get(f"tokenizer.ggml.add_{end}_token", False):
            ends[end] = tokens[int(token_id)]
    if ends:
        head = [f"{ends['bos']}:0"] if "bos" in ends else []
        tail_a = [f"{ends['eos']}:0"] if "eos" in ends else []
        tail_b = [f"{ends['eos']}:1"] if "eos" in ends else []
        backend.post_processor = processors.TemplateProcessing(
            single=[*head, "$A:0", *tail_a],
            pair=[*head, "$A:0", *tail_a, "$B:1", *tail_b],
            special_tokens=[(tok, vocab[tok]) for tok in set(ends.values())],
        )
    return backend
