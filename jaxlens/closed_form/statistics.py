"""Per-layer least-squares statistics of a tuned lens, accumulated over token batches on the mesh.

For each lensed layer l (the model's `hidden_lbtd[:-1]`) and each token, the input is the layer's
residual at unit RMS, `x = h_l / rms(h_l)`, and the target is the model's final residual direction
before the final norm's affine part, `y`, read back from the final-normed last hidden state:

    RMSNorm        y = final / w
    Gemma RMSNorm  y = final / (1 + w)
    LayerNorm      y = (final - beta) / gamma

Every final norm here is invariant to a positive scale of its input, so a bias-free translator
`h -> h M` fitted on unit-RMS inputs gives the same logits on the raw residual. A coordinate whose
scale is exactly zero never reaches the logits and its residual value cannot be read back: its
target is set to 0 here and `solve` leaves that output coordinate as the logit lens does.

Precision. Real residual streams are badly conditioned (a few huge directions), and the solve
amplifies relative errors of XᵀX by its condition number: on SmolLM2 (2,048 tokens, λ = 1e-3)
float32 sums move the fitted maps by 1.3e-3 of their largest entry against float64 numpy, and
reversing the batch order moves them by 1.2e-3; float64 sums: 7e-8 and 1e-8
(bench/closed_form_measure.py).
So the sums are float64 where the backend has float64 (CPU, GPU): the statistics are computed in
float64 from the float32 hidden states and summed in float64, order-independent to ~1e-12. This
is the same memory as a compensated float32 pair, which is the fallback elsewhere (TPU):
per-batch float32 sums folded with Neumaier's compensated addition.

Batches are split over the mesh's "data" axis and the statistics' last axis over "model"; XLA sums
across devices and processes. Per-token weights (0/1) drop padding rows and, optionally, the first
positions or tokens with an outsized residual.

Axis letters: l layer, b batch, t token position, d model width (input), e model width (output).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlens.decoder import Decoder
from jaxlens.models import SubjectModel
from jaxlens.sharding import (
    bank_shardings,
    global_batch,
    make_mesh,
    model_param_shardings,
    process_row_block,
    put,
)

_HIGHEST = jax.lax.Precision.HIGHEST  # no bf16/TF32 passes on accelerators


@struct.dataclass
class Statistics:
    """Weighted sums over tokens, per lensed layer (w the token's 0/1 weight).

    Attributes:
      xx_lde: `[L, d, d]` sum of w x xᵀ.
      xy_lde: `[L, d, d]` sum of w x yᵀ.
      x_ld: `[L, d]` sum of w x.
      y_ld: `[L, d]` sum of w y.
      rms_l: `[L]` sum of w rms(h_l) (turns a bias fitted at unit RMS into a raw-scale one).
      count_l: `[L]` sum of w (tokens used).
    """

    xx_lde: jax.Array
    xy_lde: jax.Array
    x_ld: jax.Array
    y_ld: jax.Array
    rms_l: jax.Array
    count_l: jax.Array

    @classmethod
    def zeros(cls, num_layers: int, d: int, dtype=jnp.float32) -> Statistics:
        return cls(
            xx_lde=jnp.zeros((num_layers, d, d), dtype),
            xy_lde=jnp.zeros((num_layers, d, d), dtype),
            x_ld=jnp.zeros((num_layers, d), dtype),
            y_ld=jnp.zeros((num_layers, d), dtype),
            rms_l=jnp.zeros((num_layers,), dtype),
            count_l=jnp.zeros((num_layers,), dtype),
        )


@struct.dataclass
class Accumulator:
    """A running sum of `Statistics`: `total + compensation` (float32), or `total` (float64)."""

    total: Statistics
    compensation: Statistics | None

    @classmethod
    def zeros(cls, num_layers: int, d: int, dtype=jnp.float32) -> Accumulator:
        """Float32 gets a compensation term; float64 (create it under `x64`) needs none."""
        compensated = jnp.dtype(dtype) == jnp.float32
        return cls(
            Statistics.zeros(num_layers, d, dtype),
            Statistics.zeros(num_layers, d, dtype) if compensated else None,
        )

    def add(self, batch: Statistics, layer=None) -> Accumulator:
        """Adds a batch's sums (of all layers, or of one `layer` when given, possibly traced):
        plainly in float64, by Neumaier's compensated addition in float32."""

        def at(tree):
            return tree if layer is None else jax.tree.map(lambda a: a[layer], tree)

        def put(tree, part):
            if layer is None:
                return part
            return jax.tree.map(lambda a, p: a.at[layer].set(p), tree, part)

        total = at(self.total)
        batch = jax.tree.map(lambda t, b: b.astype(t.dtype), total, batch)
        new = jax.tree.map(jnp.add, total, batch)
        if self.compensation is None:
            return Accumulator(put(self.total, new), None)

        def lost(t, v, n):  # what rounding dropped from t + v = n, exactly
            return jnp.where(jnp.abs(t) >= jnp.abs(v), (t - n) + v, (v - n) + t)

        comp = jax.tree.map(
            lambda c, t, v, n: c + lost(t, v, n), at(self.compensation), total, batch, new
        )
        return Accumulator(put(self.total, new), put(self.compensation, comp))

    def value(self) -> Statistics:
        """The sums in their dtype: a float32 pair is rounded here (`solve` reads both halves)."""
        if self.compensation is None:
            return self.total
        return jax.tree.map(jnp.add, self.total, self.compensation)

    @property
    def dtype(self):
        return self.total.count_l.dtype


def float64_available() -> bool:
    """Whether the default backend computes in float64 (CPU and GPU do; TPU does not)."""
    return jax.default_backend() in ("cpu", "gpu", "cuda", "rocm")


def x64(dtype):
    """The context a computation in `dtype` runs in: float64 needs `jax.enable_x64`."""
    return jax.enable_x64(True) if jnp.dtype(dtype) == jnp.float64 else contextlib.nullcontext()


def norm_scale(decoder: Decoder, dtype=jnp.float32) -> jax.Array | None:
    """The final norm's effective scale `[d]` (Gemma: 1 + w), or None."""
    if decoder.norm_scale_d is None:
        return None
    scale = decoder.norm_scale_d.astype(dtype)
    return 1.0 + scale if decoder.norm_kind == "gemma_rmsnorm" else scale


def unit_inputs(h_lbtd: jax.Array, norm_kind: str, dtype=jnp.float32):
    """`(x_lbtd, rms_lbt)`: residuals at unit RMS, and their RMS (raw values without a norm)."""
    h = h_lbtd.astype(dtype)
    if norm_kind == "none":  # no scale invariance to exploit: fit the raw residual
        return h, jnp.ones(h.shape[:-1], dtype)
    rms = jnp.sqrt(jnp.mean(h * h, axis=-1))
    return h / jnp.where(rms > 0, rms, 1.0)[..., None], rms


def targets(decoder: Decoder, final_btd: jax.Array, dtype=jnp.float32) -> jax.Array:
    """The final residual direction `y_btd` before the norm's affine part (see module doc).

    Coordinates whose scale is exactly zero get 0 (their value is not observable)."""
    y = final_btd.astype(dtype)
    if decoder.norm_bias_d is not None:
        y = y - decoder.norm_bias_d.astype(dtype)
    scale = norm_scale(decoder, dtype)
    if scale is None:
        return y
    observed = scale != 0
    return jnp.where(observed, y / jnp.where(observed, scale, 1.0), 0.0)


def observed_coordinates(decoder: Decoder) -> np.ndarray:
    """Host bool `[d]`: the coordinates whose final-norm scale is non-zero."""
    scale = norm_scale(decoder)
    if scale is None:
        return np.ones(decoder.d_model, bool)
    return np.asarray(jax.device_get(scale)) != 0


def layer_statistics(x_btd, y_btd, rms_bt, weight_bt) -> Statistics:
    """One layer's sums over a batch, in the inputs' dtype (fields without the layer axis)."""
    wx = x_btd * weight_bt[..., None]
    return Statistics(
        xx_lde=jnp.einsum("btd,bte->de", wx, x_btd, precision=_HIGHEST),
        xy_lde=jnp.einsum("btd,bte->de", wx, y_btd, precision=_HIGHEST),
        x_ld=wx.sum((0, 1)),
        y_ld=jnp.einsum("bt,bte->e", weight_bt, y_btd, precision=_HIGHEST),
        rms_l=(rms_bt * weight_bt).sum(),
        count_l=weight_bt.sum(),
    )


def batch_statistics(x_lbtd, y_btd, rms_lbt, weight_lbt) -> Statistics:
    """Every layer's sums over a batch (`layer_statistics` mapped over the layer axis)."""
    return jax.vmap(layer_statistics, in_axes=(0, None, 0, 0))(x_lbtd, y_btd, rms_lbt, weight_lbt)


def token_weights(hidden_lbtd, valid_b, *, skip_positions: int = 0, max_rms_ratio: float = 0.0):
    """0/1 weights `[L, b, t]` of the lensed layers' tokens.

    Padding rows (`valid_b` 0) and the first `skip_positions` positions get 0; with
    `max_rms_ratio > 0` so does, per layer, every token whose residual RMS exceeds that multiple
    of the batch's median RMS at that layer (attention sinks, massive activations)."""
    h = hidden_lbtd[:-1].astype(jnp.float32)
    keep_t = jnp.arange(h.shape[2]) >= skip_positions
    weight_lbt = jnp.broadcast_to(
        (valid_b[:, None] * keep_t[None, :]).astype(jnp.float32), h.shape[:-1]
    )
    if max_rms_ratio > 0:
        rms_lbt = jnp.sqrt(jnp.mean(h * h, axis=-1))
        median_l = jnp.nanmedian(jnp.where(weight_lbt > 0, rms_lbt, jnp.nan), axis=(1, 2))
        weight_lbt = weight_lbt * (rms_lbt <= max_rms_ratio * median_l[:, None, None])
    return weight_lbt


def fold(acc: Accumulator, decoder: Decoder, hidden_lbtd, weight_lbt) -> Accumulator:
    """Adds one batch (all hidden states `[L+1, b, t, d]`, weights `[L, b, t]`) to the sums,
    computing in the accumulator's dtype (float64: run under `x64(jnp.float64)`).

    A loop over layers updates the (donated) sums in place, so the temporaries are one layer's:
    `[b, t, d]` inputs in the sums' dtype and `[d, d]` products, never `[L, d, d]` or a float64
    copy of all hidden states."""
    dtype = acc.dtype
    y_btd = targets(decoder, hidden_lbtd[-1], dtype)

    def one_layer(layer, acc):
        x_btd, rms_bt = unit_inputs(hidden_lbtd[layer], decoder.norm_kind, dtype)
        stats = layer_statistics(x_btd, y_btd, rms_bt, weight_lbt[layer].astype(dtype))
        return acc.add(stats, layer)

    return jax.lax.fori_loop(0, weight_lbt.shape[0], one_layer, acc)


def accumulate_statistics(
    model: SubjectModel,
    sequences_nt: np.ndarray,
    *,
    batch_size: int = 8,
    mesh: Mesh | None = None,
    model_params=None,
    shard_model_params: bool = False,
    skip_positions: int = 0,
    max_rms_ratio: float = 0.0,
    dtype=None,
) -> Accumulator:
    """Sums the statistics of `sequences_nt` over the mesh: per batch, one jitted forward pass
    and one jitted fold of its hidden states into the sums.

    Every host passes the same sequences and feeds only its own rows (as `evaluate` does). The
    last partial batch is padded with weight-0 rows, so every token counts and each jit compiles
    once.

    Args:
      model: the subject model.
      sequences_nt: token ids `[n, t]`.
      batch_size: sequences per step, rounded up to a multiple of the mesh's "data" size.
      mesh: a ("data", "model") mesh (default: all devices on "data").
      model_params: the parameters to use (default: the model's own).
      shard_model_params: split the frozen weights over "model" (`model_param_shardings`).
      skip_positions, max_rms_ratio: tokens left out of the sums (`token_weights`).
      dtype: of the sums; default float64 where the backend has it, else float32 (compensated).
    Returns:
      The `Accumulator` (global arrays: `[L, d, d]` split over "model" on the last axis).
    """
    ids = model.check_input_ids(sequences_nt)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; it must be at least 1.")
    if not 0 <= skip_positions < ids.shape[1]:
        raise ValueError(
            f"skip_positions={skip_positions} leaves no token of sequences of {ids.shape[1]}; "
            f"choose a value from 0 to {ids.shape[1] - 1}."
        )
    dtype = jnp.dtype(dtype or (jnp.float64 if float64_available() else jnp.float32))
    mesh = make_mesh(-1, 1) if mesh is None else mesh
    params = model.params if model_params is None else model_params
    batch_size = -(-batch_size // mesh.shape["data"]) * mesh.shape["data"]
    param_shardings = model_param_shardings(params, mesh, shard_model_params)
    rows_spec, hidden_spec = P("data"), P(None, "data")

    def forward(model_params, ids_bt, valid_b):
        hidden_lbtd = model.apply(model_params, ids_bt).hidden_lbtd
        weights = token_weights(
            hidden_lbtd, valid_b, skip_positions=skip_positions, max_rms_ratio=max_rms_ratio
        )
        return hidden_lbtd, weights

    rows_sharding = NamedSharding(mesh, rows_spec)
    forward_step = jax.jit(
        forward,
        in_shardings=(param_shardings, rows_sharding, rows_sharding),
        out_shardings=(NamedSharding(mesh, hidden_spec),) * 2,
    )
    params = put(params, param_shardings)
    decoder = model.decoder(params)
    block, num_blocks = process_row_block(mesh, rows_spec, (batch_size, ids.shape[1]))
    rows = batch_size // num_blocks
    padded = -(-len(ids) // batch_size) * batch_size
    valid = (np.arange(padded) < len(ids)).astype(np.float32)
    ids = np.concatenate([ids, np.zeros((padded - len(ids), ids.shape[1]), np.int32)])
    with x64(dtype):  # the sums are created in place, already split over the mesh
        zeros = functools.partial(Accumulator.zeros, model.num_layers, model.d_model, dtype)
        acc_shardings = bank_shardings(mesh, jax.eval_shape(zeros))
        acc = jax.jit(zeros, out_shardings=acc_shardings)()
        fold_step = jax.jit(fold, out_shardings=acc_shardings, donate_argnums=0)
    for start in range(0, padded, batch_size):
        mine = slice(start + block * rows, start + (block + 1) * rows)
        batch = forward_step(
            params,
            global_batch(ids[mine], mesh, rows_spec),
            global_batch(valid[mine], mesh, rows_spec),
        )
        with x64(dtype):
            acc = fold_step(acc, decoder, *batch)
    return acc
