"""The optimizer recipe: torch's gradient clipping, and an Adam warmup that really applies."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxlens.optim import clip_by_global_norm_like_torch, make_optimizer


def test_clip_equals_torch_clip_grad_norm():
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=(3, 4)).astype(np.float32) * 2, rng.normal(size=5).astype(np.float32)]
    tensors = [torch.zeros(g.shape, requires_grad=True) for g in grads]
    for t, g in zip(tensors, grads, strict=True):
        t.grad = torch.tensor(g)
    torch.nn.utils.clip_grad_norm_(tensors, 1.0)
    clip = clip_by_global_norm_like_torch(1.0)
    clipped, _ = clip.update([jnp.asarray(g) for g in grads], clip.init(None))
    for got, t in zip(clipped, tensors, strict=True):
        np.testing.assert_allclose(got, t.grad.numpy(), rtol=1e-6)
    assert np.sqrt(sum((np.asarray(c) ** 2).sum() for c in clipped)) == pytest.approx(1.0, 1e-5)


def test_adam_warmup_really_applies():
    _, schedule = make_optimizer(num_steps=100, optimizer="adam")
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(0.5e-3)
    assert float(schedule(20)) == pytest.approx(1e-3)
    assert float(schedule(100)) == pytest.approx(0.0)


def _muon_kernel_update(grad_kernel_ldd):
    """The kernel update of one Muon step (after warmup) for a gradient of ones-bias."""
    import jax

    from jaxlens.lens import Translators

    tx, schedule = make_optimizer(num_steps=10, optimizer="muon", warmup_steps=0, clip_norm=0)
    params = Translators(jnp.zeros_like(grad_kernel_ldd), jnp.zeros(grad_kernel_ldd.shape[:2]))
    grads = Translators(grad_kernel_ldd, jnp.ones(grad_kernel_ldd.shape[:2]))
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    return np.asarray(updates.kernel_ldd), float(schedule(0))


def test_muon_orthogonalises_each_layers_kernel_on_its_own():
    rng = np.random.default_rng(3)
    grads = jnp.asarray(rng.normal(size=(3, 16, 16)) * [[[1.0]], [[50.0]], [[0.01]]], jnp.float32)
    update, lr = _muon_kernel_update(grads)
    for layer in range(3):
        # Newton-Schulz pushes every singular value towards 1 (to about 0.7..1.2), whatever the
        # gradient's scale: layers 50x and 0.01x the first get updates of the same size.
        singular = np.linalg.svd(update[layer] / lr, compute_uv=False)
        assert 0.5 < singular.min() and singular.max() < 1.5, (layer, singular)
    # The layer axis is a batch axis: changing layer 2's gradient leaves layer 0's update alone.
    other, _ = _muon_kernel_update(grads.at[2].multiply(-3.0))
    np.testing.assert_allclose(other[0], update[0], rtol=1e-6)
