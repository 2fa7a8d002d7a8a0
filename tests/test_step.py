"""The training step: tuned-lens's own optimizer loop step for step, micro-batches, bias-only."""

import jax
import numpy as np
import tiny_models
import torch
import torch_reference
from tuned_lens.scripts.ingredients import Optimizer as TorchOptimizerRecipe

from jaxlens.optim import make_optimizer
from jaxlens.step import TrainState, make_train_step


def _translators(model, seed, scale=0.05):
    return tiny_models.random_translators(model.num_layers, model.d_model, seed=seed, scale=scale)


def test_three_default_steps_move_translators_as_tuned_lens_does(gpt2):
    torch_model, model, ids = gpt2
    num_steps = 10
    # Start away from zero so that weight decay acts from the first step.
    start = _translators(model, seed=3, scale=0.2)

    recipe = TorchOptimizerRecipe()  # tuned-lens defaults: SGD Nesterov, wd 1e-3, lr_scale 1
    torch_lens = torch_reference.torch_lens(torch_model, start)
    params = list(torch_lens.parameters())
    opt = recipe.create_optim(params)
    scheduler = recipe.create_scheduler(opt, num_steps)
    for _ in range(3):
        for loss in torch_reference.torch_kl_losses(torch_model, torch_lens, ids):
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
