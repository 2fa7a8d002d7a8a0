"""Routed experts: the mixture-of-experts MLP of Mixtral, Qwen3-MoE, OLMoE and GPT-OSS.

A router (a Linear) scores each token against E experts and keeps k of them, as transformers
4.57.6's PyTorch blocks do. Mixtral, Qwen3-MoE and OLMoE soft-max the scores (in float32), keep
the k largest, renormalise them to sum to one (Mixtral always, the others when `norm_topk_prob`)
and cast back; each of their experts is a gated MLP `down(act(gate(x)) * up(x))`. GPT-OSS keeps
the k largest scores (its router has a bias) and soft-maxes those k; its experts have biases, one
`gate_up_proj` whose columns interleave gate and up, and a clamped GLU:
`down((clip(up, -7, 7) + 1) * g * sigmoid(1.702 g))` with `g = min(gate, 7)`. A token's output is
the weighted sum of its k experts' outputs.

Experts run only on the tokens routed to them. The n * k (token, expert) pairs are sorted by
expert, so each expert's rows are contiguous, and a grouped matmul multiplies each group by its
own expert's weights. On GPU and TPU that is `jax.lax.ragged_dot`, which XLA lowers to grouped
kernels; on CPU its lowering multiplies every row by every expert and masks (the dense cost), so
there we pad each group to whole blocks of rows and scan over the blocks, each block multiplied
by its one expert (megablocks' layout, exact: no token is ever dropped). Expert weights are
stacked `[E, in, out]` (`gate`/`up` `[E, d, f]`, `down` `[E, f, d]`); `convert_experts` builds the
stacks from the per-expert PyTorch tensors (GPT-OSS stores them stacked already).

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
    projections: tuple[str, ...]  # the experts' stacked parameters (see `ExpertBank`)
    num_experts: str  # config attribute with E
    width: str  # config attribute with the experts' f
    normalise: str | None  # config attribute saying whether to renormalise (None: always)
    kind: str = "gated"  # the expert MLP: "gated" or "gpt_oss"


_GATED = ("gate_proj", "up_proj", "down_proj")
FAMILY_NAMES = {
    "mixtral": _FamilyNames(
        "block_sparse_moe", ("w1", "w3", "w2"), "num_local_experts", "intermediate_size", None
    ),
    "qwen3_moe": _FamilyNames(
        "mlp", _GATED, "num_experts", "moe_intermediate_size", "norm_topk_prob"
    ),
    "olmoe": _FamilyNames("mlp", _GATED, "num_experts", "intermediate_size", "norm_topk_prob"),
    "gpt_oss": _FamilyNames(
        "mlp",
        ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"),
        "num_local_experts",
        "intermediate_size",
        None,
        kind="gpt_oss",
    ),
}
GPT_OSS_LIMIT, GPT_OSS_ALPHA = 7.0, 1.702  # constants of GptOssExperts, not config fields


@dataclasses.dataclass(frozen=True)
class MoESpec:
    """One family's routed-expert MLP, read from its config.

    Attributes:
      num_experts: E.
      top_k: experts per token, k.
      width: each expert's hidden width, f.
      normalise_top_k: divide the k chosen probabilities by their sum (softmax-first routers).
      activation: the transformers `hidden_act` name (gated experts).
      projections: the experts' stacked parameter names (PyTorch's names).
      block_name: the block's name inside a decoder layer ("block_sparse_moe", "mlp").
      kind: "gated" (softmax, then top-k; gated MLP experts) or "gpt_oss" (top-k of the biased
        router's scores, then their softmax; clamped-GLU experts with biases).
    """

    num_experts: int
    top_k: int
    width: int
    normalise_top_k: bool
    activation: str
    projections: tuple[str, ...]
    block_name: str
    kind: str = "gated"

    @property
    def router_name(self) -> str:
        return "router" if self.kind == "gpt_oss" else "gate"


def moe_spec(config) -> MoESpec:
    """The routed-expert MLP of a Mixtral, Qwen3-MoE, OLMoE or GPT-OSS config."""
    names = FAMILY_NAMES[config.model_type]
    return MoESpec(
        num_experts=int(getattr(config, names.num_experts)),
        top_k=int(config.num_experts_per_tok),
        width=int(getattr(config, names.width)),
        normalise_top_k=True if names.normalise is None else bool(getattr(config, names.normalise)),
        activation=config.hidden_act,
        projections=names.projections,
        block_name=names.block,
        kind=names.kind,
    )


def sparse_layers(config) -> tuple[bool, ...]:
    """Which decoder layers route through experts (the others have a dense MLP).

    Qwen3-MoE keeps the layers listed in `mlp_only_layers`, and those whose number (from 1) is
    not a multiple of `decoder_sparse_step`, dense (as its PyTorch decoder layer decides);
    the other families route in every layer.
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
    quantization = getattr(config, "quantization_config", None)
    method = (
        quantization.get("quant_method")
        if isinstance(quantization, dict)
        else getattr(quantization, "quant_method", None)
    )
    if quantization and (config.model_type, method) != ("gpt_oss", "mxfp4"):
        return [  # GPT-OSS's MXFP4 experts are unpacked by `convert_experts.unpack_mxfp4`
            f"quantization_config (quant_method {method!r}): load it in transformers with the "
            "weights dequantized and save_pretrained() it, then load that directory"
        ]
    spec = moe_spec(config)
    if any(sparse_layers(config)) and not 1 <= spec.top_k <= spec.num_experts:
        return [f"num_experts_per_tok={spec.top_k} with {spec.num_experts} experts"]
    return []


def route(logits_ne: jax.Array, top_k: int, normalise: bool) -> tuple[jax.Array, jax.Array]:
    """Each token's k experts and their weights: softmax (float32), top-k, renormalised or not.

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


def route_top_k_first(logits_ne: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """GPT-OSS's routing: the k largest scores, soft-maxed among themselves (in their dtype)."""
    scores_nk, experts_nk = jax.lax.top_k(logits_ne, top_k)
    return jax.nn.softmax(scores_nk, axis=-1), experts_nk.astype(jnp.int32)


# An expert MLP is `expert(x_md, linear, bias) -> y_md`: `linear(x_md, name)` multiplies each row
# by its own expert's kernel `name`, `bias(name)` is each row's own expert's bias `name`.


def gated_expert(act, names: tuple[str, ...]):
    """`down(act(gate(x)) * up(x))` (Mixtral, Qwen3-MoE, OLMoE)."""
    gate, up, down = names

    def expert(x_md, linear, bias):
        del bias
        return linear(act(linear(x_md, gate)) * linear(x_md, up), down)

    return expert


def gpt_oss_expert(x_md, linear, bias):
    """GPT-OSS: biases, interleaved gate/up columns, `(clip(up) + 1) * g * sigmoid(alpha g)`."""
    gate_up = linear(x_md, "gate_up_proj") + bias("gate_up_proj_bias")
    gate = jnp.minimum(gate_up[:, 0::2], GPT_OSS_LIMIT)
    up = jnp.clip(gate_up[:, 1::2], -GPT_OSS_LIMIT, GPT_OSS_LIMIT)
    glu = gate * jax.nn.sigmoid(gate * GPT_OSS_ALPHA)
    return linear((up + 1) * glu, "down_proj") + bias("down_proj_bias")


def routed_mlp(x_nd, experts_nk, weights_nk, bank, expert, dispatch="auto"):
    """Every token's weighted sum of its k experts' outputs, each expert run on its rows only.

    Args:
      x_nd: token inputs `[n, d]`.
      experts_nk: chosen experts `[n, k]` (int).
      weights_nk: their weights `[n, k]` (in x's dtype).
      bank: the stacked expert parameters by name (kernels `[E, in, out]`, biases `[E, out]`).
      expert: the expert MLP (`gated_expert(...)` or `gpt_oss_expert`).
      dispatch: "blocked", "ragged_dot", or "auto" (ragged_dot, but blocked on CPU).
    Returns:
      `[n, d]` in x's dtype.
    """
    if dispatch not in DISPATCHES:
        raise ValueError(f"dispatch must be one of {DISPATCHES}; got {dispatch!r}.")
    n, k = experts_nk.shape
    bank = {name: jnp.asarray(value) for name, value in bank.items()}
    num_experts = next(iter(bank.values())).shape[0]
    expert_m = experts_nk.reshape(n * k)
    order_m = jnp.argsort(expert_m, stable=True)  # rows of each expert contiguous
    token_m = order_m // k
    sizes_e = jnp.bincount(expert_m, length=num_experts).astype(jnp.int32)
    block_rows = _block_rows(n * k, num_experts)

    def blocked(x_md, sizes_e, bank):
        return _blocked(x_md, sizes_e, bank, expert, block_rows)

    def ragged(x_md, sizes_e, bank):
        return _ragged(x_md, sizes_e, bank, expert)

    x_md = x_nd[token_m]
    if dispatch == "auto":
        y_md = jax.lax.platform_dependent(x_md, sizes_e, bank, cpu=blocked, default=ragged)
    else:
        y_md = (blocked if dispatch == "blocked" else ragged)(x_md, sizes_e, bank)
    y_md = y_md * weights_nk.reshape(n * k)[order_m][:, None]
    return jnp.zeros_like(x_nd).at[token_m].add(y_md)


def _ragged(x_md, sizes_e, bank, expert):
    expert_m = jnp.repeat(jnp.arange(sizes_e.shape[0]), sizes_e, total_repeat_length=len(x_md))
    return expert(
        x_md,
        lambda rows, name: jax.lax.ragged_dot(rows, bank[name], sizes_e),
        lambda name: bank[name][expert_m],
    )


def _block_rows(rows: int, num_experts: int) -> int:
    """A power of two near the mean group size, at most MAX_BLOCK_ROWS: padding each group to
    whole blocks then adds at most E blocks, whatever the routing."""
    mean = max(1, math.ceil(rows / num_experts))
    return min(MAX_BLOCK_ROWS, 1 << (mean - 1).bit_length())


def _blocked(x_md, sizes_e, bank, expert, block_rows):
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
        x_cd, e, used = block

        def compute(x_cd):
            return expert(x_cd, lambda rows, name: rows @ bank[name][e], lambda n: bank[n][e])

        return None, jax.lax.cond(used, compute, jnp.zeros_like, x_cd)

    blocks = (x_pd.reshape(num_blocks, block_rows, d), jnp.minimum(expert_b, num_experts - 1))
    _, y_bcd = jax.lax.scan(one_block, None, (*blocks, used_b))
    return y_bcd.reshape(num_blocks * block_rows, d)[slot_m]


class ExpertBank(nn.Module):
    """The E experts' stacked parameters, named after PyTorch's expert parameters."""

    spec: MoESpec
    features: int
    act: Callable
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_nd, experts_nk, weights_nk, dispatch="auto"):
        spec, d, f, e = self.spec, self.features, self.spec.width, self.spec.num_experts
        init = nn.initializers.normal(0.02)  # never used for real: weights come from checkpoints
        if spec.kind == "gpt_oss":
            shapes = [(e, d, 2 * f), (e, 2 * f), (e, f, d), (e, d)]
            expert = gpt_oss_expert
        else:
            shapes = [(e, d, f), (e, d, f), (e, f, d)]
            expert = gated_expert(self.act, spec.projections)
        bank = {
            name: self.param(name, init, shape, self.dtype)
            for name, shape in zip(spec.projections, shapes, strict=True)
        }
        return routed_mlp(x_nd, experts_nk, weights_nk, bank, expert, dispatch)


class RoutedExperts(nn.Module):
    """The sparse MoE block: `x [b, t, d] -> y [b, t, d]`, parameters `gate` (GPT-OSS: `router`,
    with a bias) and `experts`.

    Attributes:
      spec: the routing and sizes.
      features: the model width d.
      act: the gated experts' activation (the function `spec.activation` names).
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
        router = nn.Dense(
            spec.num_experts,
            use_bias=spec.kind == "gpt_oss",
            dtype=self.dtype,
            param_dtype=self.dtype,
            name=spec.router_name,
        )
        logits_ne = router(x_nd)  # in the model's dtype, as PyTorch's router Linear
        if spec.kind == "gpt_oss":
            weights_nk, experts_nk = route_top_k_first(logits_ne, spec.top_k)
        else:
            weights_nk, experts_nk = route(logits_ne, spec.top_k, spec.normalise_top_k)
        bank = ExpertBank(spec, self.features, self.act, dtype=self.dtype, name="experts")
        y_nd = bank(x_nd, experts_nk, weights_nk.astype(x_nd.dtype), self.dispatch)
        return y_nd.reshape(b, t, d)
