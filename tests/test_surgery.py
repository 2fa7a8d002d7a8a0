"""Layer surgery against tuned-lens 0.2.0's `model_surgery` on the same PyTorch weights."""

import jax
import numpy as np
import pytest
import tiny_models
import torch
from tuned_lens import model_surgery

from jaxlens.analysis import surgery
from jaxlens.models import load_model

TOL = 1e-5  # float32 against float32


def _assert_matches(model, torch_model, ids):
    with torch.no_grad():
        want = torch_model(torch.tensor(ids), output_hidden_states=True, use_cache=False)
    got = model(ids)
    assert got.hidden_lbtd.shape[0] == len(want.hidden_states) == model.num_layers + 1
    for layer, expected in enumerate(want.hidden_states):
        np.testing.assert_allclose(
            got.hidden_lbtd[layer], expected.numpy(), atol=TOL, rtol=TOL, err_msg=f"layer {layer}"
        )
    np.testing.assert_allclose(got.logits_btv, want.logits.numpy(), atol=TOL, rtol=TOL)


@pytest.mark.parametrize(
    "family,kind,indices",
    [
        ("gpt2", "delete", [1]),
        ("gpt2", "permute", [2, 0, 1]),
        ("gpt_neox", "delete", [0, 2]),
        ("gpt_neox", "permute", [2, 0]),  # shorter than L: layer 1 dropped
    ],
)
def test_deleted_or_permuted_layers_match_tuned_lens(request, family, kind, indices):
    torch_model, model, ids = request.getfixturevalue(family)
    operated = getattr(surgery, f"{kind}_layers")(model, indices)
    with getattr(model_surgery, f"{kind}_layers")(torch_model, indices):
        _assert_matches(operated, torch_model, ids)


def test_replaced_layers_match_tuned_lens(gpt2):
    torch_model, model, ids = gpt2
    operated = surgery.replace_layers(model, {1: model.params["transformer"]["h"]["0"]})
    with model_surgery.replace_layers(torch_model, [1], [torch_model.transformer.h[0]]):
        _assert_matches(operated, torch_model, ids)
    assert operated.params["transformer"]["h"]["2"] is model.params["transformer"]["h"]["2"]


def test_a_moved_block_keeps_its_own_attention_window(tmp_path):
    """GPT-Neo's local block (layer 1, window 4) and OLMo-3's full-attention block (layer 1,
    between sliding ones) moved to the front; the PyTorch reference moves the modules, as
    tuned-lens does (it refuses OLMo-3 itself, so we swap the ModuleList by hand there)."""
    ids = np.random.default_rng(2).integers(0, tiny_models.VOCAB, size=(2, 9)).astype(np.int32)
    order = [1, 0, 2]
    for family in ("gpt_neo", "olmo3"):
        torch_model = tiny_models.build(family, seed=5)
        model = load_model(tiny_models.save(torch_model, tmp_path / family))
        operated = surgery.permute_layers(model, order)
        if family == "gpt_neo":
            with model_surgery.permute_layers(torch_model, order):
                _assert_matches(operated, torch_model, ids)
        else:
            layers = torch_model.model.layers
            torch_model.model.layers = torch.nn.ModuleList([layers[i] for i in order])
            _assert_matches(operated, torch_model, ids)


def test_reordered_parameters_run_inside_jit(gpt2):
    """`reorder_params` re-indexes a parameter tree passed to the jitted forward."""
    _, model, ids = gpt2
    order = [2, 2, 0]
    operated = surgery.permute_layers(model, order)

    @jax.jit
    def forward(params, ids):
        return operated.apply(surgery.reorder_params(model, params, order), ids).logits_btv

    other = jax.tree_util.tree_map(lambda x: 0.9 * x, model.params)
    blocks = other["transformer"]["h"]
    by_hand = {"transformer": {**other["transformer"], "h": {"0": blocks["2"], "1": blocks["2"]}}}
    by_hand["transformer"]["h"]["2"] = blocks["0"]
    want = jax.jit(operated.apply)(by_hand, ids).logits_btv
    np.testing.assert_allclose(forward(other, ids), want, atol=TOL, rtol=TOL)


def test_bad_surgery_is_refused(gpt2):
    _, model, _ = gpt2
    out_of_range = "Layer 3 is out of range for a model with 3 blocks; use layer indices 0 .. 2"
    with pytest.raises(ValueError, match=out_of_range):
        surgery.delete_layers(model, [3])
    with pytest.raises(ValueError, match="Layer -1 is out of range"):
        surgery.permute_layers(model, [0, -1])
    with pytest.raises(ValueError, match=out_of_range):
        surgery.replace_layers(model, {3: model.params["transformer"]["h"]["0"]})
    with pytest.raises(ValueError, match="The layer order is empty; keep at least one block"):
        surgery.permute_layers(model, [])
    with pytest.raises(ValueError, match=r"repeat \(\[1, 1\]\); name each layer once"):
        surgery.delete_layers(model, [1, 1])
    with pytest.raises(ValueError, match="Deleting all 3 blocks leaves no model"):
        surgery.delete_layers(model, [0, 1, 2])
    not_a_block = model.params["transformer"]["ln_f"]
    with pytest.raises(ValueError, match="replacement for layer 1 does not have the block's"):
        surgery.replace_layers(model, {1: not_a_block})
