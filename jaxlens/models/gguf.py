"""Torch-free reading of Llama-architecture GGUF checkpoints (such as SmolLM2).

A GGUF file (the llama.cpp format) holds a model's hyperparameters, its tokenizer and its
possibly quantized weights. `read_gguf` turns one into a `transformers.LlamaConfig` keyword dict
and a float32 numpy state dict with exactly the names, shapes and row order of the PyTorch
``LlamaForCausalLM.state_dict()``, so the usual PyTorch-to-Flax conversion applies unchanged.
Two llama.cpp conventions are undone on the way: ggml lists dimensions fastest-first (the
reverse of numpy), and llama.cpp's converter reorders the rows of the query and key projections
so that each head's two rotary halves are interleaved. `load_gguf_tokenizer` rebuilds the
byte-level BPE tokenizer stored in the file with the `tokenizers` library, because transformers'
own GGUF tokenizer loading goes through its PyTorch checkpoint loader and refuses to run
without torch. Only the `gguf` package's numpy reader and dequantizers are used.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

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

# GGUF tensor names of one Llama block -> Hugging Face names (after "model.layers.{i}.").
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


@dataclasses.dataclass(frozen=True)
class GGUFCheckpoint:
    """A Llama checkpoint read from a GGUF file.

    Attributes:
        config: keyword arguments for `transformers.LlamaConfig` (``model_type="llama"``).
        state_dict: float32 arrays named and shaped as the PyTorch ``LlamaForCausalLM`` state
            dict, e.g. ``model.embed_tokens.weight`` [V, d] and
            ``model.layers.{i}.self_attn.q_proj.weight`` [num_heads * head_dim, d] ([out, in]).
            ``lm_head.weight`` [V, d] is present only when the embeddings are untied.
    """

    config: dict[str, Any]
    state_dict: dict[str, np.ndarray]


def read_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Read a Llama-architecture GGUF file into a config dict and a float32 state dict.

    Quantized tensors (Q4_1, Q8_0, ...) are dequantized to float32 with `gguf.quants`.

    Args:
        path: the ``.gguf`` file.

    Returns:
        A `GGUFCheckpoint`; its state dict holds 2 + 9 * num_hidden_layers arrays (one more when
        the file has a separate ``output.weight``).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a valid GGUF, its architecture is not ``llama``, or it holds
            tensors or settings this reader does not handle.
    """
    f = _GGUFFile.open(path, tensors=True)
    arch = f.get("general.architecture")
    if arch != "llama":
        raise ValueError(
            f"{f.path} holds a {arch!r} model; read_gguf only reads GGUF files whose "
            "general.architecture is 'llama'."
        )
    tensors = {t.name: t for t in f.reader.tensors}
    config = _llama_config(f, tensors)

    state_dict = {}
    for name, tensor in tensors.items():
        hf_name = _hf_name(name, f.path)
        # ggml shapes are fastest-dimension first; numpy (and PyTorch) order is the reverse,
        # which for a linear layer is already [out, in].
        shape = tuple(int(n) for n in reversed(tensor.shape))
        array = dequantize(tensor.data, tensor.tensor_type)
        # F32 tensors come back as read-only np.memmap views of the file: copy those into plain
        # arrays, so that nothing returned keeps the file mapped.
        if np.may_share_memory(array, tensor.data):
            array = np.array(array, dtype=np.float32)
        array = np.asarray(array, dtype=np.float32).reshape(shape)
        if hf_name.endswith("q_proj.weight"):
            array = _unpermute_rotary_rows(array, config["num_attention_heads"])
        elif hf_name.endswith("k_proj.weight"):
            array = _unpermute_rotary_rows(array, config["num_key_value_heads"])
        state_dict[hf_name] = array

    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(config["num_hidden_layers"]):
        expected |= {f"model.layers.{i}.{n}.weight" for n in _BLOCK_NAMES.values()}
    if not config["tie_word_embeddings"]:
        expected.add("lm_head.weight")
    if missing := sorted(expected - state_dict.keys()):
        raise ValueError(f"{f.path} lacks tensors a Llama model needs: {missing[:5]} ...")
    if extra := sorted(state_dict.keys() - expected):
        raise ValueError(
            f"{f.path} holds tensors beyond its {config['num_hidden_layers']} layers: {extra[:5]}"
        )
    return GGUFCheckpoint(config=config, state_dict=state_dict)


def load_gguf_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Build the byte-level BPE tokenizer stored in a GGUF file, without torch.

    The vocabulary, merges, special tokens, pre-tokenizer (``tokenizer.ggml.pre``), BOS/EOS
    handling and chat template all come from the file's metadata. Tokens of type CONTROL become
    special tokens, so ``"<|im_start|>"`` encodes to its single id as in the original tokenizer.

    Args:
        path: the ``.gguf`` file.

    Returns:
        A `transformers.PreTrainedTokenizerFast`.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a valid GGUF, or its tokenizer is not a byte-level BPE
            ("gpt2") one with a pre-tokenizer this function knows.
    """
    # Imported here: transformers takes seconds to import and read_gguf does not need it.
    from transformers import PreTrainedTokenizerFast

    f = _GGUFFile.open(path, tensors=False)
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


def _bpe_backend(f: _GGUFFile, tokens: list[str], digits_apart: bool) -> Tokenizer:
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


_MISSING = object()

# The metadata of the last file opened, keyed by (real path, size, mtime). Parsing a GGUF
# header takes seconds (gguf.GGUFReader walks ~100k vocabulary strings in Python), and callers
# typically read the weights and then the tokenizer of the same file; the parsed values are
# plain Python objects (9 MB for SmolLM2), unlike the reader itself (~170 MB): keep only them.
_last_metadata: dict[tuple[str, int, int], dict[str, Any]] = {}


@dataclasses.dataclass(frozen=True)
class _GGUFFile:
    """A GGUF file's path, metadata and (when tensors were asked for) its reader."""

    path: str
    metadata: dict[str, Any]
    reader: GGUFReader | None

    @classmethod
    def open(cls, path: str | os.PathLike, tensors: bool) -> _GGUFFile:
        """Parse the file at ``path``, turning parse failures into a ValueError.

        Args:
            path: the ``.gguf`` file.
            tensors: whether the caller needs ``reader`` (for the tensors); without it, metadata
                parsed earlier from the same unchanged file is reused.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No GGUF file at {path}.")
        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
        if not tensors and key in _last_metadata:
            return cls(path, _last_metadata[key], None)
        try:
            reader = GGUFReader(path)
            metadata = {name: field.contents() for name, field in reader.fields.items()}
        except OSError:
            raise
        except Exception as err:  # the reader fails in assorted ways on bad bytes
            raise ValueError(
                f"{path} is not a valid GGUF file (truncated or corrupt?): {err}"
            ) from err
        _last_metadata.clear()
        _last_metadata[key] = metadata
        return cls(path, metadata, reader)

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """Return metadata ``key`` as a Python scalar, string or list (``default`` if absent)."""
        if key not in self.metadata:
            if default is _MISSING:
                raise ValueError(f"{self.path} lacks the GGUF metadata key {key!r}.")
            return default
        return self.metadata[key]


def _llama_config(f: _GGUFFile, tensors: dict[str, ReaderTensor]) -> dict[str, Any]:
    """Map ``llama.*`` and tokenizer metadata to `transformers.LlamaConfig` keyword arguments.

    Args:
        f: the opened file.
        tensors: its tensors by GGUF name.
    """
    hidden = int(f.get("llama.embedding_length"))
    heads = int(f.get("llama.attention.head_count"))
    head_dim = int(f.get("llama.attention.key_length", hidden // heads))
    rotary_dim = int(f.get("llama.rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise ValueError(
            f"{f.path} rotates {rotary_dim} of {head_dim} dimensions per head; Llama models "
            "rotate all of them, so this file is not a plain Llama checkpoint."
        )
    # Not every converter writes llama.vocab_size; the embedding matrix always has V rows
    # (its ggml shape is [d, V]).
    vocab_size = f.get("llama.vocab_size", None)
    if vocab_size is None:
        vocab_size = tensors["token_embd.weight"].shape[-1]
    config: dict[str, Any] = {
        "model_type": "llama",
        "vocab_size": int(vocab_size),
        "hidden_size": hidden,
        "intermediate_size": int(f.get("llama.feed_forward_length")),
        "num_hidden_layers": int(f.get("llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(f.get("llama.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(f.get("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(f.get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(f.get("llama.context_length")),
        # llama.cpp writes output.weight only for untied checkpoints.
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": f.get("tokenizer.ggml.bos_token_id", None),
        "eos_token_id": f.get("tokenizer.ggml.eos_token_id", None),
    }
    scaling = _rope_scaling(f)
    if scaling is not None:
        config["rope_scaling"] = scaling
    return config


def _rope_scaling(f: _GGUFFile) -> dict[str, Any] | None:
    """Return transformers' ``rope_scaling`` dict for the file's RoPE scaling, or None."""
    kind = f.get("llama.rope.scaling.type", None)
    factor = f.get("llama.rope.scaling.factor", None)
    # Older files store only a linear factor.
    if kind is None and (linear := f.get("llama.rope.scale_linear", None)):
        kind, factor = "linear", linear
    if kind in (None, "none") or factor in (None, 1.0):
        return None
    scaling: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
    original = f.get("llama.rope.scaling.original_context_length", None)
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _hf_name(name: str, path: str) -> str:
    """Return the Hugging Face state-dict name of GGUF tensor ``name``."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    match = _BLOCK_RE.fullmatch(name)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}.weight"
    if name == "rope_freqs.weight":
        raise ValueError(
            f"{path} scales RoPE frequencies per dimension (Llama 3.1 style 'rope_freqs'), "
            "which read_gguf does not support."
        )
    raise ValueError(f"{path} holds tensor {name!r}, which a Llama model does not have.")


def _unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of query/key projection rows.

    Hugging Face Llama applies RoPE to the two halves of each head (rows ``[0, h/2)`` pair with
    ``[h/2, h)``); llama.cpp pairs adjacent rows instead, so its converter interleaves the
    halves: GGUF row ``2 * i + j`` of a head is Hugging Face row ``j * h/2 + i``.

    Args:
        weight: [num_heads * head_dim, in] projection in GGUF row order.
        num_heads: query heads for ``q_proj``, key/value heads for ``k_proj``.

    Returns:
        The [num_heads * head_dim, in] projection in Hugging Face row order.
    """
    rows, cols = weight.shape
    if rows % (2 * num_heads):
        raise ValueError(f"{rows} projection rows do not split into {num_heads} rotary heads.")
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)
