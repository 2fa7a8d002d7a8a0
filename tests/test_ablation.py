"""ablate_layer and ablate_subspace in the model's forward, against tuned-lens 0.2.0 (PyTorch, same
weights, same derangements) and against the model run block by block with the ablated states.

tuned-lens draws its derangements with `torch.randperm` on the global generator inside its hook;
we seed that generator before each PyTorch forward, draw the same permutation beforehand with
tuned-lens's own `sample_derangement` from the same seed, and pass it to jaxlens explicitly.
(tuned-lens 0.2.0's hooks need blocks that return tuples, as GPT-2's and GPT-NeoX's do in
transformers 4.57; its Llama blocks return a tensor, which the hooks unpack wrongly.)
"""

import jax
import jax.numpy as jnp
import layer_by_layer
import numpy as np
import pytest
import torch
from tuned_lens.causal import ablation as tl_ablation
from tuned_lens.causal import subspaces as tl_subspaces
from tuned_lens.causal.utils import sample_derangement as tl_sample_derangement

from jaxlens.analysis.ablation import ablate_layer, ablate_subspace
from jaxlens.analysis.interventions import forward_with_edits
from jaxlens.analysis.subspace import sample_derangement

TOL = 1e-5  # float32 against float32
LAYER = 1
SEED = 3

# (name, method, mode) of tuned-lens's `ablate_layer`; (name, mode) of its `ablate_subspace`.
LAYER_ABLATIONS = [
    ("zero", "zero", "batch"),
    ("mean-batch", "mean", "batch"),
    ("mean-token", "mean", "token"),
    ("resample-batch", "resample", "batch"),
    ("resample-token", "resample", "token"),
]
SUBSPACE_ABLATIONS = ["zero", "mean", "resample"]


@pytest.fixture(params=["gpt2", "gpt_neox"])
def subject(request):
    """(torch model, jaxlens model, ids) of a transformers-Flax family and a native one."""
    return request.getfixturevalue(request.param)


def _subspace_modes(model):
    # Subspace ablation differs from layer ablation only in the edit, which reaches every family
    # the same way (test_interventions); one family suffices here, to keep the test cheap.
    return SUBSPACE_ABLATIONS if model.model_type == "gpt2" else []


def _tuned_lens_derangement(n):
    torch.manual_seed(SEED)
    return tl_sample_derangement(n)


def _tuned_lens_forward(torch_model, ids, context):
    with context, torch.no_grad():
        torch.manual_seed(SEED)  # the hook's derangement: the one `_tuned_lens_derangement` drew
        out = torch_model(torch.tensor(ids), output_hidden_states=True, use_cache=False)
    return np.stack([h.numpy() for h in out.hidden_states]), out.logits.numpy()


def test_ablations_match_tuned_lens(subject):
    torch_model, model, ids = subject
    batch, tokens = ids.shape
    basis_dk = np.random.default_rng(0).normal(size=(model.d_model, 3)).astype(np.float32)
    rows = {"batch": batch, "token": batch * tokens}

    def derangement(mode):
        return jnp.asarray(_tuned_lens_derangement(rows[mode]).numpy())

    edits = {}
    for name, method, mode in LAYER_ABLATIONS:
        perm = derangement(mode) if method == "resample" else None
        edits[name] = ablate_layer(method, mode=mode, derangement=perm)
    for mode in _subspace_modes(model):
        perm = derangement("token") if mode == "resample" else None
        edits[f"subspace-{mode}"] = ablate_subspace(
            jnp.asarray(basis_dk), mode, derangement=perm, orthonormalize=True
        )

    @jax.jit
    def ablated(params, ids):
        return {
            name: forward_with_edits(model, params, ids, {LAYER: edit})
            for name, edit in edits.items()
        }

    got = ablated(model.params, ids)
    contexts = {
        name: tl_ablation.ablate_layer(torch_model, LAYER, method, mode=mode)
        for name, method, mode in LAYER_ABLATIONS
    }
    for mode in _subspace_modes(model):
        contexts[f"subspace-{mode}"] = tl_subspaces.ablate_subspace(
            torch_model, torch.tensor(basis_dk), LAYER, mode=mode, orthonormal=False
        )
    clean_logits = model(ids).logits_btv
    for name, context in contexts.items():
        hidden, logits = _tuned_lens_forward(torch_model, ids, context)
        np.testing.assert_allclose(got[name].hidden_lbtd, hidden, atol=TOL, rtol=TOL, err_msg=name)
        np.testing.assert_allclose(got[name].logits_btv, logits, atol=TOL, rtol=TOL, err_msg=name)
        assert np.abs(logits - clean_logits).max() > 1e-3, f"{name} changed nothing"


def test_ablations_in_the_jitted_forward_equal_the_model_run_block_by_block(subject):
    """Three ablations in one forward, each written out by hand for the reference."""
    _, model, ids = subject
    batch, tokens = ids.shape
    key = jax.random.key(7)
    direction_d = jnp.asarray(np.random.default_rng(1).normal(size=model.d_model), jnp.float32)
    edits = {
        0: ablate_layer("resample", mode="token", key=key),
        1: ablate_subspace(direction_d, "zero", orthonormalize=True),
        2: ablate_layer("mean", mode="batch"),
    }
    got = jax.jit(lambda params, ids: forward_with_edits(model, params, ids, edits))(
        model.params, ids
    )

    perm = sample_derangement(key, batch * tokens)
    unit_d = direction_d / jnp.linalg.norm(direction_d)

    def resample_tokens(h_in, h_out):
        contribution = (h_out - h_in).reshape(batch * tokens, -1)
        return h_in + contribution[perm].reshape(h_in.shape)

    def remove_direction(h_in, h_out):
        return h_out - (h_out @ unit_d)[..., None] * unit_d

    def mean_over_batch(h_in, h_out):
        return h_in + (h_out - h_in).mean(0, keepdims=True)

    by_hand = {0: resample_tokens, 1: remove_direction, 2: mean_over_batch}
    want = layer_by_layer.forward(model, model.params, ids, by_hand)
    for layer, (g, w) in enumerate(zip(got.hidden_lbtd, want.hidden_lbtd, strict=True)):
        np.testing.assert_allclose(g, w, atol=TOL, rtol=TOL, err_msg=f"hidden state {layer}")
    np.testing.assert_allclose(got.logits_btv, want.logits_btv, atol=TOL, rtol=TOL)


def _trace(model, ids, edits):
    """Traces the edited forward without running it (the refusals happen while tracing)."""
    return jax.eval_shape(lambda p: forward_with_edits(model, p, ids, edits), model.params)


@pytest.mark.parametrize("method", ["mean", "resample"])
def test_a_batch_of_one_sequence_is_refused_in_batch_mode(gpt2, method):
    _, model, ids = gpt2
    edit = ablate_layer(method, key=jax.random.key(0))
    with pytest.raises(ValueError, match="only one sequence; pass at least 2, or use mode 'token'"):
        _trace(model, ids[:1], {LAYER: edit})
    _trace(model, ids[:1], {LAYER: ablate_layer(method, mode="token", key=jax.random.key(0))})


def test_a_derangement_of_one_token_is_refused(gpt2):
    _, model, ids = gpt2
    with pytest.raises(ValueError, match="only one token; pass at least 2, or use method 'zero'"):
        _trace(model, ids[:1, :1], {LAYER: ablate_layer("resample", mode="token", key=None)})
    with pytest.raises(ValueError, match="at least 2 vectors"):
        _trace(model, ids[:1, :1], {LAYER: ablate_subspace(jnp.ones(model.d_model), "resample")})


def test_resample_needs_one_fitting_source_of_its_derangement(gpt2):
    _, model, ids = gpt2
    with pytest.raises(ValueError, match="exactly one of `key`"):
        _trace(model, ids, {LAYER: ablate_layer("resample")})
    wrong = jnp.arange(ids.shape[0] * ids.shape[1])[::-1]  # token-mode indices in batch mode
    with pytest.raises(ValueError, match=r"derangement has shape \(40,\) but .* 4 vectors"):
        _trace(model, ids, {LAYER: ablate_layer("resample", derangement=wrong)})


def test_unknown_methods_and_modes_are_refused():
    with pytest.raises(ValueError, match=r"Unknown ablation method 'shuffle'; use one of"):
        ablate_layer("shuffle")
    with pytest.raises(ValueError, match=r"Unknown ablation mode 'sequence'; use one of"):
        ablate_layer("mean", mode="sequence")
    with pytest.raises(ValueError, match=r"Unknown ablation mode 'median'; use one of"):
        ablate_subspace(jnp.ones(4), "median")


def test_a_layer_out_of_range_or_a_basis_of_the_wrong_width_is_refused(gpt2):
    _, model, ids = gpt2
    with pytest.raises(ValueError, match="Layer 3 is out of range for a model with 3 blocks"):
        _trace(model, ids, {3: ablate_layer("zero")})
    with pytest.raises(ValueError, match=r"basis has shape \(31, 2\) but the vectors are 32 wide"):
        _trace(model, ids, {LAYER: ablate_subspace(jnp.ones((31, 2)))})
