"""Causal bases against tuned-lens 0.2.0's `extract_causal_bases` and a float64 numpy objective.

The model is a tiny random GPT-2 whose vocabulary is as wide as its residual stream (32): tuned-lens
computes its starting directions by translating the unembedding along its vocabulary axis, which
only runs when vocab == d (otherwise: "mat1 and mat2 shapes cannot be multiplied"). We start
jaxlens from those same directions (`init_ldk`) so that both optimisers climb the same hill.

The parity tests compare energies (1e-5) and objective values, not the vectors at 1e-5: at a
maximum the energy is flat to first order (quadratic in the angle), so an energy converged to
~1e-7 in float32 leaves the direction loose by ~1e-3, and each optimiser stops where its own rule
says (tuned-lens: torch L-BFGS's tolerances; jaxlens: a gradient norm of 1e-6). So we check
(a) the energies agree within 1e-5, (b) the directions agree up to sign to |cos| > 0.9999, and
(c) each side's energies are the true objective, recomputed in float64 numpy at its own vectors
(1e-5): the two implementations maximise the same function and reach the same maxima. This is
done for the KL and the cross-entropy energy with mean ablation, and for the KL with zero and
resample ablation (tuned-lens then resamples with the derangements jaxlens drew).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models
import torch
import torch_reference
from tuned_lens.causal import subspaces as tuned_lens_subspaces
from tuned_lens.causal.subspaces import extract_causal_bases as torch_extract_causal_bases

from jaxlens.analysis.causal_basis import extract_causal_bases
from jaxlens.analysis.subspace import sample_derangement
from jaxlens.lens import TunedLens
from jaxlens.models import load_model

K = 2
LAYERS = (0, 1)  # tuned-lens fits layers 0..len(hiddens)-2, so we hand it the first three


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch_model = tiny_models.build("gpt2", seed=3, vocab_size=32)
    model = load_model(tiny_models.save(torch_model, tmp_path_factory.mktemp("gpt2")))
    ids = np.random.default_rng(0).integers(0, 32, size=(2, 8))
    translators = tiny_models.random_translators(model.num_layers, model.d_model, seed=1, scale=0.1)
    lens = TunedLens(decoder=model.decoder(), translators=translators)
    torch_lens = torch_reference.torch_lens(torch_model, translators)
    return lens, torch_lens, model(ids).hidden_lbtd, ids


def torch_reference_bases(
    torch_lens, hidden_lbtd, num_layers, k, labels=None, mode="mean", perms_ln=None
):
    """tuned-lens's bases of layers 0..num_layers-1, and the directions it started from.

    For "resample", `perms_ln` holds layer l's derangement of the b * t vectors: tuned-lens's
    `derange` (which draws a new one at every evaluation) is replaced by indexing with it while
    layer l is fitted, so tuned-lens maximises the same deterministic objective as jaxlens.
    """
    hiddens = [torch.tensor(np.asarray(h)) for h in hidden_lbtd[: num_layers + 1]]
    labels = None if labels is None else torch.tensor(labels)
    fitting = torch_extract_causal_bases(torch_lens, hiddens, k, labels=labels, mode=mode)
    if perms_ln is None:
        bases = list(fitting)
    else:
        current = {}

        def fixed_derange(batch, generator=None):
            return batch[torch.tensor(np.array(current["perm"]), dtype=torch.long)]

        bases = []
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(tuned_lens_subspaces, "derange", fixed_derange)
            for i in range(num_layers):  # the generator fits layer i inside this next()
                current["perm"] = perms_ln[i]
                bases.append(next(fitting))
    unembed_dv = torch_lens.unembed.unembedding.weight.data.T
    with torch.no_grad():  # the start tuned-lens takes, as it computes it
        starts = [torch_lens.transform_hidden(unembed_dv, i) for i in range(num_layers)]
    init_ldk = np.stack([torch.linalg.svd(m, full_matrices=False)[0][:, :k] for m in starts])
    return bases, jnp.asarray(init_ldk)


def numpy_energy(lens, layer, h_btd, u_d, labels_bt=None, mode="mean", perm_n=None):
    """E(u) in float64: ablate u ("zero", "mean", or "resample" by the derangement `perm_n` of
    the b * t vectors), decode with the lens (GPT-2: LayerNorm), KL or CE rise."""
    decoder, translators = lens.decoder, lens.translators
    f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731

    def log_probs(h):
        moved = h + h @ f64(translators.kernel_ldd[layer]) + f64(translators.bias_ld[layer])
        centred = moved - moved.mean(-1, keepdims=True)
        normed = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + decoder.eps)
        logits = (normed * f64(decoder.norm_scale_d) + f64(decoder.norm_bias_d)) @ f64(
            decoder.unembed_vd
        ).T
        logits -= logits.max(-1, keepdims=True)
        return logits - np.log(np.exp(logits).sum(-1, keepdims=True))

    h, u = f64(h_btd), f64(u_d) / np.linalg.norm(u_d)
    rows = h.reshape(-1, h.shape[-1])
    replacement_n = {
        "zero": lambda: np.zeros(len(rows)),
        "mean": lambda: np.full(len(rows), rows.mean(0) @ u),
        "resample": lambda: rows[np.asarray(perm_n)] @ u,
    }[mode]()
    ablated = h + np.outer(replacement_n - rows @ u, u).reshape(h.shape)
    log_p, log_q = log_probs(h), log_probs(ablated)
    if labels_bt is None:
        return (np.exp(log_p) * (log_p - log_q)).sum(-1).mean()
    next_tokens = labels_bt[:, 1:, None]
    ce = lambda lp: -np.take_along_axis(lp[:, :-1], next_tokens, -1).mean()  # noqa: E731
    return ce(log_q) - ce(log_p)


def assert_same_maxima(lens, hidden_lbtd, got, want, labels=None, mode="mean", perms_ln=None):
    for i, layer in enumerate(LAYERS[: len(want)]):
        perm_n = None if perms_ln is None else perms_ln[i]
        want_e, want_v = want[i].energies.numpy(), want[i].vectors.numpy()
        np.testing.assert_allclose(got.energies_lk[i], want_e, atol=1e-5, err_msg=f"{layer}")
        cos_k = np.abs((np.asarray(got.vectors_ldk[i]) * want_v).sum(0))
        assert (cos_k > 0.9999).all(), (layer, cos_k)
        for j in range(want_v.shape[1]):
            for energies, vectors in [(got.energies_lk[i], got.vectors_ldk[i]), (want_e, want_v)]:
                exact = numpy_energy(
                    lens, layer, hidden_lbtd[layer], vectors[:, j], labels, mode, perm_n
                )
                np.testing.assert_allclose(energies[j], exact, atol=1e-5, err_msg=f"{layer} {j}")


def test_kl_bases_match_tuned_lens(setup):
    lens, torch_lens, hidden_lbtd, _ = setup
    want, init_ldk = torch_reference_bases(torch_lens, hidden_lbtd, len(LAYERS), K)
    got = extract_causal_bases(lens, hidden_lbtd[:-1], K, layers=LAYERS, init_ldk=init_ldk)
    assert got.vectors_ldk.shape == (len(LAYERS), 32, K)
    assert (np.diff(np.asarray(got.energies_lk), axis=1) <= 0).all()  # sorted, largest first
    gram_kk = np.einsum("ldj,ldk->ljk", got.vectors_ldk, got.vectors_ldk)
    np.testing.assert_allclose(gram_kk, np.broadcast_to(np.eye(K), gram_kk.shape), atol=1e-5)
    assert_same_maxima(lens, hidden_lbtd, got, want)


def test_cross_entropy_bases_match_tuned_lens(setup):
    lens, torch_lens, hidden_lbtd, ids = setup
    want, init_ldk = torch_reference_bases(torch_lens, hidden_lbtd, 1, 1, labels=ids)
    got = extract_causal_bases(
        lens, hidden_lbtd[:-1], 1, layers=[0], labels_bt=jnp.asarray(ids), init_ldk=init_ldk
    )
    assert_same_maxima(lens, hidden_lbtd, got, want, labels=ids)


def test_zero_ablation_bases_match_tuned_lens(setup):
    """Fitted to a gradient norm of 1e-7, not the default 1e-6: a later direction's energy is
    a maximum over the complement of the earlier ones, so it moves to *first* order with their
    error. Here (layer 0) the default leaves direction 0 about 4e-4 rad from its float64
    optimum, which lowers energy 1 by 1e-5 (0.0584189 against a float64 greedy optimum of
    0.0584285; tuned-lens reports 0.0584322, its own direction 0 being off the other way);
    at 1e-7 jaxlens is within 2e-7 of the float64 value and 4e-6 of tuned-lens."""
    lens, torch_lens, hidden_lbtd, _ = setup
    want, init_ldk = torch_reference_bases(torch_lens, hidden_lbtd, len(LAYERS), K, mode="zero")
    got = extract_causal_bases(
        lens, hidden_lbtd[:-1], K, layers=LAYERS, mode="zero", init_ldk=init_ldk, tolerance=1e-7
    )
    assert_same_maxima(lens, hidden_lbtd, got, want, mode="zero")


def test_resample_bases_match_tuned_lens_with_the_same_derangements(setup):
    """jaxlens draws one derangement per layer from `key` (`sample_derangement` on
    `jax.random.split(key, layers)`, as its docstring says); tuned-lens is handed the same ones
    (see `torch_reference_bases`), and the float64 objective uses them too. A different
    derangement gives other energies, so agreement at 1e-5 also shows which one was used."""
    lens, torch_lens, hidden_lbtd, _ = setup
    key = jax.random.key(7)
    n = hidden_lbtd.shape[1] * hidden_lbtd.shape[2]
    perms_ln = np.asarray(
        jax.vmap(sample_derangement, in_axes=(0, None))(jax.random.split(key, len(LAYERS)), n)
    )
    assert (np.sort(perms_ln, axis=1) == np.arange(n)).all()  # permutations
    assert (perms_ln != np.arange(n)).all()  # without fixed points
    want, init_ldk = torch_reference_bases(
        torch_lens, hidden_lbtd, len(LAYERS), K, mode="resample", perms_ln=perms_ln
    )
    got = extract_causal_bases(
        lens, hidden_lbtd[:-1], K, layers=LAYERS, mode="resample", key=key, init_ldk=init_ldk
    )
    assert_same_maxima(lens, hidden_lbtd, got, want, mode="resample", perms_ln=perms_ln)


def test_layers_per_batch_does_not_change_the_bases(setup):
    """All 3 layers at once (the default) and 2 at a time (which does not divide 3: `lax.map`
    fits layers 0 and 1 under `vmap`, then layer 2 alone) give the same bases. The layers' fits
    are independent; only how XLA batches their arithmetic differs (vmapped L-BFGS loops run
    until every layer in the batch is done, holding the finished ones), so energies agree to
    1e-6 and directions to |cos| > 0.9999. One direction per layer: a second one's energy would
    move to first order with the first's rounding-level differences (see the zero-mode test)."""
    lens, _, hidden_lbtd, _ = setup
    default = extract_causal_bases(lens, hidden_lbtd[:-1], 1)
    got = extract_causal_bases(lens, hidden_lbtd[:-1], 1, layers_per_batch=2)
    np.testing.assert_allclose(got.energies_lk, default.energies_lk, rtol=1e-6, atol=1e-6)
    cos_lk = np.abs((np.asarray(got.vectors_ldk) * np.asarray(default.vectors_ldk)).sum(1))
    assert (cos_lk > 0.9999).all(), cos_lk


def test_a_planted_direction_comes_first(setup):
    """A lens that reads h almost only through h . e (translator `3 e e^T - I` plus 1% noise),
    on hidden states that vary only along e (plus 1% noise): removing e erases the prediction's
    variation, and e must come first, found from a random start and from the default one.

    (Both halves matter: where the lens also reads other directions, or h varies in them, a
    tilted direction beats e, because mean-ablating it also pushes h along those directions.)
    """
    lens, _, hidden_lbtd, _ = setup
    rng = np.random.default_rng(5)
    planted_d = rng.normal(size=32)
    planted_d /= np.linalg.norm(planted_d)
    kernel_ldd = (
        0.1 * np.asarray(lens.translators.kernel_ldd) + 3.0 * np.outer(planted_d, planted_d)
    ) - np.eye(32)
    planted_lens = lens.replace(
        translators=lens.translators.replace(kernel_ldd=jnp.asarray(kernel_ldd, jnp.float32))
    )
    shape = (planted_lens.num_layers, 2, 8)
    h_lbtd = (
        np.asarray(hidden_lbtd[:-1]).mean((1, 2), keepdims=True)
        + rng.normal(size=shape + (1,)) * planted_d
        + 0.01 * rng.normal(size=shape + (32,))
    )
    random_init_ldk = np.linalg.qr(rng.normal(size=(len(LAYERS), 32, K)))[0]
    assert np.abs(random_init_ldk.transpose(0, 2, 1) @ planted_d).max() < 0.3
    for init_ldk in [jnp.asarray(random_init_ldk, jnp.float32), None]:
        got = extract_causal_bases(
            planted_lens, jnp.asarray(h_lbtd, jnp.float32), K, layers=LAYERS, init_ldk=init_ldk
        )
        for i in range(len(LAYERS)):
            assert abs(float(got.vectors_ldk[i, :, 0] @ planted_d)) > 0.99
            assert got.energies_lk[i, 0] > 100 * abs(got.energies_lk[i, 1])


def test_bad_input_is_refused(setup):
    lens, _, hidden_lbtd, ids = setup
    h_lbtd = hidden_lbtd[:-1]
    with pytest.raises(ValueError, match=r"pass one \[d, k\] = \[32, 2\] basis"):
        extract_causal_bases(lens, h_lbtd, 2, layers=[0], init_ldk=jnp.zeros((1, 31, 2)))
    with pytest.raises(ValueError, match="pass 1 <= k <= 32"):
        extract_causal_bases(lens, h_lbtd, 33)
    with pytest.raises(ValueError, match="pass 1 <= k <= 32"):
        extract_causal_bases(lens, h_lbtd, 0)
    for layers in ([3], [-1], []):
        with pytest.raises(ValueError, match="out of range: the lens has 3 layers"):
            extract_causal_bases(lens, h_lbtd, 1, layers=layers)
    with pytest.raises(ValueError, match=r"Pass hidden_lbtd\[:-1\]"):
        extract_causal_bases(lens, hidden_lbtd, 1)
    with pytest.raises(ValueError, match="lens decodes 32-wide vectors"):
        extract_causal_bases(lens, h_lbtd[..., :16], 1)
    with pytest.raises(ValueError, match=r"\[L, batch, tokens, d\]"):
        extract_causal_bases(lens, h_lbtd[:, 0], 1)
    with pytest.raises(ValueError, match="pass the input's token ids"):
        extract_causal_bases(lens, h_lbtd, 1, labels_bt=jnp.asarray(ids[:, 1:]))
    with pytest.raises(ValueError, match="pass `key="):
        extract_causal_bases(lens, h_lbtd, 1, mode="resample")
    with pytest.raises(ValueError, match="Unknown ablation mode"):
        extract_causal_bases(lens, h_lbtd, 1, mode="shuffle")
    for count in (0, -1):
        with pytest.raises(ValueError, match="pass a positive count, or None"):
            extract_causal_bases(lens, h_lbtd, 1, layers_per_batch=count)
