"""jaxlens.analysis.invert against tuned-lens 0.2.0's `Unembed.invert` (same tiny GPT-2) and float64
numpy.

Where tuned-lens is correct it is the reference: its objective and its solution's KL. Its start
is not (its docstring promises the pseudo-inverse, its code starts from zeros), so jaxlens's
pseudo-inverse start is checked against a float64 numpy computation instead (GPT-2's LayerNorm;
a Llama's RMSNorm; Gemma-2's `1 + scale` RMSNorm and logit soft-cap; GPT-J's lm_head bias), and
from its default start jaxlens's final KL may only be lower than tuned-lens's. Handed the same
pseudo-inverse start, tuned-lens must reach the same solution, row by row.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models
import torch
from tuned_lens.nn.unembed import Unembed

from jaxlens.analysis.invert import invert, kl_to_decoded, pseudo_inverse_start
from jaxlens.models import load_model

TOL = 1e-5  # float32 against float32 (torch) or float64 (numpy)
KL_FLOOR = 1e-6  # a recovered distribution: float32 evaluates a zero KL to within about 1e-7
ROWS = 3


def _random_logits(vocab, seed=0):
    return (np.random.default_rng(seed).normal(size=(ROWS, vocab)) * 3).astype(np.float32)


def test_objective_equals_tuned_lens_unembed_kl(gpt2):
    torch_model, model, _ = gpt2
    target_nv = _random_logits(model.vocab_size)
    h_nd = np.random.default_rng(1).normal(size=(ROWS, model.d_model)).astype(np.float32)
    with torch.no_grad():  # tuned-lens's objective: KL(p || softmax(Unembed(h))) per row
        log_p = torch.tensor(target_nv).log_softmax(-1)
        log_q = Unembed(torch_model)(torch.tensor(h_nd)).log_softmax(-1)
        want_n = (log_p.exp() * (log_p - log_q)).sum(-1).numpy()
    got_n = kl_to_decoded(model.decoder(), jnp.asarray(target_nv), jnp.asarray(h_nd))
    np.testing.assert_allclose(got_n, want_n, atol=TOL, rtol=TOL)


def test_kl_at_tuned_lens_solution_agrees_and_jaxlens_reaches_at_most_it(gpt2):
    torch_model, model, _ = gpt2
    decoder = model.decoder()
    target_nv = _random_logits(model.vocab_size)
    theirs = Unembed(torch_model).invert(torch.tensor(target_nv), max_iter=100)
    # tuned-lens returns the *normed* state as its preimage: decode it with the unembedding only.
    log_p = jax.nn.log_softmax(target_nv)
    log_q = jax.nn.log_softmax(decoder.unembed(jnp.asarray(theirs.preimage.numpy())))
    kl_at_theirs = float(jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1)))
    np.testing.assert_allclose(kl_at_theirs, float(theirs.kl), atol=TOL, rtol=TOL)
    ours = invert(decoder, target_nv)
    assert float(ours.kl.mean()) <= float(theirs.kl) + TOL
    # Its outputs describe its own preimage.
    np.testing.assert_allclose(
        ours.kl, kl_to_decoded(decoder, target_nv, ours.preimage_d), atol=TOL
    )
    np.testing.assert_allclose(ours.normed_d, decoder.final_norm(ours.preimage_d), atol=TOL)
    assert ours.preimage_d.shape == (ROWS, model.d_model) and ours.kl.shape == (ROWS,)


def test_pseudo_inverse_start_equals_float64_least_squares(gpt2):
    model = gpt2[1]
    decoder = model.decoder()
    target_nv = _random_logits(model.vocab_size, seed=2)
    # The least-squares normed state of U z + c = logits (c free), then the LayerNorm's affine
    # part undone: float64 numpy.
    unembed_vd = np.asarray(decoder.unembed_vd, np.float64)
    centred_vd = unembed_vd - unembed_vd.mean(0)
    centred_nv = target_nv.astype(np.float64) - target_nv.mean(-1, keepdims=True)
    z_nd = centred_nv @ np.linalg.pinv(centred_vd).T
    scale_d, bias_d = (
        np.asarray(x, np.float64) for x in (decoder.norm_scale_d, decoder.norm_bias_d)
    )
    want_nd = (z_nd - bias_d) / scale_d
    got_nd = pseudo_inverse_start(decoder, jnp.asarray(target_nv))
    np.testing.assert_allclose(got_nd, want_nd, atol=TOL, rtol=TOL)


def _per_row_kl_of_normed(decoder, target_nv, normed_nd):
    """KL(p || softmax(unembed(z))) per row, for tuned-lens's preimage z (already normed)."""
    log_p = jax.nn.log_softmax(jnp.asarray(target_nv))
    log_q = jax.nn.log_softmax(decoder.unembed(jnp.asarray(normed_nd)))
    return np.asarray(jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1))


def _tuned_lens_invert(torch_model, target_nv, h0_nd):
    """tuned-lens's L-BFGS from `h0_nd`, run to its floor: with `tol=1e-9` neither of its exits
    (gradient norm or loss below tol) fires, so it stops only at torch's own L-BFGS tolerances
    (1e-7 on the gradient, 1e-9 on changes; more iterations change nothing here)."""
    theirs = Unembed(torch_model).invert(
        torch.tensor(target_nv), h0=torch.tensor(np.asarray(h0_nd)), max_iter=100, tol=1e-9
    )
    return theirs.preimage.numpy()


def test_from_the_same_start_tuned_lens_reaches_the_same_solution(gpt2):
    """Random logits (outside the head's 32-dimensional image: a KL near 1 nat remains), both
    solvers from the pseudo-inverse start. Per-row KL agree to 1e-6 (observed 5e-7), and the
    normed states to 5e-4 (observed 2e-4): the minimum is unique here, and the KL, flat to
    first order there, pins the state only to about sqrt(float32 noise / curvature)."""
    torch_model, model, _ = gpt2
    decoder = model.decoder()
    target_nv = _random_logits(model.vocab_size, seed=4)
    h0_nd = pseudo_inverse_start(decoder, jnp.asarray(target_nv))
    theirs_normed_nd = _tuned_lens_invert(torch_model, target_nv, h0_nd)
    ours = invert(decoder, target_nv, h0_d=h0_nd)
    kl_theirs_n = _per_row_kl_of_normed(decoder, target_nv, theirs_normed_nd)
    assert (kl_theirs_n > 0.1).all()  # the rows are not in the image
    np.testing.assert_allclose(ours.kl, kl_theirs_n, atol=1e-6)
    np.testing.assert_allclose(ours.normed_d, theirs_normed_nd, atol=5e-4)


def test_both_recover_the_normed_state_of_logits_in_the_image(gpt2):
    """Logits of known hidden states, from a start pushed off the pseudo-inverse (which already
    solves them): the problem is well-posed for the *normed* state z = final_norm(h) (U, 97 x 32,
    has full column rank, so U z fixes z), not for h (LayerNorm ignores h's scale and mean).
    Both solvers reach a KL of zero to float32's resolution (|KL| < 1e-6), which pins z to about
    sqrt(1e-7) around the float64 truth: both within 1e-2 (observed 4e-3), and each other too."""
    torch_model, model, _ = gpt2
    decoder = model.decoder()
    rng = np.random.default_rng(6)
    h_nd = (rng.normal(size=(ROWS, model.d_model)) * 2).astype(np.float32)
    target_nv = np.asarray(decoder(jnp.asarray(h_nd)))
    h0_nd = pseudo_inverse_start(decoder, jnp.asarray(target_nv))
    h0_nd = h0_nd + jnp.asarray(0.5 * rng.normal(size=h0_nd.shape), jnp.float32)
    assert (kl_to_decoded(decoder, target_nv, h0_nd) > 1e-2).all()  # a start with work to do
    theirs_normed_nd = _tuned_lens_invert(torch_model, target_nv, h0_nd)
    ours = invert(decoder, target_nv, h0_d=h0_nd)
    # float64 LayerNorm of the true state
    h64 = h_nd.astype(np.float64)
    centred = h64 - h64.mean(-1, keepdims=True)
    scale_d, bias_d = (
        np.asarray(x, np.float64) for x in (decoder.norm_scale_d, decoder.norm_bias_d)
    )
    true_normed_nd = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + decoder.eps)
    true_normed_nd = true_normed_nd * scale_d + bias_d
    assert np.all(np.abs(ours.kl) < KL_FLOOR), ours.kl
    assert np.all(np.abs(_per_row_kl_of_normed(decoder, target_nv, theirs_normed_nd)) < KL_FLOOR)
    np.testing.assert_allclose(ours.normed_d, true_normed_nd, atol=1e-2)
    np.testing.assert_allclose(theirs_normed_nd, true_normed_nd, atol=1e-2)
    np.testing.assert_allclose(ours.normed_d, theirs_normed_nd, atol=1e-2)


@pytest.fixture(scope="module", params=["llama", "gemma2", "gptj"])
def other_head(request, tmp_path_factory):
    """A head unlike GPT-2's: RMSNorm (Llama); `1 + scale` RMSNorm and a logit soft-cap of 1
    (Gemma-2); LayerNorm and an lm_head bias (GPT-J)."""
    torch_model = tiny_models.build(request.param, seed=13)
    model = load_model(tiny_models.save(torch_model, tmp_path_factory.mktemp(request.param)))
    return request.param, model.decoder()


def _numpy_pseudo_inverse_start(family, decoder, target_nv):
    """float64: undo the soft-cap (arctanh) and the lm_head bias, solve `[U 1] [z; c] = logits`
    by least squares (the constant c free), then undo the norm's affine part."""
    f64 = lambda x: None if x is None else np.asarray(x, np.float64)  # noqa: E731
    raw_nv = target_nv.astype(np.float64)
    if family == "gemma2":
        cap = decoder.logit_softcap
        raw_nv = cap * np.arctanh(raw_nv / cap)
    if family == "gptj":
        raw_nv = raw_nv - f64(decoder.unembed_bias_v)
    unembed_vd = f64(decoder.unembed_vd)
    augmented = np.concatenate([unembed_vd, np.ones((len(unembed_vd), 1))], axis=1)
    z_nd = np.linalg.lstsq(augmented, raw_nv.T, rcond=None)[0][:-1].T
    if family == "gptj":
        z_nd = z_nd - f64(decoder.norm_bias_d)
    gain_d = f64(decoder.norm_scale_d) + (1.0 if family == "gemma2" else 0.0)
    return z_nd / gain_d


def test_pseudo_inverse_start_of_other_heads_equals_float64_least_squares(other_head):
    family, decoder = other_head
    rng = np.random.default_rng(7)
    target_nv = (rng.normal(size=(ROWS, decoder.vocab_size)) * 3).astype(np.float32)
    if family == "gemma2":  # logits a cap of 1 can produce, away from +-1 (arctanh is steep)
        target_nv = np.tanh(target_nv / 6).astype(np.float32)
    want_nd = _numpy_pseudo_inverse_start(family, decoder, target_nv)
    got_nd = pseudo_inverse_start(decoder, jnp.asarray(target_nv))
    np.testing.assert_allclose(got_nd, want_nd, atol=TOL, rtol=TOL)
    # Logits a hidden state produced: the start already decodes to their distribution.
    in_image_nv = decoder(jnp.asarray(rng.normal(size=(ROWS, decoder.d_model)), jnp.float32))
    start_nd = pseudo_inverse_start(decoder, in_image_nv)
    assert np.all(np.abs(kl_to_decoded(decoder, in_image_nv, start_nd)) < KL_FLOOR)


def test_logits_of_a_known_hidden_state_are_recovered(gpt2):
    model = gpt2[1]
    decoder = model.decoder()
    rng = np.random.default_rng(3)
    h_nd = jnp.asarray(rng.normal(size=(ROWS, model.d_model)) * 2, jnp.float32)
    target_nv = decoder(h_nd) + 5.0  # a shift softmax ignores
    # The pseudo-inverse start already decodes to the target; L-BFGS from a random start too.
    start_kl = kl_to_decoded(decoder, target_nv, pseudo_inverse_start(decoder, target_nv))
    assert np.all(np.abs(start_kl) < KL_FLOOR)
    for out in (
        invert(decoder, target_nv),
        invert(decoder, target_nv, h0_d=jnp.asarray(rng.normal(size=h_nd.shape), jnp.float32)),
    ):
        assert np.all(np.abs(out.kl) < KL_FLOOR), out.kl
        np.testing.assert_allclose(
            jax.nn.softmax(decoder(out.preimage_d)), jax.nn.softmax(target_nv), atol=1e-4
        )


def test_bad_input_is_refused(gpt2):
    model = gpt2[1]
    decoder = model.decoder()
    with pytest.raises(ValueError, match=r"vocabulary of 97; pass logits \[..., 97\]"):
        invert(decoder, jnp.zeros((ROWS, 96)))
    with pytest.raises(ValueError, match=r"start h0_d has shape \(3, 31\); it must be \(3, 32\)"):
        invert(decoder, jnp.zeros((ROWS, 97)), h0_d=jnp.zeros((ROWS, 31)))
