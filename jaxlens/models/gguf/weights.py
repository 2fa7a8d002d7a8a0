"""Llama-architecture GGUF weights -> a `transformers.LlamaConfig` dict and HF-named arrays.

`read_gguf` returns float32 numpy arrays with exactly the names, shapes and row order of the
PyTorch ``LlamaForCausalLM.state_dict()``, so the usual PyTorch-to-Flax conversion applies
unchanged. Two llama.cpp conventions are undone on the way: ggml lists dimensions fastest-first
(the reverse of numpy), and llama.cpp's converter reorders the rows of the query and key
projections so that each head's two rotary halves are interleaved. Quantized tensors are
dequantized with the `gguf` package's numpy code; torch is never imported.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import numpy as np
from gguf.quants import dequantize

from jaxlens.models.gguf.reader import GGUFFile, GGUFTensor

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


def read_gguf(source: str | os.PathLike | GGUFFile) -> GGUFCheckpoint:
    """Read a Llama-architecture GGUF file into a config dict and a float32 state dict.

    Quantized tensors (Q4_1, Q8_0, ...) are dequantized to float32 with `gguf.quants`.

    Args:
        source: the ``.gguf`` file, or the same file already opened (`GGUFFile.open`).

    Returns:
        A `GGUFCheckpoint`; its state dict holds 2 + 9 * num_hidden_layers arrays (one more when
        the file has a separate ``output.weight``).

    Raises:
        FileNotFoundError: no file at ``source``.
        ValueError: the file is not a valid GGUF, its architecture is not ``llama``, or it holds
            tensors or settings this reader does not handle.
    """
    f = GGUFFile.of(source)
    arch = f.get("general.architecture")
    if arch != "llama":
        raise ValueError(
            f"{f.path} holds a {arch!r} model; read_gguf only reads GGUF files whose "
            "general.architecture is 'llama'."
        )
    tensors = f.tensors
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


def _llama_config(f: GGUFFile, tensors: dict[str, GGUFTensor]) -> dict[str, Any]:
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


def _rope_scaling(f: GGUFFile) -> dict[str, Any] | None:
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
