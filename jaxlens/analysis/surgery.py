"""Layer surgery: the model run with some of its blocks deleted, permuted or replaced.

tuned-lens's `model_surgery` swaps the PyTorch `ModuleList` of blocks inside a context manager.
Here nothing is mutated: surgery builds a new `SubjectModel` whose blocks 0 .. L'-1 are blocks
`order[0], order[1], ...` of the original, by re-indexing the parameter tree (`Family.blocks`) and
whatever the family keeps per layer: the native decoder's `LayerSpec`s (sliding windows, rotary
embeddings, MLP kinds) and GPT-Neo's `attention_layers` (local or global attention), so a block
keeps its own behaviour wherever it moves, as a moved PyTorch module does. The new model has
L' = len(order) layers and its own `apply`, `decoder()` and facts; a lens for it needs L'
translators. Blocks used twice share their arrays.

Example:

    shallow = delete_layers(model, [1])          # L - 1 blocks
    swapped = permute_layers(model, [1, 0, 2])   # blocks 0 and 1 exchanged
    logits_btv = shallow(ids_bt).logits_btv
    # Inside your own jit, re-index the parameters you pass (same layout as `swapped.params`):
    forward = jax.jit(lambda p, ids: swapped.apply(reorder_params(model, p, [1, 0, 2]), ids))
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import operator
from collections.abc import Mapping, Sequence

import jax

from jaxlens.analysis.interventions import check_layer
from jaxlens.models import native
from jaxlens.models.subject import SubjectModel

# transformers config attributes that hold one entry per layer (they move with their layer).
PER_LAYER_CONFIG = ("attention_layers", "layer_types", "no_rope_layers")


def select_layers(model: SubjectModel, order: Sequence[int]) -> SubjectModel:
    """A model whose block p is block `order[p]` of `model` (indices may repeat or be left out).

    Args:
      model: the subject model.
      order: block indices in 0 .. L-1, at least one.
    Returns:
      a `SubjectModel` with `len(order)` blocks and re-indexed parameters.
    """
    order = _check_order(model, order)
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(order)
    for name in PER_LAYER_CONFIG:
        values = getattr(config, name, None)
        if isinstance(values, list | tuple) and len(values) == model.num_layers:
            setattr(config, name, [values[i] for i in order])
    if isinstance(model.flax_model, native.NativeDecoderLM):
        spec = model.flax_model.spec
        spec = dataclasses.replace(spec, layers=tuple(spec.layers[i] for i in order))
        flax_model = native.NativeDecoderLM(config, model.dtype, spec=spec)
    else:
        flax_model = SubjectModel.flax_model_for(config, model.dtype)
    return _rebuilt(model, config, reorder_params(model, model.params, order), flax_model)


def delete_layers(model: SubjectModel, indices: Sequence[int]) -> SubjectModel:
    """The model without the blocks at `indices` (each at most once; at least one block kept)."""
    indices = [check_layer(model, i) for i in indices]
    if len(set(indices)) != len(indices):
        raise ValueError(f"Layer indices to delete repeat ({indices}); name each layer once.")
    if len(indices) == model.num_layers:
        raise ValueError(
            f"Deleting all {model.num_layers} blocks leaves no model; keep at least one block."
        )
    return select_layers(model, [i for i in range(model.num_layers) if i not in indices])


def permute_layers(model: SubjectModel, indices: Sequence[int]) -> SubjectModel:
    """The model running blocks `indices` in that order; as tuned-lens's `permute_layers`,
    `indices` may be shorter or longer than L (blocks dropped or run twice)."""
    return select_layers(model, indices)


def replace_layers(model: SubjectModel, replacements: Mapping[int, dict]) -> SubjectModel:
    """The model with the parameters of some blocks replaced.

    Args:
      model: the subject model.
      replacements: layer index -> a block's parameter tree, shaped like that block's own (e.g.
        `other.params["transformer"]["h"]["1"]` from a model of the same family and sizes). The
        block keeps its position's per-layer behaviour (window, rotary); to run another block of
        the same model in its place, use `permute_layers`.
    Returns:
      a `SubjectModel` with the same blocks, the replaced ones with the new parameters.
    """
    blocks = dict(_at(model.params, model.family.blocks))
    for layer, block_params in replacements.items():
        key = str(check_layer(model, layer))
        want = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), blocks[key])
        got = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), block_params)
        if got != want:
            raise ValueError(
                f"The replacement for layer {layer} does not have the block's parameter tree "
                f"(names, shapes and dtypes); pass a block of a model of this family and size."
            )
        blocks[key] = block_params
    params = _with_subtree(model.params, model.family.blocks, blocks)
    return _rebuilt(model, model.config, params, model.flax_model)


def reorder_params(model: SubjectModel, params, order: Sequence[int]):
    """`params` (in `model`'s layout) re-indexed for `select_layers(model, order)`. Pure, so it
    can run inside `jax.jit` on parameters passed as an argument."""
    order = _check_order(model, order)
    blocks = _at(params, model.family.blocks)
    return _with_subtree(
        params, model.family.blocks, {str(p): blocks[str(i)] for p, i in enumerate(order)}
    )


def _rebuilt(model: SubjectModel, config, params, flax_model) -> SubjectModel:
    return SubjectModel(
        config,
        params,
        dtype=model.dtype,
        tokenizer=model.tokenizer,
        name_or_path=model.name_or_path,
        revision=model.revision,
        flax_model=flax_model,
    )


def _check_order(model: SubjectModel, order: Sequence[int]) -> list[int]:
    order = [check_layer(model, i) for i in order]
    if not order:
        raise ValueError("The layer order is empty; keep at least one block.")
    return order


def _at(tree, path):
    return functools.reduce(operator.getitem, path, tree)


def _with_subtree(tree, path, subtree):
    """A copy of the nested dict `tree` with `tree[path[0]]...[path[-1]]` set to `subtree`."""
    if not path:
        return subtree
    head, *rest = path
    return {**tree, head: _with_subtree(tree[head], rest, subtree)}
