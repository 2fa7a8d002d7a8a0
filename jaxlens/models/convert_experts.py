"""Per-expert PyTorch tensors stacked into the `[E, in, out]` kernels of `moe.ExpertBank`.

transformers' Mixtral, Qwen3-MoE and OLMoE keep each expert as its own Linear layers
(`model.layers.0.block_sparse_moe.experts.3.w1.weight`, `[out, in]`); jaxlens multiplies all
experts' rows in one grouped matmul, so it holds each projection as one stack
(`model/layers/0/block_sparse_moe/experts/w1`, `[E, in, out]`). `gather` finds every such stack in
the model's shape tree, fills it from the E tensors, and names each missing, extra or mis-shaped
expert tensor by its PyTorch name; `convert.params_from_torch_names` maps the rest.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import numpy as np

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
