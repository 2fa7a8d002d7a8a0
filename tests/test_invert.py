"""jaxlens.analysis.invert against tuned-lens 0.2.0's `Unembed.invert` (same tiny GPT-2) and float64
numpy.

Where tuned-lens is correct it is the reference: its objective and its solution's KL. Its start
is not (its docstring promises the pseudo-inverse, its code starts from zeros), so jaxlens's
pseudo-inverse start is checked against a float64 numpy computation instead, and jaxlens's final
KL may only be lower than tuned-lens's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tuned_lens.nn.unembed import Unembed

from jaxlens.analysis.invert import invert, kl_to_decoded, pseudo_inverse_start

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
