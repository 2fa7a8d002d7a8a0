"""PyTorch-named weights (numpy) to a Flax parameter tree, with errors that name the tensor.

Hugging Face checkpoints name tensors after the PyTorch modules
(`model.layers.0.mlp.up_proj.weight`, Linear weights `[out, in]`). The Flax classes use the same
module paths but call a Linear's weight `kernel` (`[in, out]`), an Embed's `embedding` and a
LayerNorm's `scale`. We map each tensor onto the Flax shape tree (from `jax.eval_shape`, so nothing
random is ever allocated), transposing kernels, and refuse a checkpoint with a missing, unexpected
or wrongly shaped tensor by name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxlens.models import convert_experts

# Buffers that PyTorch checkpoints may carry but that are not parameters (causal-mask and rotary
# tables of older GPT-2 / GPT-Neo / GPT-NeoX / Llama saves).
_BUFFERS = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|attention\.bias|masked_bias|inv_freq)$")

# Top-level names of untied output projections (GPT-NeoX calls its head `embed_out`).
_HEADS = ("lm_head", "embed_out")


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not fit the model its config describes."""


def _candidates(parts: tuple[str, ...], prefix: str):
    """Flax keys a PyTorch tensor may map to, each with whether it needs a transpose."""
    variants = [parts]
    if parts[0] == prefix:
        variants.append(parts[1:])  # a full-model checkpoint loaded into a base tree
    else:
        variants.append((prefix, *parts))  # a base-model checkpoint (old GPT-2 saves)
    for key in variants:
        stem, leaf = key[:-1], key[-1]
        yield key, False
        if leaf in ("weight", "gamma"):
            yield (*stem, "scale"), False
            yield (*stem, "embedding"), False
            yield (*stem, "kernel"), True
        if leaf == "beta":
            yield (*stem, "bias"), False


def params_from_torch_names(
    tensors: Mapping[str, np.ndarray],
    shape_tree: Mapping,
    base_prefix: str,
    dtype=None,
) -> dict:
    """Builds a Flax parameter tree from PyTorch-named tensors.

    Args:
      tensors: checkpoint tensors by PyTorch name, numpy arrays (bfloat16 allowed).
      shape_tree: the Flax parameter tree of `jax.ShapeDtypeStruct`s the tensors must fill.
      base_prefix: the transformers `base_model_prefix` ("transformer", "model").
      dtype: cast every tensor to this dtype (None: keep the shape tree's dtypes).
    Returns:
      the nested parameter dict, numpy arrays.
    Raises:
      CheckpointMismatchError: naming every missing, unexpected and mis-shaped tensor.
    """
    expected = flatten_dict(dict(shape_tree))
    tensors = convert_experts.unpack_mxfp4(tensors, dtype)  # GPT-OSS's packed experts
    experts = convert_experts.gather(tensors, expected, base_prefix, dtype)  # MoE stacks
    filled: dict[tuple[str, ...], np.ndarray] = dict(experts.filled)
    unexpected, misshaped = experts.unexpected, experts.misshaped
    for name, array in experts.rest.items():
        parts = tuple(name.split("."))
        match = next(
            ((k, t) for k, t in _candidates(parts, base_prefix) if k in expected),
            None,
        )
        if match is None:
            # A tied head saved anyway: the model reads its unembedding from the embedding.
            tied_head = parts[0] in _HEADS and not any(k[0] == parts[0] for k in expected)
            if not (tied_head or _BUFFERS.search(name)):
                unexpected.append(name)
            continue
        key, transpose = match
        value = np.asarray(array).T if transpose else np.asarray(array)
        want = tuple(expected[key].shape)
        if value.shape != want:
            misshaped.append(f"{name}: checkpoint {tuple(array.shape)}, model expects {want}")
            continue
        filled[key] = value.astype(dtype or expected[key].dtype, copy=False)
    missing = experts.missing + [
        _torch_name(k) for k in expected if k not in filled and k not in experts.stack_keys
    ]
    _raise_if_mismatched(missing, unexpected, misshaped)
    return unflatten_dict(filled)


def _torch_name(key: tuple[str, ...]) -> str:
    """The PyTorch checkpoint name of a Flax parameter (`.../kernel` -> `....weight`)."""
    leaf = "weight" if key[-1] in ("kernel", "scale", "embedding") else key[-1]
    return ".".join((*key[:-1], leaf))


def check_tree(params: Mapping, shape_tree: Mapping, dtype=None) -> dict:
    """Validates an already-Flax parameter tree (msgpack checkpoints) against the shape tree."""
    got = flatten_dict(dict(params))
    expected = flatten_dict(dict(shape_tree))
    missing = ["/".join(k) for k in expected if k not in got]
    unexpected = ["/".join(k) for k in got if k not in expected]
    misshaped = [
        f"{'/'.join(k)}: checkpoint {tuple(np.shape(v))}, model expects {tuple(expected[k].shape)}"
        for k, v in got.items()
        if k in expected and tuple(np.shape(v)) != tuple(expected[k].shape)
    ]
    _raise_if_mismatched(missing, unexpected, misshaped)
    return unflatten_dict(
        {k: np.asarray(v).astype(dtype or expected[k].dtype, copy=False) for k, v in got.items()}
    )


def _raise_if_mismatched(missing, unexpected, misshaped) -> None:
    if not (missing or unexpected or misshaped):
        return
    lines = ["The checkpoint does not match the model described by its config:"]
    for title, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("wrong shape", misshaped),
    ):
        if items:
            shown = ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")
            lines.append(f"  {title} tensors: {shown}")
    lines.append("Check that config.json belongs to these weights.")
    raise CheckpointMismatchError("\n".join(lines))
