"""The per-layer ridge solve that turns `Statistics` into a translator bank, in float64 on host.

For layer l, with X the unit-RMS inputs and Y the targets (rows are tokens, see `statistics`):

    M_l = argmin_M ||X M - Y||² + λ·(tr(XᵀX)/d)·||M||²  =  (XᵀX + r I)⁻¹ XᵀY,  r = λ·tr(XᵀX)/d

so λ is relative to the mean eigenvalue of XᵀX (with unit-RMS inputs tr(XᵀX)/d is the token
count: λ = 1e-3 weighs the prior like a thousandth of the data). The translator is written
residually, `h + h W`, so its kernel is `W_l = M_l - I`. With `fit_bias`, the fit is affine on
[x, 1] (the bias not penalised); as a translator acts on the raw residual, where a bias does not
scale with the token, the unit-RMS bias is multiplied by the layer's mean RMS.

Each layer's `[d, d]` sums are fetched alone (gathered across processes when they are split over
hosts) and solved with a float64 Cholesky factorisation, which is exact to float64 rounding for
any system the checks below accept.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from jaxlens.closed_form.statistics import Accumulator, Statistics, x64
from jaxlens.lens import Translators

# Refuse a system whose smallest Cholesky pivot² falls below this fraction of the mean diagonal:
# hidden states carry float32's 7 digits, so a direction that weak is rounding, not data. The
# ridge adds λ times the mean diagonal to every pivot², so any λ above this is accepted.
_MIN_PIVOT = 1e-7


def _host(array: jax.Array, index=()) -> np.ndarray:
    """`array[index]` of a global array as float64 numpy, whole on every process."""
    with x64(array.dtype):  # indexing a float64 array must not truncate it
        part = array[index]
        if not part.is_fully_addressable:
            from jax.experimental import multihost_utils

            part = multihost_utils.process_allgather(part, tiled=True)
        return np.asarray(part, np.float64)


def solve(
    stats: Statistics | Accumulator,
    *,
    ridge: float,
    fit_bias: bool = False,
    bias: bool = True,
    observed_d: np.ndarray | None = None,
    towards_identity: bool = False,
) -> Translators:
    """Solves every layer's ridge system and returns the bank (float32, host).

    Args:
      stats: the summed statistics (an `Accumulator`'s float32 pair is added in float64).
      ridge: λ >= 0, relative to tr(XᵀX)/d (see module doc).
      fit_bias: fit an affine map on [x, 1] instead of a linear one.
      bias: give the bank a bias array (zeros unless `fit_bias`); else `bias_ld` is None.
      observed_d: bool `[d]`, False where the final norm's scale is zero
        (`statistics.observed_coordinates`): those output coordinates are left as the logit lens
        leaves them (kernel column and bias 0). Default: all observed.
      towards_identity: penalise ||M - I||² (the translator kernel W) instead of ||M||².
    Returns:
      `Translators(kernel_ldd [L, d, d], bias_ld [L, d] or None)`.
    Raises:
      ValueError: a negative or non-finite λ, non-finite statistics, a layer without tokens, or a
        singular system; the message says what to change.
    """
    # A compensated float32 pair is read half by half and added in float64 here: adding it on
    # device would round it to float32 and throw the compensation away before the solve.
    if isinstance(stats, Accumulator):
        halves = tuple(s for s in (stats.total, stats.compensation) if s is not None)
    else:
        halves = (stats,)

    def read(field, index=()):
        return sum(_host(getattr(half, field), index) for half in halves)

    if not (np.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge={ridge}; it must be a finite number >= 0 (e.g. 1e-3).")
    if fit_bias and not bias:
        raise ValueError("fit_bias=True needs bias=True (a bank with a bias array).")
    num_layers, d = halves[0].x_ld.shape
    observed = np.ones(d, bool) if observed_d is None else np.asarray(observed_d, bool)
    counts, rms_sums = read("count_l"), read("rms_l")
    kernels = np.empty((num_layers, d, d), np.float32)
    biases = np.zeros((num_layers, d), np.float32)
    for layer in range(num_layers):
        xx, xy = read("xx_lde", layer), read("xy_lde", layer)
        sx, sy = read("x_ld", layer), read("y_ld", layer)
        _check_layer(layer, xx, xy, sx, sy, counts[layer], ridge, d + fit_bias)
        lhs = (xx + xx.T) / 2
        lhs[np.diag_indices(d)] += ridge * np.trace(xx) / d
        rhs = xy + ridge * np.trace(xx) / d * np.eye(d) if towards_identity else xy
        if fit_bias:  # [x, 1] augmented; the bias row is not penalised
            lhs = np.block([[lhs, sx[:, None]], [sx[None, :], np.array([[counts[layer]]])]])
            rhs = np.concatenate([rhs, sy[None, :]])
        solution = _cholesky_solve(layer, lhs, rhs, np.trace(xx) / d, ridge)
        m = solution[:d]
        m[:, ~observed] = np.eye(d)[:, ~observed]
        kernels[layer] = m - np.eye(d)
        if fit_bias:
            biases[layer] = np.where(observed, solution[d], 0.0) * rms_sums[layer] / counts[layer]
    return Translators(
        kernel_ldd=jnp.asarray(kernels), bias_ld=jnp.asarray(biases) if bias else None
    )


def _check_layer(layer, xx, xy, sx, sy, count, ridge, unknowns) -> None:
    if not all(np.isfinite(a).all() for a in (xx, xy, sx, sy, count)):
        raise ValueError(
            f"The least-squares statistics of layer {layer} are not finite: the model's hidden "
            "states hold NaN or Inf on these tokens. Check the model's dtype (float16 overflows; "
            "use float32 or bfloat16) and its weights."
        )
    if count <= 0:
        raise ValueError(
            f"Layer {layer} has no tokens to fit on; give more tokens (or skip fewer positions)."
        )
    if ridge == 0 and count < unknowns:
        raise ValueError(
            f"ridge=0 with {count:.0f} tokens for {unknowns} unknowns per output coordinate: the "
            f"system is singular. Raise the ridge (e.g. 1e-3) or fit on at least {unknowns} tokens."
        )


def _cholesky_solve(layer, lhs, rhs, mean_diagonal, ridge) -> np.ndarray:
    hint = f"Raise the ridge above {ridge:g} (e.g. 1e-3) or add tokens (more varied text)."
    try:
        factor = scipy.linalg.cho_factor(lhs, lower=False, check_finite=False)
    except np.linalg.LinAlgError:
        raise ValueError(f"The least-squares system of layer {layer} is singular. {hint}") from None
    weakest = float(np.min(np.diag(factor[0]) ** 2))
    if weakest < _MIN_PIVOT * mean_diagonal:
        raise ValueError(
            f"The least-squares system of layer {layer} is numerically singular (a pivot of "
            f"{weakest:.3g} against a mean diagonal of {mean_diagonal:.3g}). {hint}"
        )
    return scipy.linalg.cho_solve(factor, rhs, check_finite=False)
