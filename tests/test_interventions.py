"""forward_with_edits: an edit inside the jitted forward against the model run block by block."""

import jax
import jax.numpy as jnp
import layer_by_layer
import numpy as np
import pytest
import tiny_models

from jaxlens.analysis.interventions import BlockEdit, forward_with_edits
from jaxlens.models.subject import SubjectModel

TOL = 1e-5  # float32 against float32


@pytest.fixture(params=["gpt2", "gpt_neox"])
def subject(request):
    """(torch model, jaxlens model, ids) of a transformers-Flax family and a native one."""
    return request.getfixturevalue(request.param)


def _assert_forward_close(got, want, tol=TOL):
    assert got.hidden_lbtd.shape == want.hidden_lbtd.shape
    for layer, (g, w) in enumerate(zip(got.hidden_lbtd, want.hidden_lbtd, strict=True)):
        np.testing.assert_allclose(g, w, atol=tol, rtol=tol, err_msg=f"hidden state {layer}")
    np.testing.assert_allclose(got.logits_btv, want.logits_btv, atol=tol, rtol=tol)


def test_edits_in_the_jitted_forward_equal_the_model_run_block_by_block(subject):
    """An `Edit` of block 1's output and a `BlockEdit` that skips the last block, together."""
    _, model, ids = subject
    shift_d = jnp.asarray(np.random.default_rng(0).normal(size=model.d_model), jnp.float32)
    last = model.num_layers - 1

    def scale_and_shift(h_btd):
        return 0.5 * h_btd + shift_d

    def skip(h_in_btd, h_out_btd):  # the block replaced by the identity
        return h_in_btd

    edits = {1: scale_and_shift, last: BlockEdit(skip)}
    forward = jax.jit(lambda params, ids: forward_with_edits(model, params, ids, edits))
    got = forward(model.params, ids)
    by_hand = {1: lambda h_in, h_out: scale_and_shift(h_out), last: skip}
    _assert_forward_close(got, layer_by_layer.forward(model, model.params, ids, by_hand))
    # The edits act where they should and propagate: earlier states untouched, logits moved, and
    # the last block's edit comes before the final norm.
    clean = model(ids)
    np.testing.assert_array_equal(got.hidden_lbtd[:2], clean.hidden_lbtd[:2])
    assert np.abs(got.hidden_lbtd[2] - clean.hidden_lbtd[2]).max() > 0.1
    assert np.abs(got.logits_btv - clean.logits_btv).max() > 0.1
    np.testing.assert_allclose(
        got.hidden_lbtd[-1], model.final_norm(got.hidden_lbtd[-2]), atol=TOL, rtol=TOL
    )


def test_parameters_are_an_argument_of_the_jitted_forward(gpt2):
    """One trace serves other parameters: nothing of `model.params` is baked in."""
    _, model, ids = gpt2
    traces = []

    def run(params, ids):
        traces.append(1)
        return forward_with_edits(model, params, ids, {0: lambda h: -h})

    forward = jax.jit(run)
    forward(model.params, ids)
    other = jax.tree_util.tree_map(lambda x: 0.9 * x, model.params)
    got = forward(other, ids)
    assert len(traces) == 1
    want = layer_by_layer.forward(model, other, ids, {0: lambda h_in, h_out: -h_out})
    _assert_forward_close(got, want)


# Every block class: transformers' (one per family) and the native decoder's (dense and MoE).
BLOCK_CLASSES = ("gpt2", "gpt_neo", "gptj", "opt", "bloom", "llama", "mistral", "gemma")
BLOCK_CLASSES += ("gpt_neox", "qwen3_moe")


@pytest.mark.parametrize("family", BLOCK_CLASSES)
def test_every_family_hands_each_edited_block_its_input_and_output(family):
    """Traced only (`jax.eval_shape`): the edits reach the blocks of every kind of block jaxlens
    runs (the native families share one `Block`; `forward_with_edits` refuses, rather than
    ignores, an edit whose block it did not find)."""
    config = tiny_models.configs()[family]
    flax_model = SubjectModel.flax_model_for(config)
    model = SubjectModel(config, flax_model.params_shape_tree, flax_model=flax_model)
    seen = []

    def record(layer):
        def edit(h_in_btd, h_out_btd):
            seen.append((layer, h_in_btd.shape, h_out_btd.shape))
            return h_out_btd

        return BlockEdit(edit)

    ids = jnp.zeros((2, 5), jnp.int32)
    edits = {0: record(0), model.num_layers - 1: record(model.num_layers - 1)}
    jax.eval_shape(lambda p: forward_with_edits(model, p, ids, edits), model.params)
    d = model.d_model
    assert seen == [(0, (2, 5, d), (2, 5, d)), (model.num_layers - 1, (2, 5, d), (2, 5, d))]


@pytest.mark.parametrize("layer", [-1, 3])
def test_a_layer_out_of_range_is_refused(gpt2, layer):
    _, model, ids = gpt2
    with pytest.raises(
        ValueError, match=rf"Layer {layer} is out of range .* 3 blocks; use .* 0 \.\. 2"
    ):
        forward_with_edits(model, model.params, ids, {layer: lambda h: h})


def test_an_edit_that_changes_the_shape_is_refused(gpt2):
    _, model, ids = gpt2
    with pytest.raises(ValueError, match=r"edit of layer 1 returned shape \(4, 10, 1\); it must"):
        jax.eval_shape(
            lambda p: forward_with_edits(model, p, ids, {1: lambda h: h[..., :1]}), model.params
        )
