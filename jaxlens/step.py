"""The training step: frozen model forward, all translators' losses, one optax update.

`make_train_step` returns a pure `step(state, model_params, input_ids_bt) -> (state, metrics)`
for `jax.jit`. The model is never differentiated: gradients are taken with respect to the
translator bank only, after the forward pass. When a step's tokens do not fit at once, the batch
is split into `micro_batches` and gradients are accumulated inside the same jitted function
(`lax.scan`), which gives the same update as one big batch. Per-layer losses stay on device in
`metrics`; the caller fetches them only at log steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxlens.lens import Translators
from jaxlens.losses import layer_losses
from jaxlens.models import SubjectModel


@struct.dataclass
class TrainState:
    """Everything that changes during training (and is checkpointed)."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    translators: Translators
    opt_state: optax.OptState

    @classmethod
    def create(cls, translators: Translators, optimizer: optax.GradientTransformation):
        return cls(jnp.zeros((), jnp.int32), translators, optimizer.init(translators))

    def checkpoint_items(self) -> dict:
        """The state as checkpoint items: the lens apart from the optimizer, so that reading a
        lens back needs no optimizer (`checkpointing.ITEMS`)."""
        return {
            "translators": self.translators,
            "optim": {"step": self.step, "opt": self.opt_state},
        }

    @classmethod
    def from_checkpoint_items(cls, items: dict) -> TrainState:
        return cls(items["optim"]["step"], items["translators"], items["optim"]["opt"])


def make_train_step(
    model: SubjectModel,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    loss: str = "kl",
    token_shift: int | None = None,
    chunk_tokens: int = 2048,
    micro_batches: int = 1,
):
    """Builds the (unjitted) train step.

    Args:
      model: the subject model (its `apply` is used; parameters come in as an argument).
      optimizer, schedule: from `optim.make_optimizer`.
      loss, token_shift, chunk_tokens: see `losses.layer_losses`.
      micro_batches: split each batch into this many micro-batches (gradient accumulation).
    Returns:
      `step(state, model_params, input_ids_bt) -> (state, metrics)` with metrics
      `{"loss_l": [L] nats, "grad_norm": scalar, "learning_rate": scalar}`.
    """

    def grads_and_losses(translators, model_params, ids_bt):
        hidden_lbtd = model.apply(model_params, ids_bt).hidden_lbtd
        decoder = model.decoder(model_params)

        def objective(translators):
            loss_l = layer_losses(
                decoder,
                translators,
                hidden_lbtd[:-1],
                hidden_lbtd[-1],
                ids_bt,
                loss=loss,
                token_shift=token_shift,
                chunk_tokens=chunk_tokens,
            )
            # Summed over layers: layer l's term depends only on translator l.
            return loss_l.sum(), loss_l

        (_, loss_l), grads = jax.value_and_grad(objective, has_aux=True)(translators)
        return grads, loss_l

    def step(state: TrainState, model_params, input_ids_bt):
        if micro_batches == 1:
            grads, loss_l = grads_and_losses(state.translators, model_params, input_ids_bt)
        else:
            batch, tokens = input_ids_bt.shape
            # Row r goes to micro-batch r % M, so each keeps its share of every data shard.
            ids_mbt = input_ids_bt.reshape(batch // micro_batches, micro_batches, tokens)
            ids_mbt = ids_mbt.swapaxes(0, 1)

            def accumulate(carry, ids_bt):
                grads, loss_l = grads_and_losses(state.translators, model_params, ids_bt)
                return jax.tree.map(jnp.add, carry, (grads, loss_l)), None

            zeros = jax.tree.map(
                jnp.zeros_like,
                (state.translators, jnp.zeros(model.num_layers, jnp.float32)),
            )
            (grads, loss_l), _ = jax.lax.scan(accumulate, zeros, ids_mbt)
            grads, loss_l = jax.tree.map(lambda x: x / micro_batches, (grads, loss_l))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.translators)
        translators = optax.apply_updates(state.translators, updates)
        metrics = {
            "loss_l": loss_l,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state.step),
        }
        return TrainState(state.step + 1, translators, opt_state), metrics

    return step
