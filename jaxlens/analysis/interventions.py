"""Editing the residual stream inside the model's forward pass: the one intervention mechanism.

An edit replaces the output of block l, the hidden state `hidden_lbtd[l + 1]` of
`SubjectModel.apply`, by a function of it while the forward runs, so later blocks, the hidden
states they return and the logits all see the edited value (an edit of the last block acts before
the final norm). It works the same way for every family jaxlens loads, transformers' Flax classes
and jaxlens's native decoder alike: Flax's `nn.intercept_methods` catches the call of each block
module (found by its module path, `Family.blocks` + "l") and hands its output to the edit. Nothing
is mutated and no parameter is baked in, so the forward stays pure: call it inside your own
`jax.jit` with the parameters as an argument. tuned-lens does the same with PyTorch forward hooks
(`ablate_layer`, `ablate_subspace`).

Example:

    @jax.jit
    def forward(params, ids_bt):
        scale_layer_1 = lambda h_btd: 0.5 * h_btd
        return forward_with_edits(model, params, ids_bt, {1: scale_layer_1})

    edited = forward(model.params, ids_bt)  # a `Forward`, like `model.apply(params, ids_bt)`

A `BlockEdit` also receives the block's input, which `ablation.ablate_layer` needs to tell the
block's own contribution from the stream it was added to.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import NamedTuple

import flax.linen as nn
import jax

from jaxlens.models.subject import Forward, SubjectModel

Edit = Callable[[jax.Array], jax.Array]
"""`edit(h_btd) -> h_btd`: the new output of a block, from its output `[batch, tokens, d]`."""


class BlockEdit(NamedTuple):
    """An edit that also reads the block's input (the residual stream the block adds to).

    Attributes:
      fn: `fn(h_in_btd, h_out_btd) -> h_btd`, the block's new output from its input and output.
    """

    fn: Callable[[jax.Array, jax.Array], jax.Array]


def forward_with_edits(
    model: SubjectModel, params, input_ids_bt: jax.Array, edits: Mapping[int, Edit | BlockEdit]
) -> Forward:
    """`model.apply(params, input_ids_bt)` with the outputs of some blocks edited.

    Args:
      model: the subject model (its family says where the blocks are).
      params: its parameter tree (an argument, so this runs inside your own `jax.jit`).
      input_ids_bt: int token ids `[batch, tokens]`.
      edits: layer index l (0 .. L-1) -> an `Edit` of block l's output, or a `BlockEdit`, which
        also receives the block's input (`hidden_lbtd[l]` of the edited run).
    Returns:
      the `Forward` of the edited run: `hidden_lbtd[l + 1]` is the edited output of block l (the
      last entry final-normed as always), and later layers and the logits follow from it.
    """
    edits = check_layers(model, edits)
    blocks = model.family.blocks
    applied = set()

    def intercept(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or context.module.path[:-1] != blocks:
            return next_fun(*args, **kwargs)
        layer = int(context.module.path[-1])
        out = next_fun(*args, **kwargs)
        if layer not in edits:
            return out
        # transformers' blocks return a tuple whose first entry is the stream; native ones, it.
        h_out_btd = out[0] if isinstance(out, tuple) else out
        edit = edits[layer]
        if isinstance(edit, BlockEdit):
            h_btd = edit.fn(args[0] if args else kwargs["hidden_states"], h_out_btd)
        else:
            h_btd = edit(h_out_btd)
        if h_btd.shape != h_out_btd.shape:
            raise ValueError(
                f"The edit of layer {layer} returned shape {h_btd.shape}; it must return the "
                f"block's output shape {h_out_btd.shape}."
            )
        applied.add(layer)
        h_btd = h_btd.astype(h_out_btd.dtype)
        return (h_btd, *out[1:]) if isinstance(out, tuple) else h_btd

    with nn.intercept_methods(intercept):
        forward = model.apply(params, input_ids_bt)
    # A family whose blocks sit elsewhere would silently run unedited: refuse instead.
    if applied != set(edits):
        missing = sorted(set(edits) - applied)
        raise RuntimeError(
            f"No block of this {model.model_type} model was found at layers {missing} "
            f"(expected modules at {'/'.join(blocks)}/<layer>); its Family.blocks is wrong."
        )
    return forward


def check_layers(model: SubjectModel, edits: Mapping) -> dict:
    """`edits` with its keys checked by `check_layer` (as ints)."""
    return {check_layer(model, layer): edit for layer, edit in edits.items()}


def check_layer(model: SubjectModel, layer) -> int:
    """`layer` as an int, or a ValueError if it is not a block index 0 .. L-1 of `model`."""
    index = operator.index(layer)
    if not 0 <= index < model.num_layers:
        raise ValueError(
            f"Layer {layer} is out of range for a model with {model.num_layers} blocks; "
            f"use layer indices 0 .. {model.num_layers - 1}."
        )
    return index
