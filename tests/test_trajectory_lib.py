"""Prediction trajectories and their pictures, checked against computations in PyTorch.

The reference log-probabilities come from the PyTorch model's own modules (its hidden states,
translator, final norm and lm_head), and every statistic is recomputed from them independently in
float64 (torch's `kl_div`, tuned-lens's own true Jensen-Shannon divergence, argsort ranks).
"""

import math
import re

import numpy as np
import pytest
import tiny_models
import torch
import torch.nn.functional as F
from conftest import run_command
from matplotlib import image as mpimg
from plotly.io.json import to_json_plotly
from tuned_lens.stats.distance import js_divergence as reference_js

from jaxlens import lens_io, plotting, trajectory
from jaxlens.lens import LogitLens, TunedLens
from jaxlens.models import load_model
from jaxlens.trajectory_lib import PredictionTrajectory

T = 9


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny GPT-2 (no tokenizer), a random tuned lens, and the reference log-probs from torch."""
    torch_model = tiny_models.build("gpt2", seed=3)
    model = load_model(tiny_models.save(torch_model, tmp_path_factory.mktemp("gpt2")))
    translators = tiny_models.random_translators(model.num_layers, model.d_model, bias_scale=1.0)
    lens = TunedLens(decoder=model.decoder(), translators=translators)
    ids = np.random.default_rng(0).integers(0, model.vocab_size, size=T)
    norm, head = tiny_models.final_norm_module(torch_model), torch_model.get_output_embeddings()
    with torch.no_grad():
        out = torch_model(torch.tensor(ids[None]), output_hidden_states=True)
        rows = []
        for layer, h in enumerate(out.hidden_states[:-1]):
            moved = h[0] + h[0] @ torch.tensor(np.asarray(translators.kernel_ldd[layer]))
            rows.append(head(norm(moved + torch.tensor(np.asarray(translators.bias_ld[layer])))))
        rows.append(out.logits[0])
    ref_lp = torch.stack(rows).double().log_softmax(-1)
    return model, lens, ids, ref_lp


@pytest.fixture(scope="module")
def tuned(tiny):
    model, lens, ids, _ = tiny
    return PredictionTrajectory.from_lens(lens, model, ids)


@pytest.fixture(scope="module")
def logit(tiny):
    model, _, ids, _ = tiny
    return PredictionTrajectory.from_lens(LogitLens(model.decoder()), model, ids)


def _close(got, want):
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-5, rtol=1e-5)


def test_log_probs_and_shapes_match_pytorch(tiny, tuned):
    model, _, ids, ref_lp = tiny
    assert tuned.log_probs_ltv.shape == (model.num_layers + 1, T, model.vocab_size)
    assert tuned.log_probs_ltv.dtype == np.float32
    _close(tuned.log_probs_ltv, ref_lp)
    np.testing.assert_array_equal(tuned.input_ids_t, ids)
    np.testing.assert_array_equal(tuned.targets_t, np.append(ids[1:], -1))
    assert tuned.tokens == [str(i) for i in ids]  # no tokenizer: ids as text
    assert tuned.layer_names == ["0", "1", "2", "output"]


def test_a_soft_capped_model_s_trajectory_matches_pytorch(tmp_path):
    """Gemma-2 caps its logits, c tanh(z / c): every lens row is capped as the output row is."""
    torch_model = tiny_models.build("gemma2", seed=4)
    model = load_model(tiny_models.save(torch_model, tmp_path))
    translators = tiny_models.random_translators(model.num_layers, model.d_model)
    lens = TunedLens(decoder=model.decoder(), translators=translators)
    ids = np.random.default_rng(1).integers(0, model.vocab_size, size=T)
    cap = torch_model.config.final_logit_softcapping
    norm, head = tiny_models.final_norm_module(torch_model), torch_model.get_output_embeddings()
    with torch.no_grad():
        out = torch_model(torch.tensor(ids[None]), output_hidden_states=True)
        rows = []
        for layer, h in enumerate(out.hidden_states[:-1]):
            moved = h[0] + h[0] @ torch.tensor(np.asarray(translators.kernel_ldd[layer]))
            moved = moved + torch.tensor(np.asarray(translators.bias_ld[layer]))
            rows.append(torch.tanh(head(norm(moved)) / cap) * cap)
        rows.append(out.logits[0])
    _close(
        PredictionTrajectory.from_lens(lens, model, ids).log_probs_ltv,
        torch.stack(rows).double().log_softmax(-1),
    )


def test_statistics_match_independent_computation(tiny, tuned):
    _, _, ids, lp = tiny
    p = lp.exp()
    _close(tuned.entropy().values_lt, -(p * lp).sum(-1))
    _close(tuned.max_probability().values_lt, p.max(-1).values)
    ce = tuned.cross_entropy().values_lt
    _close(ce[:, :-1], -lp[:, torch.arange(T - 1), torch.tensor(ids[1:])])
    assert np.isnan(ce[:, -1]).all()  # the last position has no next token
    kl = tuned.forward_kl().values_lt
    want = F.kl_div(lp, lp[-1:].expand_as(lp), log_target=True, reduction="none").sum(-1)
    _close(kl, want)
    assert (kl[-1] == 0).all()
    ranks_ltv = torch.argsort(torch.argsort(-lp, dim=-1), dim=-1)
    rank = tuned.rank().values_lt
    np.testing.assert_array_equal(rank[:, :-1], ranks_ltv[:, torch.arange(T - 1), ids[1:]])
    assert np.isnan(rank[:, -1]).all()
    anti_t = np.random.default_rng(1).integers(0, lp.shape[-1], size=T)
    diff = tuned.log_prob_diff(5, anti_t).values_lt
    _close(diff, lp[..., 5] - lp[:, torch.arange(T), torch.tensor(anti_t)])
    top_ids, top_probs = tuned.top_k(4)
    want_probs, want_ids = p.topk(4, dim=-1)
    np.testing.assert_array_equal(top_ids, want_ids)
    _close(top_probs, want_probs)


def test_rank_is_zero_where_the_target_is_the_argmax(tiny):
    model, lens, ids, lp = tiny
    for layer in (1, model.num_layers):
        targets = lp[layer].argmax(-1).numpy()
        ranks = PredictionTrajectory.from_lens(lens, model, ids, targets=targets).rank().values_lt
        assert (ranks[layer] == 0).all()
        assert (ranks[0] > 0).any()  # layer 0 predicts something else somewhere


def test_comparisons_match_independent_computation(tiny, tuned, logit):
    model, _, ids, lp_tuned = tiny
    lp_logit = torch.tensor(logit.log_probs_ltv, dtype=torch.float64)
    lp = torch.tensor(tuned.log_probs_ltv, dtype=torch.float64)
    kl = tuned.kl_divergence(logit)
    _close(kl.values_lt, F.kl_div(lp_logit, lp, log_target=True, reduction="none").sum(-1))
    js = tuned.js_divergence(logit).values_lt
    np.testing.assert_allclose(js, reference_js(lp, lp_logit), atol=1e-12)
    assert js[:-1].min() > 1e-3  # the two lenses differ below the output row...
    np.testing.assert_allclose(js[-1], 0, atol=1e-12)  # ...and share the model's output
    tv = tuned.total_variation(logit).values_lt
    np.testing.assert_allclose(tv, 0.5 * (lp.exp() - lp_logit.exp()).abs().sum(-1), atol=1e-12)
    moved = (lp.exp() - lp_logit.exp()).abs().argmax(-1).numpy().astype(str)
    np.testing.assert_array_equal(kl.labels[:-1], moved[:-1])


def _synthetic(log_probs_ltv):
    rows, tokens, _ = log_probs_ltv.shape
    return PredictionTrajectory(
        log_probs_ltv=log_probs_ltv.astype(np.float32),
        input_ids_t=np.zeros(tokens, np.int64),
        targets_t=np.full(tokens, -1),
        tokens=["0"] * tokens,
        layer_names=[str(i) for i in range(rows)],
    )


def test_js_and_tv_are_symmetric_bounded_and_zero_on_equal(tuned, logit):
    rng = np.random.default_rng(2)
    # Extreme: near one-hot distributions on different tokens, and wildly peaked random ones.
    logits = rng.normal(size=(2, 3, 5, 50)) * 40
    logits[:, 0, :, :] = -1e4
    logits[0, 0, :, 0] = logits[1, 0, :, 1] = 0.0
    a, b = (_synthetic(torch.tensor(z).log_softmax(-1).numpy()) for z in logits)
    for x, y in ((a, b), (tuned, logit)):
        js_xy, js_yx = x.js_divergence(y).values_lt, y.js_divergence(x).values_lt
        np.testing.assert_allclose(js_xy, js_yx, atol=1e-12)
        assert js_xy.min() >= -1e-12 and js_xy.max() <= math.log(2) + 1e-12
        tv = x.total_variation(y).values_lt
        np.testing.assert_allclose(tv, y.total_variation(x).values_lt, atol=1e-12)
        assert tv.min() >= 0 and tv.max() <= 1 + 1e-12
        np.testing.assert_allclose(x.js_divergence(x).values_lt, 0, atol=1e-12)
        np.testing.assert_allclose(x.total_variation(x).values_lt, 0, atol=1e-12)
    disjoint_js = a.js_divergence(b).values_lt[0]
    np.testing.assert_allclose(disjoint_js, math.log(2), atol=1e-9)  # disjoint supports: ln 2
    np.testing.assert_allclose(a.total_variation(b).values_lt[0], 1, atol=1e-9)
    lp_a, lp_b = (torch.tensor(t.log_probs_ltv, dtype=torch.float64) for t in (a, b))
    np.testing.assert_allclose(a.js_divergence(b).values_lt, reference_js(lp_a, lp_b), atol=1e-12)


def test_bad_inputs_are_refused(tiny, tmp_path):
    model, lens, ids, _ = tiny
    with pytest.raises(ValueError, match="give a non-empty prompt"):
        PredictionTrajectory.from_lens(lens, model, "")
    with pytest.raises(ValueError, match="give a non-empty prompt"):
        PredictionTrajectory.from_lens(lens, model, np.array([], np.int32))
    with pytest.raises(ValueError, match="one sequence"):
        PredictionTrajectory.from_lens(lens, model, np.stack([ids, ids]))
    with pytest.raises(ValueError, match=f"one id or {T} ids"):
        PredictionTrajectory.from_lens(lens, model, ids, targets=ids[:3])
    short = TunedLens(
        decoder=model.decoder(),
        translators=tiny_models.random_translators(2, model.d_model, bias_scale=1.0),
    )
    with pytest.raises(ValueError, match="use a lens for this model"):
        PredictionTrajectory.from_lens(short, model, ids)
    lens_io.save_lens(tmp_path / "other", short.translators, model)  # a lens for 2 layers
    with pytest.raises(ValueError, match="Use a lens made for this model"):
        lens_io.load_lens(tmp_path / "other", model)
    with pytest.raises(ValueError, match="same tokens"):
        PredictionTrajectory.from_lens(lens, model, ids[:4]).js_divergence(
            PredictionTrajectory.from_lens(lens, model, ids[:5])
        )


@pytest.mark.parametrize("every", [1, 2])
def test_png_has_the_promised_size_and_top_tokens_in_cells(tiny, tuned, tmp_path, every):
    lp = tiny[3]
    rows = [0, 2, 3] if every == 2 else [0, 1, 2, 3]
    fig = plotting.heatmap_png(tuned.entropy(), tuned, tmp_path / "e.png", layers_every=every)
    height, width = mpimg.imread(tmp_path / "e.png").shape[:2]
    assert (width, height) == plotting.heatmap_size_px(T, len(rows))
    assert (width, height) == (90 + 64 * T + 110, 40 + 24 * len(rows) + 50)
    cells = {tuple(map(round, t.get_position())): t.get_text() for t in fig.axes[0].texts}
    top = lp.argmax(-1).numpy()
    assert cells == {(pos, i): str(top[row, pos]) for i, row in enumerate(rows) for pos in range(T)}
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [
        tuned.layer_names[r] for r in rows
    ]


def test_display_token_shows_whitespace_and_trims():
    assert plotting.display_token(" be\n") == "␣be\\n"
    assert plotting.display_token("\tabcdefghij") == "\\tabcde…"
    assert plotting.display_token("") == "∅"


@pytest.fixture(scope="module")
def worded(tiny_lm):
    """A trajectory of a tiny Llama with a real tokenizer, so cells hold words."""
    model = load_model(tiny_lm)
    return PredictionTrajectory.from_lens(LogitLens(model.decoder()), model, "To be, or not")


def test_html_is_offline_and_holds_the_top_tokens(worded, tmp_path):
    path = tmp_path / "t.html"
    fig = plotting.heatmap_html(worded.max_probability(), worded, path, top_k=3)
    text = path.read_text()
    assert not re.search(r"<script[^>]*\bsrc=", text)  # plotly.js embedded, nothing fetched
    assert len(text) > 1_000_000
    top = worded.token_strings(worded.log_probs_ltv.argmax(-1))
    want = np.vectorize(lambda s: plotting.display_token(s).replace("&", "&amp;"))(top)
    want = np.vectorize(lambda s: s.replace("<", "&lt;").replace(">", "&gt;"))(want)
    np.testing.assert_array_equal(np.asarray(fig.data[0].text), want)
    for label in set(want.ravel()):
        assert to_json_plotly(label)[1:-1] in text, label
    assert worded.tokens[:2] == ["To", " be"] and fig.layout.xaxis.ticktext[:2] == ("To", "␣be")


def test_command_line_writes_a_png(tiny_lm, tokenizer, tmp_path):
    out = tmp_path / "fig.png"
    num_tokens = len(tokenizer("To be, or not to be", add_special_tokens=False)["input_ids"])
    done = run_command(
        trajectory,
        f"--model={tiny_lm}",
        "--lens=logit",
        "--prompt=To be, or not to be",
        f"--out={out}",
        "--statistic=rank",
    )
    assert done.status == 0, done.stderr
    height, width = mpimg.imread(out).shape[:2]
    assert (width, height) == plotting.heatmap_size_px(num_tokens, 3 + 1)  # 3 layers + output


def test_metric_curves_draw_the_evaluation(tmp_path):
    layers = 4
    result = {
        name: {
            key: list(np.arange(layers) * scale + i) for i, (key, _) in enumerate(plotting._PANELS)
        }
        for name, scale in (("logit", 2.0), ("tuned", 1.0))
    }
    result["baseline"] = {"ce_bpb": 0.5, "entropy_bpb": 0.7}
    fig = plotting.metric_curves_png(result, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert len(fig.axes) == 3
    for ax, (key, _) in zip(fig.axes, plotting._PANELS, strict=True):
        np.testing.assert_array_equal(ax.lines[0].get_ydata(), result["logit"][key])
        np.testing.assert_array_equal(ax.lines[1].get_ydata(), result["tuned"][key])
    assert fig.axes[1].get_title().startswith("next-token cross-entropy")
    shifted = plotting.metric_curves_png(result | {"token_shift": -1}, tmp_path / "shifted.png")
    assert shifted.axes[1].get_title() == "cross-entropy to token i-1 [bits/byte]"
    del result["tuned"]["ce_bpb"]
    with pytest.raises(ValueError, match="tuned/ce_bpb"):
        plotting.metric_curves_png(result, tmp_path / "bad.png")
