"""Subspace removal and derangements against tuned-lens 0.2.0's own functions (1e-5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tuned_lens.causal import subspaces as tl_subspaces
from tuned_lens.causal import utils as tl_utils

from jaxlens.analysis.subspace import derange, remove_subspace, sample_derangement

D = 12


@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(0)
    h_btd = rng.normal(size=(3, 5, D)).astype(np.float32) + 0.5  # a non-zero mean
    basis_dk = rng.normal(size=(D, 3)).astype(np.float32)  # independent, not orthonormal
    return h_btd, basis_dk, np.linalg.qr(basis_dk)[0].astype(np.float32)


def reference(h_btd, basis_dk, mode, orthonormal, seed=0):
    """tuned-lens's result, and the derangement its "resample" drew (same torch seed)."""
    torch.manual_seed(seed)
    perm = tl_utils.sample_derangement(h_btd.shape[0] * h_btd.shape[1]).numpy()
    torch.manual_seed(seed)
    out = tl_subspaces.remove_subspace(
        torch.tensor(h_btd), torch.tensor(basis_dk), mode=mode, orthonormal=orthonormal
    )
    return out.numpy(), perm


@pytest.mark.parametrize("mode", ["zero", "mean", "resample"])
def test_matches_tuned_lens_with_an_orthonormal_basis(vectors, mode):
    h_btd, _, orthonormal_dk = vectors
    want, perm = reference(h_btd, orthonormal_dk, mode, orthonormal=True)
    got = remove_subspace(jnp.asarray(h_btd), jnp.asarray(orthonormal_dk), mode, derangement=perm)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["zero", "mean", "resample"])
def test_orthonormalize_matches_tuned_lens_general_projector(vectors, mode):
    h_btd, basis_dk, _ = vectors
    want, perm = reference(h_btd, basis_dk, mode, orthonormal=False, seed=3)
    got = remove_subspace(
        jnp.asarray(h_btd), jnp.asarray(basis_dk), mode, derangement=perm, orthonormalize=True
    )
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_one_direction_matches_tuned_lens(vectors):
    h_btd, _, orthonormal_dk = vectors
    want, _ = reference(h_btd, orthonormal_dk[:, 0], "mean", orthonormal=True)
    got = remove_subspace(jnp.asarray(h_btd), jnp.asarray(orthonormal_dk[:, 0]), "mean")
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_only_the_subspace_changes(vectors):
    """Zero ablation leaves nothing along the basis; every mode leaves the complement intact."""
    h_btd, _, basis_dk = vectors
    complement = np.eye(D) - basis_dk @ basis_dk.T
    for mode in ["zero", "mean", "resample"]:
        got = np.asarray(remove_subspace(h_btd, basis_dk, mode, key=jax.random.key(1)))
        np.testing.assert_allclose(got @ complement, h_btd @ complement, atol=1e-5)
        if mode == "zero":
            np.testing.assert_allclose(got @ basis_dk, 0.0, atol=1e-5)


def test_resample_with_a_key_is_jittable_and_uses_a_derangement(vectors):
    h_btd, _, basis_dk = vectors
    key = jax.random.key(7)
    ablate = jax.jit(lambda h, b, k: remove_subspace(h, b, "resample", key=k))
    got = ablate(h_btd, basis_dk, key)
    perm = sample_derangement(key, 15)
    want = remove_subspace(h_btd, basis_dk, "resample", derangement=perm)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_derangements_have_no_fixed_point_and_vary_with_the_key():
    sample = jax.jit(jax.vmap(sample_derangement, in_axes=(0, None)), static_argnums=1)
    perms = np.asarray(sample(jax.random.split(jax.random.key(0), 200), 6))
    assert (np.sort(perms, axis=1) == np.arange(6)).all()  # permutations
    assert not (perms == np.arange(6)).any()  # no fixed point
    assert len({tuple(p) for p in perms}) > 100  # 265 derangements of 6 exist
    np.testing.assert_array_equal(sample_derangement(jax.random.key(5), 2), [1, 0])
    rows = np.arange(8.0)[:, None] * np.ones((1, 3))
    assert not (np.asarray(derange(jax.random.key(2), rows)) == rows).all(axis=1).any()


def test_bad_input_is_refused(vectors):
    h_btd, basis_dk, _ = vectors
    with pytest.raises(ValueError, match="at least 2 items"):
        sample_derangement(jax.random.key(0), 1)
    with pytest.raises(ValueError, match=f"are {D} wide"):
        remove_subspace(h_btd, basis_dk[:-1], "zero")
    with pytest.raises(ValueError, match="at most 12 columns"):
        remove_subspace(h_btd, np.ones((D, D + 1), np.float32), "zero")
    with pytest.raises(ValueError, match="Unknown ablation mode"):
        remove_subspace(h_btd, basis_dk, "shuffle")
    with pytest.raises(ValueError, match="at least 2 vectors"):
        remove_subspace(h_btd[:1, :1], basis_dk, "mean")
    with pytest.raises(ValueError, match="exactly one of `key`"):
        remove_subspace(h_btd, basis_dk, "resample")
    with pytest.raises(ValueError, match=r"shape \(15,\)"):
        remove_subspace(h_btd, basis_dk, "resample", derangement=np.arange(1, 5))
