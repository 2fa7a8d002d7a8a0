"""Closed-form translators (`jaxlens.closed_form`) against a direct float64 numpy least-squares
solve for every final-norm kind, an exactly recoverable linear map, batch order, a simulated
8-device mesh, and every input the fit refuses. Two `jax.distributed` processes fit as one does
in tests/test_train_lib.py, where the two-process training run starts from the fit."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models

from jaxlens.closed_form import (
    Accumulator,
    Statistics,
    accumulate_statistics,
    batch_statistics,
    fit_translators,
    solve,
    targets,
    unit_inputs,
)
from jaxlens.decoder import Decoder
from jaxlens.models import load_model

NORM_KINDS = {"gpt2": "layernorm", "llama": "rmsnorm", "gemma": "gemma_rmsnorm"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """`tiny(family) -> (directory, SubjectModel)`, each built once per module."""
    built = {}

    def get(family):
        if family not in built:
            directory = tmp_path_factory.mktemp(family)
            tiny_models.save(tiny_models.build(family, seed=3), directory)
            built[family] = (directory, load_model(directory))
        return built[family]

    return get


def _ids(model, n=12, t=16, seed=0):
    return np.random.default_rng(seed).integers(0, model.vocab_size, size=(n, t)).astype(np.int32)


def _relative(got, want):
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def _reference(hidden_lbtd, decoder, ridge, *, fit_bias=False, skip_positions=0, keep_lbt=None):
    """Float64 numpy: the same fit as a direct least-squares solve of the stacked system
    [X; sqrt(r) I] M = [Y; 0] (the bias column, if any, unpenalised), on the tokens `keep_lbt`
    (default all) after the first `skip_positions`. Returns (M_ldd, bias_ld)."""
    h = np.asarray(hidden_lbtd, np.float64)[:, :, skip_positions:]
    d = h.shape[-1]
    if keep_lbt is None:
        keep_lbt = np.ones(h.shape[:-1], bool)[:-1]
    final = h[-1].reshape(-1, d)
    if decoder.norm_bias_d is not None:
        final = final - np.asarray(decoder.norm_bias_d, np.float64)
    scale = np.asarray(decoder.norm_scale_d, np.float64)
    scale = 1 + scale if decoder.norm_kind == "gemma_rmsnorm" else scale
    ms, bs = [], []
    for layer in range(h.shape[0] - 1):
        keep = keep_lbt[layer].reshape(-1)
        raw = h[layer].reshape(-1, d)[keep]
        rms = np.sqrt((raw**2).mean(-1, keepdims=True))
        x = raw / rms
        y = final[keep] / np.where(scale == 0, 1, scale)
        r = ridge * np.trace(x.T @ x) / d
        design = np.hstack([x, np.ones((len(x), 1))]) if fit_bias else x
        penalty = np.sqrt(r) * np.eye(d, design.shape[1])
        solution = np.linalg.lstsq(
            np.vstack([design, penalty]), np.vstack([y, np.zeros((d, d))]), rcond=None
        )[0]
        ms.append(solution[:d])
        bs.append(solution[d] * rms.mean() if fit_bias else np.zeros(d))
    return np.stack(ms), np.stack(bs)


@pytest.mark.parametrize("fit_bias", [False, True], ids=["linear", "affine"])
@pytest.mark.parametrize("family", list(NORM_KINDS))
def test_fit_equals_float64_least_squares(tiny, family, fit_bias):
    _, model = tiny(family)
    assert model.decoder().norm_kind == NORM_KINDS[family]
    ids = _ids(model)
    bank = fit_translators(model, ids, ridge=1e-3, batch_size=4, fit_bias=fit_bias)
    want_m, want_b = _reference(model(ids).hidden_lbtd, model.decoder(), 1e-3, fit_bias=fit_bias)
    eye = np.eye(model.d_model)
    assert bank.kernel_ldd.dtype == jnp.float32 and bank.kernel_ldd.shape == want_m.shape
    assert _relative(np.asarray(bank.kernel_ldd, np.float64) + eye, want_m) < 1e-5
    if fit_bias:
        assert _relative(bank.bias_ld, want_b) < 1e-5
    else:
        assert not np.asarray(bank.bias_ld).any()


def test_skipped_positions_are_left_out_of_the_fit(tiny):
    _, model = tiny("llama")
    ids = _ids(model)
    bank = fit_translators(model, ids, ridge=1e-3, batch_size=4, skip_positions=2, bias=False)
    want, _ = _reference(model(ids).hidden_lbtd, model.decoder(), 1e-3, skip_positions=2)
    assert bank.bias_ld is None
    assert _relative(np.asarray(bank.kernel_ldd, np.float64) + np.eye(model.d_model), want) < 1e-5


def test_tokens_with_an_outsized_residual_are_left_out_of_the_fit(tiny):
    """max_rms_ratio drops, per layer and batch, the tokens whose residual RMS exceeds that
    multiple of the batch's median RMS at the layer."""
    _, model = tiny("gpt2")
    ids = _ids(model)
    hidden = np.concatenate([np.asarray(model(ids[i : i + 4]).hidden_lbtd) for i in (0, 4, 8)], 1)
    rms = np.sqrt((hidden[:-1].astype(np.float64) ** 2).mean(-1))
    keep = np.concatenate(
        [
            rms[:, i : i + 4] <= 1.3 * np.median(rms[:, i : i + 4], axis=(1, 2), keepdims=True)
            for i in (0, 4, 8)
        ],
        1,
    )
    assert 0 < (~keep).sum() < keep.size / 4
    bank = fit_translators(model, ids, ridge=1e-3, batch_size=4, max_rms_ratio=1.3)
    want, _ = _reference(hidden, model.decoder(), 1e-3, keep_lbt=keep)
    assert _relative(np.asarray(bank.kernel_ldd, np.float64) + np.eye(model.d_model), want) < 1e-5


def test_a_zero_norm_scale_leaves_that_coordinate_to_the_logit_lens(tiny):
    """A coordinate the final norm multiplies by 0 never reaches the logits and cannot be read
    back: its kernel column is 0 (the translator passes it through); the others are unchanged."""
    _, model = tiny("llama")
    params = jax.tree.map(lambda x: x, model.params)
    norm = params["model"]["norm"]
    norm["weight"] = norm["weight"].at[3].set(0.0)
    ids = _ids(model)
    bank = fit_translators(model, ids, ridge=1e-3, batch_size=4, model_params=params)
    decoder = model.decoder(params)
    want, _ = _reference(model.apply(params, ids).hidden_lbtd, decoder, 1e-3)
    got = np.asarray(bank.kernel_ldd, np.float64) + np.eye(model.d_model)
    assert np.array_equal(got[:, :, 3], np.broadcast_to(np.eye(model.d_model)[:, 3], got.shape[:2]))
    keep = np.arange(model.d_model) != 3
    assert _relative(got[:, :, keep], want[:, :, keep]) < 1e-5


def _orthogonal(rng, d):
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


@pytest.mark.parametrize("norm_kind", ["layernorm", "rmsnorm", "gemma_rmsnorm"])
def test_an_exact_linear_map_is_recovered(norm_kind):
    """Noiseless data where each layer's unit-RMS residual maps exactly onto the final residual
    direction, decoded through the norm's own scale (and LayerNorm's bias): λ -> 0 recovers it.

    RMS norms: residual_l = s·final Qᵀ (Q orthogonal, s a per-token scale), so x Q = y.
    LayerNorm: final centred, Q orthogonal with Q 1 = 1, and residual_l = s·(final Qᵀ + a·rms·1)
    (a constant share along 1, which LayerNorm removes), so x (sqrt(1 + a²) Q C) = y with C the
    centring projector.
    """
    rng = np.random.default_rng(0)
    num_layers, tokens, d, a = 2, 300, 16, 0.7
    centre = np.eye(d) - np.ones((d, d)) / d
    final = rng.normal(size=(tokens, d)) * np.exp(rng.normal(size=(tokens, 1)))
    if norm_kind == "layernorm":
        final = final @ centre
        basis = np.linalg.svd(centre)[0][:, : d - 1]  # orthonormal basis of 1-perp
    rms = np.sqrt((final**2).mean(-1, keepdims=True))
    hidden, maps = [], []
    for _ in range(num_layers):
        scale = np.exp(rng.normal(size=(tokens, 1)))
        if norm_kind == "layernorm":
            q = basis @ _orthogonal(rng, d - 1) @ basis.T + np.ones((d, d)) / d
            hidden.append(scale * (final @ q.T + a * rms))
            maps.append(np.sqrt(1 + a**2) * q @ centre)
        else:
            q = _orthogonal(rng, d)
            hidden.append(scale * final @ q.T)
            maps.append(q)
    decoder = Decoder(
        unembed_vd=jnp.zeros((5, d)),
        unembed_bias_v=None,
        norm_scale_d=jnp.asarray(rng.normal(size=d) + 1.5, jnp.float32),
        norm_bias_d=(
            jnp.asarray(rng.normal(size=d), jnp.float32) if norm_kind == "layernorm" else None
        ),
        norm_kind=norm_kind,
        eps=1e-12,
    )
    h_lbtd = jnp.asarray(np.stack(hidden)[:, None], jnp.float32)
    x_lbtd, rms_lbt = unit_inputs(h_lbtd, norm_kind)
    y_btd = targets(decoder, decoder.final_norm(jnp.asarray(final[None], jnp.float32)))
    stats = batch_statistics(x_lbtd, y_btd, rms_lbt, jnp.ones_like(rms_lbt))
    bank = solve(Accumulator.zeros(num_layers, d).add(stats), ridge=1e-12)
    for layer, want in enumerate(maps):
        got = np.asarray(bank.kernel_ldd[layer], np.float64) + np.eye(d)
        assert _relative(got, want) < 1e-5


def test_a_large_ridge_pulls_towards_zero_or_towards_the_identity():
    """||M||² shrinks the map to 0 (kernel -I, a lens that erases the layer); with
    towards_identity, ||M - I||² shrinks the translator to the logit lens (kernel 0)."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 1, 64, 8)), jnp.float32)
    stats = batch_statistics(x, 2 * x[0], jnp.ones(x.shape[:-1]), jnp.ones(x.shape[:-1]))
    np.testing.assert_allclose(solve(stats, ridge=1e8).kernel_ldd[0], -np.eye(8), atol=1e-6)
    np.testing.assert_allclose(
        solve(stats, ridge=1e8, towards_identity=True).kernel_ldd[0], 0, atol=1e-6
    )
    np.testing.assert_allclose(solve(stats, ridge=1e-9).kernel_ldd[0], np.eye(8), atol=1e-5)


def test_the_compensated_sum_is_exact_where_float32_addition_is_not():
    big, small, count = 1e4, 1e-3, 2000
    values = [big] + [small] * count
    acc = Accumulator.zeros(1, 1)
    naive = jnp.float32(0)
    add = jax.jit(lambda a, v: a.add(jax.tree.map(lambda z: z + v, Statistics.zeros(1, 1))))
    for v in values:
        acc = add(acc, jnp.float32(v))
        naive = naive + jnp.float32(v)
    exact = big + small * count
    assert abs(float(acc.value().count_l[0]) - exact) < 1e-7 * exact
    assert abs(float(naive) - exact) > 2e-6 * exact  # plain float32 addition: 4.7e-6 off


def test_batch_order_does_not_change_the_fit(tiny):
    _, model = tiny("gpt2")
    ids = _ids(model, n=16)
    order = np.random.default_rng(1).permutation(len(ids))
    a = fit_translators(model, ids, ridge=1e-4, batch_size=2).kernel_ldd
    b = fit_translators(model, ids[order], ridge=1e-4, batch_size=3).kernel_ldd
    eye = np.eye(model.d_model)
    assert _relative(np.asarray(b) + eye, np.asarray(a, np.float64) + eye) < 1e-5


def test_the_float32_fallback_agrees_with_float64(tiny):
    """Backends without float64 (TPU) sum in compensated float32; on a tiny, well-conditioned
    model that agrees with the float64 sums (real models are worse: bench/closed_form_measure)."""
    _, model = tiny("llama")
    ids = _ids(model)
    want = np.asarray(fit_translators(model, ids, ridge=1e-3, dtype=jnp.float64).kernel_ldd)
    acc = accumulate_statistics(model, ids, batch_size=4, dtype=jnp.float32)
    assert acc.compensation is not None and acc.dtype == jnp.float32
    got = solve(acc, ridge=1e-3).kernel_ldd
    eye = np.eye(model.d_model)
    assert _relative(np.asarray(got) + eye, want + eye) < 2e-5


_MESHES = """
import sys
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, PartitionSpec as P
from jaxlens.closed_form import accumulate_statistics, fit_translators
from jaxlens.models import load_model
from jaxlens.sharding import make_mesh

assert jax.device_count() == 8
model = load_model(sys.argv[1])
ids = np.random.default_rng(0).integers(0, model.vocab_size, size=(13, 16))
one = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"),
           axis_types=(AxisType.Auto,) * 2)
want = np.asarray(fit_translators(model, ids, ridge=1e-3, batch_size=4, mesh=one).kernel_ldd)
acc = accumulate_statistics(model, ids, batch_size=4, mesh=make_mesh(4, 2))
assert acc.total.xx_lde.sharding.spec == P(None, None, "model"), acc.total.xx_lde.sharding
assert acc.dtype == np.float64
assert len(acc.total.xx_lde.addressable_shards) == 8
for data, size in ((8, 1), (4, 2), (1, 8)):
    got = fit_translators(model, ids, ridge=1e-3, batch_size=4, mesh=make_mesh(data, size))
    err = np.abs(np.asarray(got.kernel_ldd) - want).max() / np.abs(want + np.eye(32)).max()
    assert err < 1e-5, (data, size, err)
print("ok")
"""


def test_eight_devices_give_the_one_device_fit(tiny):
    """8 simulated CPU devices (data x model = 8x1, 4x2, 1x8; 13 sequences, so padding rows)."""
    directory, _ = tiny("llama")
    out = subprocess.run(
        [sys.executable, "-c", _MESHES, str(directory)],
        env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok")


# Refusals ------------------------------------------------------------------------------------


def test_ridge_zero_with_fewer_tokens_than_d_is_refused(tiny):
    _, model = tiny("llama")
    with pytest.raises(ValueError, match=r"ridge=0 with 16 tokens .* Raise the ridge"):
        fit_translators(model, _ids(model, n=1), ridge=0.0)


def test_ridge_zero_on_rank_deficient_statistics_is_refused():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 1, 50, 8))
    x[..., 5] = 0.0  # a direction no token ever takes
    x = jnp.asarray(x, jnp.float32)
    stats = batch_statistics(x, x[0], jnp.ones(x.shape[:-1]), jnp.ones(x.shape[:-1]))
    with pytest.raises(ValueError, match="layer 0 is .*singular.*Raise the ridge"):
        solve(stats, ridge=0.0)
    assert np.isfinite(np.asarray(solve(stats, ridge=1e-3).kernel_ldd)).all()


def test_non_finite_statistics_are_refused(tiny):
    """A NaN embedding row makes every layer's statistics NaN: refused, naming the layer."""
    _, model = tiny("llama")
    params = jax.tree.map(lambda x: x, model.params)
    embed = params["model"]["embed_tokens"]
    embed["embedding"] = embed["embedding"].at[5].set(jnp.nan)
    ids = _ids(model)
    ids[0, 3] = 5
    with pytest.raises(ValueError, match="layer 0 are not finite.*dtype"):
        fit_translators(model, ids, ridge=1e-3, model_params=params)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ridge=-1e-3), "ridge=-0.001; it must be a finite number >= 0"),
        (dict(ridge=float("nan")), "ridge=nan"),
        (dict(skip_positions=16), "skip_positions=16 leaves no token"),
        (dict(batch_size=0), "batch_size=0"),
        (dict(fit_bias=True, bias=False), "fit_bias=True needs bias=True"),
    ],
)
def test_bad_arguments_are_refused(tiny, kwargs, message):
    _, model = tiny("llama")
    with pytest.raises(ValueError, match=message):
        fit_translators(model, _ids(model), **{"ridge": 1e-3, **kwargs})


def test_token_ids_outside_the_vocabulary_are_refused(tiny):
    _, model = tiny("llama")
    ids = _ids(model)
    ids[2, 2] = model.vocab_size
    with pytest.raises(ValueError, match="Token ids must lie in"):
        fit_translators(model, ids, ridge=1e-3)


def test_the_compensated_pair_reaches_the_solve_unrounded():
    """Many float32 batch sums of tokens with a large mean offset: the pair holds their float64
    total to far below float32's rounding, and the solve (condition ~1e5 from the offset) turns a
    float32 rounding of the total (6e-8 relative) into ~1e-3 of the map. Reference: the same
    float32 batch sums added and solved in float64 numpy."""
    rng = np.random.default_rng(0)
    d, tokens, num_batches, offset = 8, 64, 40, 100.0
    true_m = rng.normal(size=(d, d))
    acc = Accumulator.zeros(1, d)
    add = jax.jit(lambda a, s: a.add(s))
    want = None
    for _ in range(num_batches):
        x = offset + rng.normal(size=(tokens, d))
        y = x @ true_m + rng.normal(size=(tokens, d))
        x_lbtd = jnp.asarray(x[None, None], jnp.float32)
        ones = jnp.ones((1, 1, tokens), jnp.float32)
        stats = batch_statistics(x_lbtd, jnp.asarray(y[None], jnp.float32), ones, ones)
        acc = add(acc, stats)
        batch = jax.tree.map(lambda a: np.asarray(a, np.float64), stats)
        want = batch if want is None else jax.tree.map(np.add, want, batch)
    want_m = np.linalg.solve(want.xx_lde[0], want.xy_lde[0])
    got = np.asarray(solve(acc, ridge=0.0).kernel_ldd[0], np.float64) + np.eye(d)
    assert _relative(got, want_m) < 1e-5
