"""Causal bases of a lens: the directions of a layer's residual stream its prediction relies on.

For layer l with hidden states h and lens prediction p = softmax(lens_l(h)), the energy of a unit
direction u is how much the prediction moves when u is removed from every vector,

    E(u) = mean over positions of KL(p || softmax(lens_l(remove_subspace(h, u, mode))))

(or, given labels, the increase of the next-token cross-entropy). The causal basis is found
greedily: direction j maximises E over unit vectors orthogonal to directions 0..j-1, each removed
on its own, and the k directions are returned sorted by decreasing energy. This is tuned-lens
0.2.0's `extract_causal_bases`; each direction is fitted by L-BFGS (`optax.lbfgs`, a zoom line
search) over an unconstrained v with u = P v / |P v|, P the projector away from the directions
already found. All layers are fitted together (`lax.map` over them, `layers_per_batch` at a time
under `vmap`), inside one `jax.jit`.

Where jaxlens differs from tuned-lens, on purpose:
  - the starting directions are the principal directions of the lens's effective unembedding
    `(I + W_l) U^T` (tuned-lens means to do this, but translates U along its vocabulary axis,
    which only runs at all when vocab == d); `init_ldk` overrides them;
  - "resample" fixes one derangement per layer (drawn from `key`) for the whole fit, so L-BFGS
    sees one deterministic objective; tuned-lens draws a new one at every evaluation.

Example:

    bases = extract_causal_bases(lens, hidden_lbtd[:-1], k=4)
    bases.vectors_ldk[l, :, 0]     # layer l's most important direction
    bases.energies_lk[l]           # its 4 energies (nats), largest first
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxlens.analysis.subspace import MODES, remove_subspace, sample_derangement
from jaxlens.lens import LogitLens


class CausalBasis(NamedTuple):
    """Causal bases of the requested layers (in the order they were requested).

    Attributes:
      energies_lk: `[layers, k]` energy of each direction, decreasing along k: the mean KL (or
        cross-entropy increase) in nats when that direction alone is removed.
      vectors_ldk: `[layers, d, k]` orthonormal directions as columns, in the energies' order.
    """

    energies_lk: jax.Array
    vectors_ldk: jax.Array


def extract_causal_bases(
    lens: LogitLens,
    hidden_lbtd: jax.Array,
    k: int,
    *,
    layers: Sequence[int] | None = None,
    labels_bt: jax.Array | None = None,
    mode: str = "mean",
    key: jax.Array | None = None,
    init_ldk: jax.Array | None = None,
    max_iter: int = 100,
    tolerance: float = 1e-6,
    layers_per_batch: int | None = None,
) -> CausalBasis:
    """Fits k causal directions per layer (see the module docstring).

    Args:
      lens: a `TunedLens` or `LogitLens`.
      hidden_lbtd: hidden states `[L, b, t, d]` of the lens's L layers (`hidden_lbtd[:-1]` of a
        model's output: the last entry is the model's output, which no lens translates).
      k: directions per layer, 1 <= k <= d.
      layers: the layers to fit (default: all L).
      labels_bt: token ids `[b, t]` of the input; given, the energy is the increase of the
        next-token cross-entropy (position t predicts token t + 1) instead of the KL.
      mode: how a direction is removed: "zero", "mean" (default) or "resample".
      key: for "resample": draws one derangement per layer.
      init_ldk: `[len(layers), d, k]` starting directions (column j starts direction j).
      max_iter: L-BFGS iterations at most, per direction.
      tolerance: L-BFGS stops once the gradient's norm is below this (times the energy, for
        energies above 1). Each direction is a maximum over the space orthogonal to the ones
        before it, so an error in an earlier direction moves the later energies to first order:
        at the default, later energies of a tiny model were 1e-5 off a float64 fit (1e-7 gave
        2e-7; tests/test_causal_basis.py).
      layers_per_batch: how many layers are fitted at once under `vmap` (default: all); lower it
        when `layers_per_batch * b * t * vocab` float32 logits (a few copies) do not fit.
    Returns:
      a `CausalBasis` with `energies_lk [len(layers), k]` and `vectors_ldk [len(layers), d, k]`.
    """
    layers = _checked_layers(lens, hidden_lbtd, layers)
    d = hidden_lbtd.shape[-1]
    if not 1 <= k <= d:
        raise ValueError(f"k={k} directions do not fit in d={d} dimensions; pass 1 <= k <= {d}.")
    if mode not in MODES:
        raise ValueError(f"Unknown ablation mode {mode!r}; use one of {MODES}.")
    if layers_per_batch is not None and layers_per_batch < 1:
        raise ValueError(
            f"layers_per_batch={layers_per_batch}; pass a positive count, or None for all layers."
        )
    if labels_bt is not None and labels_bt.shape != hidden_lbtd.shape[1:3]:
        raise ValueError(
            f"labels_bt has shape {labels_bt.shape} but the hidden states hold "
            f"{hidden_lbtd.shape[1:3]} (batch, tokens); pass the input's token ids."
        )
    if init_ldk is not None and init_ldk.shape != (len(layers), d, k):
        raise ValueError(
            f"init_ldk has shape {init_ldk.shape}; pass one [d, k] = [{d}, {k}] basis per "
            f"requested layer, shape ({len(layers)}, {d}, {k})."
        )
    vectors_per_layer = hidden_lbtd.shape[1] * hidden_lbtd.shape[2]
    if mode == "resample":
        if key is None:
            raise ValueError("Resample ablation draws derangements: pass `key=jax.random.key(…)`.")
        sample = jax.vmap(sample_derangement, in_axes=(0, None))
        perms_ln = sample(jax.random.split(key, len(layers)), vectors_per_layer)
    else:
        perms_ln = jnp.zeros((len(layers), vectors_per_layer), jnp.int32)  # unused
    layers_l = jnp.asarray(layers, jnp.int32)
    if init_ldk is None:
        init_ldk = unembedding_directions(lens, layers_l, k)
    return _fit_layers(
        lens,
        hidden_lbtd[layers_l],
        layers_l,
        jnp.asarray(init_ldk, jnp.float32),
        perms_ln,
        labels_bt,
        mode=mode,
        max_iter=max_iter,
        tolerance=tolerance,
        layers_per_batch=layers_per_batch or len(layers),  # None: all
    )


def unembedding_directions(lens: LogitLens, layers_l: jax.Array, k: int) -> jax.Array:
    """The k principal directions `[layers, d, k]` of each layer's effective unembedding.

    Layer l's translator is affine, `h -> h J_l + b_l` (J = I + W for a tuned lens), so the
    logits read h through `J_l U^T` (`[d, V]`, U the unembedding `[V, d]`); its top left
    singular vectors, the top eigenvectors of `J_l U^T U J_l^T`, are the directions the logits
    are most sensitive to (the final norm aside).
    """
    unembed_vd = lens.decoder.unembed_vd.astype(jnp.float32)
    gram_dd = unembed_vd.T @ unembed_vd
    eye_dd = jnp.eye(gram_dd.shape[0], dtype=jnp.float32)

    def directions(layer):
        # The linear part of the translator, as a matrix: its images of the unit vectors.
        linear_dd = lens.transform_hidden(eye_dd, layer) - lens.transform_hidden(
            jnp.zeros_like(eye_dd[:1]), layer
        )
        _, eigenvectors_dd = jnp.linalg.eigh(linear_dd @ gram_dd @ linear_dd.T)
        return eigenvectors_dd[:, ::-1][:, :k]  # eigh sorts ascending

    return jax.vmap(directions)(layers_l)


@partial(jax.jit, static_argnames=("mode", "max_iter", "tolerance", "layers_per_batch"))
def _fit_layers(
    lens,
    h_lbtd,
    layers_l,
    init_ldk,
    perms_ln,
    labels_bt,
    *,
    mode,
    max_iter,
    tolerance,
    layers_per_batch,
):
    def fit(args):
        h_btd, layer, init_dk, perm_n = args
        energy = _energy_fn(lens, layer, h_btd, perm_n, labels_bt, mode)
        return _greedy_basis(energy, init_dk, max_iter, tolerance)

    return jax.lax.map(fit, (h_lbtd, layers_l, init_ldk, perms_ln), batch_size=layers_per_batch)


def _energy_fn(lens, layer, h_btd, perm_n, labels_bt, mode):
    """E(u) of one layer (see the module docstring) for a unit direction u `[d]`."""
    h_btd = h_btd.astype(jnp.float32)  # a bfloat16 model's states: ablate in float32
    log_p_btv = jax.nn.log_softmax(lens.layer_logits(h_btd, layer))
    if labels_bt is not None:
        base_loss = _next_token_ce(log_p_btv, labels_bt)

    def energy(u_d):
        ablated_btd = remove_subspace(
            h_btd, u_d, mode, derangement=perm_n if mode == "resample" else None
        )
        log_q_btv = jax.nn.log_softmax(lens.layer_logits(ablated_btd, layer))
        if labels_bt is not None:
            return _next_token_ce(log_q_btv, labels_bt) - base_loss
        return (jnp.exp(log_p_btv) * (log_p_btv - log_q_btv)).sum(-1).mean()

    return energy


def _next_token_ce(log_q_btv, labels_bt):
    predicted = jnp.take_along_axis(log_q_btv[:, :-1], labels_bt[:, 1:, None], axis=-1)
    return -predicted.mean()


def _greedy_basis(energy, init_dk, max_iter, tolerance):
    """Fits the directions one after another, each orthogonal to those before, then sorts."""
    d, k = init_dk.shape

    def fit_direction(j, carry):
        basis_dk, energies_k = carry  # columns j.. are still zero, so they project nothing

        def to_unit(v_d):
            v_d = v_d - basis_dk @ (basis_dk.T @ v_d)
            return v_d / (jnp.linalg.norm(v_d) + jnp.finfo(v_d.dtype).eps)

        v_d = _lbfgs_maximise(
            lambda v: energy(to_unit(v)), to_unit(init_dk[:, j]), max_iter, tolerance
        )
        u_d = to_unit(v_d)
        return basis_dk.at[:, j].set(u_d), energies_k.at[j].set(energy(u_d))

    start = (jnp.zeros((d, k), jnp.float32), jnp.zeros((k,), jnp.float32))
    basis_dk, energies_k = jax.lax.fori_loop(0, k, fit_direction, start)
    order_k = jnp.argsort(-energies_k)
    return CausalBasis(energies_k[order_k], basis_dk[:, order_k])


def _lbfgs_maximise(objective, v0_d, max_iter, tolerance):
    """Maximises `objective` from v0 by L-BFGS with a zoom line search (optax's recipe)."""
    loss = lambda v: -objective(v)  # noqa: E731
    solver = optax.lbfgs()  # with its default zoom line search (strong Wolfe conditions)
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry):
        v, state = carry
        value, grad = value_and_grad(v, state=state)
        updates, state = solver.update(grad, state, v, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(v, updates), state

    def unfinished(carry):
        _, state = carry
        count = optax.tree.get(state, "count")
        grad_norm = optax.tree.norm(optax.tree.get(state, "grad"))
        # Relative to energies above 1 nat: float32 cannot resolve their gradients to 1e-6.
        scale = jnp.maximum(1.0, jnp.abs(optax.tree.get(state, "value")))
        return (count == 0) | ((count < max_iter) & (grad_norm >= tolerance * scale))

    v_d, _ = jax.lax.while_loop(unfinished, step, (v0_d, solver.init(v0_d)))
    return v_d


def _checked_layers(lens, hidden_lbtd, layers) -> tuple[int, ...]:
    """The requested layer indices, after checking them and the hidden states' shape."""
    if hidden_lbtd.ndim != 4:
        raise ValueError(
            f"Expected hidden states [L, batch, tokens, d]; got shape {hidden_lbtd.shape}."
        )
    num_layers = getattr(lens, "num_layers", hidden_lbtd.shape[0])
    if hidden_lbtd.shape[0] != num_layers:
        raise ValueError(
            f"Expected hidden states of {num_layers} layers (the lens's translators); got "
            f"{hidden_lbtd.shape[0]}. Pass hidden_lbtd[:-1]: the last entry is the output."
        )
    if hidden_lbtd.shape[-1] != lens.decoder.d_model:
        raise ValueError(
            f"The hidden states are {hidden_lbtd.shape[-1]} wide but the lens decodes "
            f"{lens.decoder.d_model}-wide vectors; pass the hidden states of the lens's model."
        )
    layers = tuple(range(num_layers)) if layers is None else tuple(int(i) for i in layers)
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or not layers:
        raise ValueError(
            f"Layer indices {bad or list(layers)} are out of range: the lens has {num_layers} "
            f"layers; pass indices in 0..{num_layers - 1}."
        )
    return layers
