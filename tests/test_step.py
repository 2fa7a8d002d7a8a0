"""The training step against a plain JAX reference and against tuned-lens's own PyTorch code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models
import torch
from tuned_lens import TunedLens as TorchTunedLens
from tuned_lens.scripts.ingredients import Optimizer as TorchOptimizerRecipe

from jaxlens.lens import TunedLens
from jaxlens.losses import layer_losses, reference_layer_losses
from jaxlens.models import load_model
from jaxlens.optim import make_optimizer
from jaxlens.step import TrainState, make_train_step


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    torch_model = tiny_models.build("gpt2", seed=11)
    model = load_model(tiny_models.save(torch_model, tmp_path_factory.mktemp("gpt2")))
    ids = np.random.default_rng(0).integers(0, model.vocab_size, size=(4, 10)).astype(np.int32)
    return torch_model, model, ids


def _translators(model, seed, scale=0.05):
    return tiny_models.random_translators(model.num_layers, model.d_model, seed=seed, scale=scale)


@pytest.fixture(scope="module")
def gptj(tmp_path_factory):
    """GPT-J: its lm_head has a bias, which enters the fused loss through `p . bias`."""
    torch_model = tiny_models.build("gptj", seed=12)
    model = load_model(tiny_models.save(torch_model, tmp_path_factory.mktemp("gptj")))
    assert model.decoder().unembed_bias_v is not None
    ids = np.random.default_rng(1).integers(0, model.vocab_size, size=(3, 9)).astype(np.int32)
    return torch_model, model, ids


@pytest.mark.parametrize(
    "family,loss,chunk",
    [
        ("gpt2", "kl", 7),
        ("gpt2", "kl", 4096),
        ("gpt2", "ce", 5),
        ("gptj", "kl", 6),
        ("gptj", "ce", 8),
    ],
)
def test_chunked_losses_and_gradients_equal_the_plain_reference(family, loss, chunk, request):
    _, model, ids = request.getfixturevalue(family)
    hidden = model(ids).hidden_lbtd
    decoder = model.decoder()

    def chunked(translators):
        lens = TunedLens(decoder=decoder, translators=translators)
        return layer_losses(lens, hidden[:-1], hidden[-1], ids, loss=loss, chunk_tokens=chunk)

    def plain(translators):
        lens = TunedLens(decoder=decoder, translators=translators)
        return reference_layer_losses(lens, hidden[:-1], hidden[-1], ids, loss=loss)

    translators = _translators(model, seed=1)
    np.testing.assert_allclose(chunked(translators), plain(translators), rtol=1e-5, atol=1e-6)
    got = jax.grad(lambda t: chunked(t).sum())(translators)
    want = jax.grad(lambda t: plain(t).sum())(translators)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def _torch_lens(torch_model, translators):
    lens = TorchTunedLens.from_model(torch_model)
    with torch.no_grad():
        for i, translator in enumerate(lens):
            translator.weight.copy_(torch.tensor(np.asarray(translators.kernel_ldd[i]).T))
            translator.bias.copy_(torch.tensor(np.asarray(translators.bias_ld[i])))
    return lens


def _torch_layer_losses(torch_model, lens, ids):
    """tuned-lens's KL loss, as its training loop computes it (float32)."""
    with torch.no_grad():  # as tuned-lens: the model is frozen, only the lens has gradients
        output = torch_model(torch.tensor(ids, dtype=torch.long), output_hidden_states=True)
    labels = output.logits.float().log_softmax(dim=-1)
    losses = []
    for i, h in enumerate(output.hidden_states[:-1]):
        logits = lens(h, idx=i)
        losses.append(torch.sum(labels.exp() * (labels - logits.log_softmax(-1)), dim=-1).mean())
    return losses


def test_layer_losses_equal_tuned_lens_own_computation(gpt2):
    torch_model, model, ids = gpt2
    translators = _translators(model, seed=2)
    hidden = model(ids).hidden_lbtd
    lens = TunedLens(decoder=model.decoder(), translators=translators)
    got = layer_losses(lens, hidden[:-1], hidden[-1], ids)
    with torch.no_grad():
        want = [
            x.item()
            for x in _torch_layer_losses(torch_model, _torch_lens(torch_model, translators), ids)
        ]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_three_default_steps_move_translators_as_tuned_lens_does(gpt2):
    torch_model, model, ids = gpt2
    num_steps = 10
    # Start away from zero so that weight decay acts from the first step.
    start = _translators(model, seed=3, scale=0.2)

    recipe = TorchOptimizerRecipe()  # tuned-lens defaults: SGD Nesterov, wd 1e-3, lr_scale 1
    torch_lens = _torch_lens(torch_model, start)
    params = list(torch_lens.parameters())
    opt = recipe.create_optim(params)
    scheduler = recipe.create_scheduler(opt, num_steps)
    for _ in range(3):
        for loss in _torch_layer_losses(torch_model, torch_lens, ids):
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        scheduler.step()

    optimizer, schedule = make_optimizer(num_steps=num_steps)
    step = jax.jit(make_train_step(model, optimizer, schedule))
    state = TrainState.create(start, optimizer)
    for _ in range(3):
        state, metrics = step(state, model.params, ids)
    for i, translator in enumerate(torch_lens):
        np.testing.assert_allclose(
            state.translators.kernel_ldd[i], translator.weight.detach().numpy().T, atol=1e-5
        )
        np.testing.assert_allclose(
            state.translators.bias_ld[i], translator.bias.detach().numpy(), atol=1e-5
        )


def test_clip_equals_torch_clip_grad_norm():
    from jaxlens.optim import clip_by_global_norm_like_torch

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


def test_micro_batches_give_the_same_update_and_the_step_traces_once(gpt2):
    _, model, ids = gpt2
    optimizer, schedule = make_optimizer(num_steps=5)
    start = TrainState.create(_translators(model, seed=4), optimizer)
    traces = []

    def counted(step_fn):
        def wrapped(*args):
            traces.append(1)
            return step_fn(*args)

        return jax.jit(wrapped)

    whole = counted(make_train_step(model, optimizer, schedule))
    split = jax.jit(make_train_step(model, optimizer, schedule, micro_batches=2))
    a, b = start, start
    for _ in range(3):
        a, metrics_a = whole(a, model.params, ids)
        b, metrics_b = split(b, model.params, ids)
    assert len(traces) == 1
    np.testing.assert_allclose(metrics_a["loss_l"], metrics_b["loss_l"], rtol=1e-5)
    for x, y in zip(jax.tree.leaves(a.translators), jax.tree.leaves(b.translators), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_bias_only_leaves_kernels_untouched(gpt2):
    _, model, ids = gpt2
    optimizer, schedule = make_optimizer(num_steps=5, bias_only=True)
    start = TrainState.create(_translators(model, seed=5), optimizer)
    state, _ = jax.jit(make_train_step(model, optimizer, schedule))(start, model.params, ids)
    np.testing.assert_array_equal(state.translators.kernel_ldd, start.translators.kernel_ldd)
    assert not np.allclose(state.translators.bias_ld, start.translators.bias_ld)


def test_adam_warmup_really_applies():
    _, schedule = make_optimizer(num_steps=100, optimizer="adam")
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(0.5e-3)
    assert float(schedule(20)) == pytest.approx(1e-3)
    assert float(schedule(100)) == pytest.approx(0.0)
