"""Routed experts: the mixture-of-experts MLP of Mixtral, Qwen3-MoE and OLMoE.

A router (a Linear without bias) scores each token against E experts; the softmax of the scores
(in float32) is cut to the k largest, optionally renormalised to sum to one (Mixtral always,
Qwen3-MoE and OLMoE when `norm_topk_prob`), and cast back to the model's dtype. Each expert is a
gated MLP, `down(act(gate(x)) * up(x))`, and a token's output is the weighted sum of its k
experts' outputs, exactly as transformers 4.57.6's PyTorch sparse MoE blocks compute it.

Experts run only on the tokens routed to them. The n * k (token, expert) pairs are sorted by
expert, so each expert's rows are contiguous, and a grouped matmul multiplies each group by its
own expert's weights. On GPU and TPU that is `jax.lax.ragged_dot`, which XLA lowers to grouped
kernels; on CPU its lowering multiplies every row by every expert and masks (the dense cost), so
there we pad each group to whole blocks of rows and scan over the blocks, each block multiplied
by its one expert (megablocks' layout, exact: no token is ever dropped). Expert weights are
stacked `[E, in, out]` (`gate`/`up` `[E, d, f]`, `down` `[E, f, d]`); `convert_experts` builds the
stacks from the per-expert PyTorch tensors.

Axis letters: n tokens (batch x positions), e experts, k chosen experts per token, m routed rows
(n * k, sorted by expert), c rows of one block, d model width, f expert width.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

DISPATCHES = ("auto", "blocked", "ragged_dot")  # "auto": ragged_dot, but blocked on CPU
MAX_BLOCK_ROWS = 128  # rows per block of the CPU grouped matmul (big enough for matmul speed)


@dataclasses.dataclass(frozen=True)
class _FamilyNames:
    block: str  # the block's PyTorch module name inside a decoder layer
    projections: tuple[str, str, str]  # each expert's gate, up and down Linear names
    num_experts: str  # config attribute with E
    width: str  # config attribute with the experts' f
    normalise: str | None  # config attribute saying whether to renormalise (None: always)


FAMILY_NAMES = {
    "mixtral": _FamilyNames(
        "block_sparse_moe", ("w1", "w3", "w2"), "num_local_experts", "intermediate_size", None
    ),
    "qwen3_moe": _FamilyNames(
        "mlp",
        ("gate_proj", "up_proj", "down_proj"),
        "num_experts",
        "moe_intermediate_size",
        "norm_topk_prob",
    ),
    "olmoe": _FamilyNames(
        "mlp",
        ("gate_proj", "up_proj", "down_proj"),
        "num_experts",
        "intermediate_size",
        "norm_topk_prob",
    ),
}


@dataclasses.dataclass(frozen=True)
class MoESpec:
    """One family's routed-expert MLP, read from its config.

    Attributes:
      num_experts: E.
      top_k: experts per token, k.
      width: each expert's hidden width, f.
      normalise_top_k: divide the k chosen probabilities by their sum.
      activation: the transformers `hidden_act` name.
      projections: the gate, up and down parameter names (PyTorch's Linear names).
      block_name: the block's name inside a decoder layer ("block_sparse_moe", "mlp").
    """

    num_experts: int
    top_k: int
    width: int
    normalise_top_k: bool
    activation: str
    projections: tuple[str, str, str]
    block_name: str


def moe_spec(config) -> MoESpec:
    """The routed-expert MLP of a Mixtral, Qwen3-MoE or OLMoE config."""
    names = FAMILY_NAMES[config.model_type]
    return MoESpec(
        num_experts=int(getattr(config, names.num_experts)),
        top_k=int(config.num_experts_per_tok),
        width=int(getattr(config, names.width)),
        normalise_top_k=True if names.normalise is None else bool(getattr(config, names.normalise)),
        activation=config.hidden_act,
        projections=names.projections,
        block_name=names.block,
    )


def sparse_layers(config) -> tuple[bool, ...]:
    """Which decoder layers route through experts (the others have a dense MLP).

    Qwen3-MoE keeps the layers listed in `mlp_only_layers`, and those whose number (from 1) is
    not a multiple of `decoder_sparse_step`, dense (as its PyTorch decoder layer decides);
    Mixtral and OLMoE route in every layer.
    """
    layers = range(config.num_hidden_layers)
    if config.model_type != "qwen3_moe":
        return tuple(True for _ in layers)
    dense = set(config.mlp_only_layers or ())
    step = config.decoder_sparse_step
    return tuple(i not in dense and config.num_experts > 0 and (i + 1) % step == 0 for i in layers)


def unsupported_features(config) -> list[str]:
    """What in a MoE config the routed experts cannot reproduce (empty: all of it)."""
    step = getattr(config, "decoder_sparse_step", 1)
    if config.model_type == "qwen3_moe" and step < 1:
        return [f"decoder_sparse_step={step} (must be >= 1)"]
    spec = moe_spec(config)
    if any(sparse_layers(config)) and not 1 <= spec.top_k <= spec.num_experts:
        return [f"num_experts_per_tok={spec.top_k} with {spec.num_experts} experts"]
    return []


def route(logits_ne: jax.Array, top_k: int, normalise: bool) -> tuple[jax.Array, jax.Array]:
    """Each token's k experts and their weights, as the PyTorch blocks choose them.

    Args:
      logits_ne: router scores `[n, E]` (in the model's dtype, as PyTorch's gate computes them).
      top_k: k.
      normalise: renormalise the k probabilities to sum to one.
    Returns:
      weights `[n, k]` (float32, largest first) and expert indices `[n, k]` (int32).
    """
    probs_ne = jax.nn.softmax(logits_ne.astype(jnp.float32), axis=-1)  # PyTorch: dtype=float
    weights_nk, experts_nk = jax.lax.top_k(probs_ne, top_k)
    if normalise:
        weights_nk = weights_nk / weights_nk.sum(axis=-1, keepdims=True)
    return weights_nk, experts_nk.astype(jnp.int32)


def routed_mlp(x_nd, experts_nk, weights_nk, gate_edf, up_edf, down_efd, act, dispatch="auto"):
    """Every token's weighted sum of its k experts' gated MLPs, each expert run on its rows only.

    Args:
      x_nd: token inputs `[n, d]`.
      experts_nk: chosen experts `[n, k]` (int).
      weights_nk: their weights `[n, k]` (in x's dtype).
      gate_edf, up_edf, down_efd: stacked expert kernels `[E, d, f]`, `[E, d, f]`, `[E, f, d]`.
      act: the activation applied to the gate projection.
      dispatch: "blocked", "ragged_dot", or "auto" (ragged_dot, but blocked on CPU).
    Returns:
      `[n, d]` in x's dtype.
    """
    if dispatch not in DISPATCHES:
        raise ValueError(f"dispatch must be one of {DISPATCHES}; got {dispatch!r}.")
    n, k = experts_nk.shape
    num_experts = gate_edf.shape[0]
    expert_m = experts_nk.reshape(n * k)
    order_m = jnp.argsort(expert_m, stable=True)  # rows of each expert contiguous
    token_m = order_m // k
    sizes_e = jnp.bincount(expert_m, length=num_experts).astype(jnp.int32)
    kernels = tuple(map(jnp.asarray, (gate_edf, up_edf, down_efd)))
    block_rows = _block_rows(n * k, num_experts)

    def blocked(x_md, sizes_e, *kernels):
        return _blocked_mlp(x_md, sizes_e, *kernels, act=act, block_rows=block_rows)

    def ragged(x_md, sizes_e, *kernels):
        return _ragged_mlp(x_md, sizes_e, *kernels, act=act)

    x_md = x_nd[token_m]
    if dispatch == "auto":
        y_md = jax.lax.platform_dependent(x_md, sizes_e, *kernels, cpu=blocked, default=ragged)
    else:
        y_md = (blocked if dispatch == "blocked" else ragged)(x_md, sizes_e, *kernels)
    y_md = y_md * weights_nk.reshape(n * k)[order_m][:, None]
    return jnp.zeros_like(x_nd).at[token_m].add(y_md)


def _ragged_mlp(x_md, sizes_e, gate_edf, up_edf, down_efd, act):
    hidden_mf = act(jax.lax.ragged_dot(x_md, gate_edf, sizes_e))
    hidden_mf = hidden_mf * jax.lax.ragged_dot(x_md, up_edf, sizes_e)
    return jax.lax.ragged_dot(hidden_mf, down_efd, sizes_e)


def _block_rows(rows: int, num_experts: int) -> int:
    """A power of two near the mean group size, at most MAX_BLOCK_ROWS: padding each group to
    whole blocks then adds at most E blocks, whatever the routing."""
    mean = max(1, math.ceil(rows / num_experts))
    return min(MAX_BLOCK_ROWS, 1 << (mean - 1).bit_length())


def _blocked_mlp(x_md, sizes_e, gate_edf, up_edf, down_efd, *, act, block_rows):
    """The grouped MLP on CPU: groups padded to whole blocks, one expert per block."""
    m, d = x_md.shape
    num_experts = sizes_e.shape[0]
    num_blocks = -(-(m + num_experts * (block_rows - 1)) // block_rows)  # enough for any routing
    padded_e = -(-sizes_e // block_rows) * block_rows
    padded_end_e = jnp.cumsum(padded_e)
    start_e = jnp.cumsum(sizes_e) - sizes_e
    expert_m = jnp.repeat(jnp.arange(num_experts), sizes_e, total_repeat_length=m)
    slot_m = padded_end_e[expert_m] - padded_e[expert_m] + jnp.arange(m) - start_e[expert_m]
    x_pd = jnp.zeros((num_blocks * block_rows, d), x_md.dtype).at[slot_m].set(x_md)
    first_row_b = jnp.arange(num_blocks) * block_rows
    expert_b = jnp.searchsorted(padded_end_e, first_row_b, side="right")
    used_b = expert_b < num_experts  # blocks past the last group hold no rows: skipped

    def one_block(_, block):
        x_cd, expert, used = block

        def compute(x_cd):
            hidden_cf = act(x_cd @ gate_edf[expert]) * (x_cd @ up_edf[expert])
            return hidden_cf @ down_efd[expert]

        return None, jax.lax.cond(used, compute, jnp.zeros_like, x_cd)

    blocks = (x_pd.reshape(num_blocks, block_rows, d), jnp.minimum(expert_b, num_experts - 1))
    _, y_bcd = jax.lax.scan(one_block, None, (*blocks, used_b))
    return y_bcd.reshape(num_blocks * block_rows, d)[slot_m]


class ExpertBank(nn.Module):
    """The E experts' stacked kernels, named after PyTorch's per-expert Linear layers."""

    spec: MoESpec
    features: int
    act: Callable
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_nd, experts_nk, weights_nk, dispatch="auto"):
        spec, d = self.spec, self.features
        init = nn.initializers.normal(0.02)  # never used for real: weights come from checkpoints
        gate_name, up_name, down_name = spec.projections
        shape_edf, shape_efd = (spec.num_experts, d, spec.width), (spec.num_experts, spec.width, d)
        gate_edf = self.param(gate_name, init, shape_edf, self.dtype)
        up_edf = self.param(up_name, init, shape_edf, self.dtype)
        down_efd = self.param(down_name, init, shape_efd, self.dtype)
        kernels = (gate_edf, up_edf, down_efd)
        return routed_mlp(x_nd, experts_nk, weights_nk, *kernels, self.act, dispatch)


class RoutedExperts(nn.Module):
    """The sparse MoE block: `x [b, t, d] -> y [b, t, d]`, parameters `gate` and `experts`.

    Attributes:
      spec: the routing and sizes.
      features: the model width d.
      act: the experts' activation (the function `spec.activation` names).
      dtype: parameter and computation dtype.
      dispatch: see `routed_mlp`.
    """

    spec: MoESpec
    features: int
    act: Callable
    dtype: jnp.dtype = jnp.float32
    dispatch: str = "auto"

    @nn.compact
    def __call__(self, x_btd):
        b, t, d = x_btd.shape
        x_nd = x_btd.reshape(b * t, d)
        spec = self.spec
        gate = nn.Dense(
            spec.num_experts, use_bias=False, dtype=self.dtype, param_dtype=self.dtype, name="gate"
        )
        logits_ne = gate(x_nd)  # in the model's dtype, as PyTorch's router Linear
        weights_nk, experts_nk = route(logits_ne, spec.top_k, spec.normalise_top_k)
        bank = ExpertBank(spec, self.features, self.act, dtype=self.dtype, name="experts")
        y_nd = bank(x_nd, experts_nk, weights_nk.astype(x_nd.dtype), self.dispatch)
        return y_nd.reshape(b, t, d)
