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
