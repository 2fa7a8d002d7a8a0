"""Per-expert PyTorch tensors stacked into the `[E, in, out]` kernels of `moe.ExpertBank`.

transformers' Mixtral, Qwen3-MoE and OLMoE keep each expert as its own Linear layers
(`model.layers.0.block_sparse_moe.experts.3.w1.weight`, `[out, in]`); jaxlens multiplies all
experts' rows in one grouped matmul, so it holds each projection as one stack
(`model/layers/0/block_sparse_moe/experts/w1`, `[E, in, out]`). `gather` finds every such stack in
the model's shape tree, fills it from the E tensors, and names each missing, extra or mis-shaped
expert tensor by its PyTorch name; `convert.params_from_torch_names` maps the rest. A checkpoint
without per-expert tensors (GPT-OSS stores `experts.gate_up_proj` `[E, d, 2f]` as one tensor,
already in `x @ W` layout) is left to that usual mapping.

GPT-OSS's published checkpoints pack those two stacks in MXFP4 (`gate_up_proj_blocks`
`[E, out, in / 32, 16]` bytes, each holding two 4-bit floats, low nibble first, and
`gate_up_proj_scales` `[E, out, in / 32]`, a power-of-two exponent + 127 per 32 values);
`unpack_mxfp4` expands them into the plain stacks, exactly (every value is a small float times a
power of two), as transformers' `convert_moe_packed_tensors` does.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import numpy as np

# The sixteen values of a 4-bit float (E2M1): a sign bit, then 0, 0.5, 1, 1.5, 2, 3, 4, 6.
_FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)
_FP4_VALUES = np.concatenate([_FP4_VALUES, -_FP4_VALUES])
_PACKED = re.compile(r"^(?P<name>.+\.experts\.[^.]+)_blocks$")

_EXPERT_TENSOR = re.compile(
    r"^(?P<stem>(?:.+\.)?experts)\.(?P<index>\d+)\.(?P<proj>[^.]+)\.weight$"
)


@dataclasses.dataclass
class Gathered:
    """What `gather` made of a checkpoint.

    Attributes:
      filled: the complete stacks by Flax key, `[E, in, out]`.
      stack_keys: every stack key of the shape tree (filled or not).
      rest: the tensors that are not per-expert weights of a stack (for the usual mapping).
      missing, unexpected, misshaped: PyTorch names (with shapes for the mis-shaped).
    """

    filled: dict[tuple[str, ...], np.ndarray]
    stack_keys: set[tuple[str, ...]]
    rest: dict[str, np.ndarray]
    missing: list[str]
    unexpected: list[str]
    misshaped: list[str]


def _stack_keys(expected: Mapping) -> list[tuple[str, ...]]:
    return [k for k, v in expected.items() if len(k) >= 2 and k[-2] == "experts" and v.ndim == 3]


def _stems(key: tuple[str, ...], base_prefix: str) -> list[str]:
    """PyTorch names of the module holding a stack's experts: the full model's, or a base
    model's (a checkpoint saved without the `model.` prefix)."""
    stems = [".".join(key[:-1])]
    if key[0] == base_prefix:
        stems.append(".".join(key[1:-1]))
    return stems


def gather(
    tensors: Mapping[str, np.ndarray], expected: Mapping, base_prefix: str, dtype=None
) -> Gathered:
    """Fills the shape tree's expert stacks from per-expert PyTorch tensors.

    Args:
      tensors: checkpoint tensors by PyTorch name.
      expected: the flattened Flax shape tree (`flax.traverse_util.flatten_dict`).
      base_prefix: the transformers `base_model_prefix` ("model").
      dtype: cast the stacks to this dtype (None: the shape tree's).
    Returns:
      a `Gathered`.
    """
    groups: dict[tuple[str, str], dict[int, str]] = {}
    rest = {}
    for name, array in tensors.items():
        match = _EXPERT_TENSOR.match(name)
        if match is None:
            rest[name] = array
        else:
            groups.setdefault((match["stem"], match["proj"]), {})[int(match["index"])] = name
    out = Gathered({}, set(), rest, [], [], [])
    if not groups:  # stacked in the checkpoint too (GPT-OSS): the usual mapping names them
        return out
    for key in _stack_keys(expected):
        out.stack_keys.add(key)
        proj = key[-1]
        stems = _stems(key, base_prefix)
        stem = next((s for s in stems if (s, proj) in groups), stems[0])
        names = groups.pop((stem, proj), {})
        _fill(out, key, names, expected[key], stem, proj, tensors, dtype)
    for names in groups.values():  # experts of a module the model does not have
        out.unexpected += [names[i] for i in sorted(names)]
    return out


def _fill(out: Gathered, key, names: dict[int, str], want, stem, proj, tensors, dtype) -> None:
    num_experts, fan_in, fan_out = want.shape
    out.unexpected += [names[i] for i in sorted(names) if i >= num_experts]
    kernels = []
    for i in range(num_experts):
        name = names.get(i, f"{stem}.{i}.{proj}.weight")
        if i not in names:
            out.missing.append(name)
            continue
        weight = np.asarray(tensors[name])
        if weight.shape != (fan_out, fan_in):
            out.misshaped.append(
                f"{name}: checkpoint {weight.shape}, model expects {(fan_out, fan_in)}"
            )
            continue
        kernels.append(weight.T)
    if len(kernels) == num_experts:
        out.filled[key] = np.stack(kernels).astype(dtype or want.dtype, copy=False)


def unpack_mxfp4(tensors: Mapping[str, np.ndarray], dtype=None) -> dict[str, np.ndarray]:
    """The tensors with each MXFP4 pair `<name>_blocks`/`<name>_scales` replaced by `<name>`.

    Args:
      tensors: checkpoint tensors by PyTorch name; `<name>_blocks` uint8 `[E, out, in / 32, 16]`
        and `<name>_scales` uint8 `[E, out, in / 32]`.
      dtype: the unpacked stacks' dtype (None: float32); exact in bfloat16 too.
    Returns:
      a new dict; each unpacked `<name>` is `[E, in, out]` (GPT-OSS's `x @ W` layout).
    Raises:
      ValueError: a `_blocks` tensor without its `_scales`, or shapes that do not pair.
    """
    out = dict(tensors)
    for blocks_name in [n for n in tensors if _PACKED.match(n)]:
        name = _PACKED.match(blocks_name)["name"]
        scales_name = f"{name}_scales"
        if scales_name not in tensors:
            raise ValueError(f"{blocks_name} has no {scales_name}: an incomplete MXFP4 checkpoint.")
        blocks, scales = np.asarray(out.pop(blocks_name)), np.asarray(out.pop(scales_name))
        if blocks.shape[:-1] != scales.shape:
            raise ValueError(
                f"{blocks_name} {blocks.shape} and {scales_name} {scales.shape} do not pair."
            )
        values = np.empty((*blocks.shape[:-1], 2 * blocks.shape[-1]), np.float32)
        values[..., 0::2] = _FP4_VALUES[blocks & 0x0F]
        values[..., 1::2] = _FP4_VALUES[blocks >> 4]
        values = np.ldexp(values, scales.astype(np.int32)[..., None] - 127)
        unpacked = values.reshape(*blocks.shape[:-2], -1)  # [E, out, in]
        out[name] = np.swapaxes(unpacked, 1, 2).astype(dtype or np.float32)
    return out
