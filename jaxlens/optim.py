"""The tuned-lens optimizer recipe in optax.

Default (tuned-lens's documented recipe): SGD with Nesterov momentum 0.9, learning rate
`lr_scale * (1 - momentum)`, coupled weight decay 1e-3 on every translator parameter, global
gradient-norm clipping at 1.0, and a linear decay to zero over the run with no warmup.

Why `(1 - momentum)`: PyTorch's (and optax's) momentum accumulates `g + m * buf`, which at steady
state scales the step by `1 / (1 - m)`; multiplying the learning rate by `1 - m` undoes that, and
with it the best `lr_scale` is about 1.

Adam option: AMSGrad with betas (momentum, 0.999), lr `lr_scale * 1e-3`, and a warmup of
min(1000, num_steps // 5) steps that really applies (tuned-lens means to warm up Adam, but compares
an enum with a string, so its warmup is silently zero).

Muon option (optax.contrib): the kernels' updates are orthogonalised per layer (Newton-Schulz on
each `[d, d]` slice of the bank, the layer axis a batch axis), lr `lr_scale * 0.02` with Nesterov
momentum `momentum`; the biases take Adam at `lr_scale * 1e-3`. Weight decay is Muon's own,
decoupled (`W -= lr * decay * W`), which in the residual form again pulls towards the identity.
Same warmup default as Adam.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxlens.lens import Translators


class ClipState(NamedTuple):
    pass


def clip_by_global_norm_like_torch(max_norm: float) -> optax.GradientTransformation:
    """Scales gradients by `min(1, max_norm / (norm + 1e-6))`, as `torch.nn.utils.clip_grad_norm_`.

    optax's own clip divides by the norm exactly; the 1e-6 matters for parity with tuned-lens
    only when the norm is tiny, but costs nothing.
    """

    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree.map(lambda g: g * scale, updates), state

    return optax.GradientTransformation(lambda _: ClipState(), update)


def learning_rate_schedule(peak: float, num_steps: int, warmup_steps: int = 0) -> optax.Schedule:
    """Linear warmup from 0 over `warmup_steps`, then linear decay to 0 at `num_steps`."""
    decay = optax.linear_schedule(peak, 0.0, max(num_steps - warmup_steps, 1))
    if warmup_steps <= 0:
        return decay
    warmup = optax.linear_schedule(0.0, peak, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def make_optimizer(
    *,
    num_steps: int,
    optimizer: str = "sgd",
    lr_scale: float = 1.0,
    momentum: float = 0.9,
    weight_decay: float = 1e-3,
    clip_norm: float = 1.0,
    warmup_steps: int | None = None,
    bias_only: bool = False,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer for a translator bank, and its learning-rate schedule.

    Args:
      num_steps: optimizer steps in the run (the schedule reaches 0 there).
      optimizer: "sgd" (Nesterov), "adam" (AMSGrad) or "muon".
      lr_scale: multiplies the default learning rate (1 - momentum for SGD, 1e-3 for Adam, 0.02
        for Muon's kernels).
      momentum: SGD momentum, or Adam's beta1.
      weight_decay: coupled (L2-in-gradient) decay, as PyTorch's SGD/Adam `weight_decay`; in the
        residual parametrisation it pulls each translator towards the identity.
      clip_norm: global gradient-norm clip (0 disables).
      warmup_steps: None for the default (0 for SGD, min(1000, num_steps // 5) otherwise).
      bias_only: train only the biases; the kernels are frozen (no decay either).
    """
    if optimizer == "sgd":
        peak = lr_scale * (1 - momentum)
        warmup = 0 if warmup_steps is None else warmup_steps
        schedule = learning_rate_schedule(peak, num_steps, warmup)
        core = optax.trace(decay=momentum, nesterov=True)
    elif optimizer == "adam":
        peak = lr_scale * 1e-3
        warmup = min(1000, num_steps // 5) if warmup_steps is None else warmup_steps
        schedule = learning_rate_schedule(peak, num_steps, warmup)
        core = optax.scale_by_amsgrad(b1=momentum, b2=0.999, eps=1e-8)
    elif optimizer == "muon":
        peak = lr_scale * 0.02
        warmup = min(1000, num_steps // 5) if warmup_steps is None else warmup_steps
        schedule = learning_rate_schedule(peak, num_steps, warmup)
        bias_schedule = learning_rate_schedule(lr_scale * 1e-3, num_steps, warmup)
        muon = optax.contrib.muon(
            schedule,
            beta=momentum,
            weight_decay=weight_decay,
            adam_learning_rate=bias_schedule,
            # Each layer's [d_in, d_out] kernel is one matrix; the biases go to Adam.
            muon_weight_dimension_numbers=Translators(
                kernel_ldd=optax.contrib.MuonDimensionNumbers(1, 2), bias_ld=None
            ),
        )
        parts = [clip_by_global_norm_like_torch(clip_norm)] if clip_norm else []
        return _only_biases(optax.chain(*parts, muon), bias_only), schedule
    else:
        raise ValueError(f"optimizer must be 'sgd', 'adam' or 'muon'; got {optimizer!r}.")
    parts = [clip_by_global_norm_like_torch(clip_norm)] if clip_norm else []
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts += [core, optax.scale_by_learning_rate(schedule)]
    return _only_biases(optax.chain(*parts), bias_only), schedule


def _only_biases(tx: optax.GradientTransformation, bias_only: bool):
    """`tx` on the biases alone, the kernels frozen, when `bias_only`; else `tx`."""
    if not bias_only:
        return tx
    labels = Translators(kernel_ldd="frozen", bias_ld="train")
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def optimizer_from_config(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`make_optimizer` with the fields of a training config (see configs/base.py)."""
    return make_optimizer(
        num_steps=config.num_steps,
        optimizer=config.optimizer,
        lr_scale=config.lr_scale,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        clip_norm=config.clip_norm,
        warmup_steps=None if config.warmup_steps < 0 else config.warmup_steps,
        bias_only=config.bias_only,
    )
