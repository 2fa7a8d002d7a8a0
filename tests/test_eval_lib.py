"""The evaluation job: tuned-lens's files and numbers, token budgets, layer transfer, meshes."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tiny_models
import torch

from configs import tiny
from jaxlens import eval_report, lens_io
from jaxlens.eval_lib import evaluate_lens
from jaxlens.models import load_model


def _tiny_config(tiny_lm, text_dir):
    config = tiny.get_config()
    config.model.source = str(tiny_lm)
    config.data.source = str(text_dir)
    return config


def _random_lens(tiny_lm, directory, seed):
    """The tiny model and a lens file of random translators for it."""
    model = load_model(tiny_lm)
    translators = tiny_models.random_translators(model.num_layers, model.d_model, seed=seed)
    return model, lens_io.save_lens(directory, translators, model)


def _heldout(config, text_dir, tokenizer):
    """The held-out split the evaluation job reads (its `chunks` are `[n, seq_len]` token ids)."""
    from jaxlens import data as data_lib

    corpus = data_lib.tokenize_corpus(
        data_lib.load_texts(str(text_dir)), tokenizer, config.data.seq_len
    )
    _, heldout = data_lib.split_heldout(
        corpus, heldout_chunks=config.data.heldout_sequences, seed=config.seed
    )
    return heldout


@pytest.mark.parametrize("token_shift", [1, -1])
def test_evaluate_command_writes_tuned_lens_metrics_equal_to_tuned_lens_own_logit_lens(
    tokenizer, text_dir, tmp_path, token_shift
):
    """Against tuned-lens's logit lens, metric formulas and label shifting (its `shift_labels`
    and `shift_preds`), for the next token and for tuned-lens's `--token_shift=-1`."""
    import transformers
    from conftest import save_tiny_lm
    from tuned_lens.nn.lenses import LogitLens as TorchLogitLens
    from tuned_lens.utils import shift_labels, shift_preds

    model_dir = save_tiny_lm(tmp_path / "gpt2", "gpt2", tokenizer)
    config = tiny.get_config()
    config.model.source = str(model_dir)
    config.data.source = str(text_dir)
    result = evaluate_lens(config, "logit", tmp_path / "out", tokens=128, token_shift=token_shift)
    saved = json.loads((tmp_path / "out" / "aggregate_metrics.json").read_text())
    assert set(saved) == {"logit", "tuned", "baseline"}
    assert set(saved["logit"]) == {"ce", "entropy", "kl"}
    assert list(saved["logit"]["kl"]) == ["layer_0", "layer_1", "layer_2"]
    assert result["tokens"] == 128

    # tuned-lens's own logit lens and metric formulas (its eval loop), on the same tokens.
    heldout = _heldout(config, text_dir, tokenizer)
    ids = torch.tensor(heldout.chunks[:4].astype(np.int64))
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    lens = TorchLogitLens.from_model(torch_model)
    with torch.no_grad():
        out = torch_model(ids, output_hidden_states=True)
        final_lps = out.logits.log_softmax(-1)
        for i, h in enumerate(out.hidden_states[:-1]):
            lps = lens(h, idx=i).log_softmax(-1)
            ce = torch.nn.functional.cross_entropy(
                shift_preds(lps, token_shift).flatten(0, 1),
                shift_labels(ids, token_shift).flatten(),
            )
            entropy = (-lps.exp() * lps).sum(-1).mean()
            kl = (final_lps.exp() * (final_lps - lps)).sum(-1).mean()
            for name, value in (("ce", ce), ("entropy", entropy), ("kl", kl)):
                want = value.item() * heldout.nats_to_bpb
                assert saved["logit"][name][f"layer_{i}"] == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_recorded_logit_stats_equal_tuned_lens_logit_stats_of_its_own_lenses(
    tiny_lm, tokenizer, text_dir, tmp_path
):
    """`--record_logit_stats` against tuned-lens's `LogitStats`, fed as its eval loop feeds it:
    each batch's log-probabilities of tuned-lens's own logit lens and of the jaxlens lens file
    loaded in tuned-lens, over all 256 held-out tokens (two batches); and each lens's bias, the KL
    between the model's and the lens's mean distributions."""
    import transformers
    from tuned_lens.nn.lenses import LogitLens as TorchLogitLens
    from tuned_lens.nn.lenses import TunedLens as TorchTunedLens
    from tuned_lens.stats import LogitStats

    model, lens_dir = _random_lens(tiny_lm, tmp_path / "lens", seed=5)
    config = _tiny_config(tiny_lm, text_dir)
    result = evaluate_lens(config, str(lens_dir), tmp_path / "out", record_logit_stats=True)
    saved = json.loads((tmp_path / "out" / "logit_stats.json").read_text())
    assert "logit_stats" not in json.loads((tmp_path / "out" / "eval.json").read_text())

    heldout = _heldout(config, text_dir, tokenizer)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    lenses = {
        "logit": TorchLogitLens.from_model(torch_model),
        "tuned": TorchTunedLens.from_model_and_pretrained(torch_model, lens_dir),
    }
    recorders = {(name, i): LogitStats() for name in lenses for i in range(model.num_layers)}
    final = LogitStats()
    with torch.no_grad():
        for batch in heldout.chunks.reshape(-1, config.eval_batch_size, config.data.seq_len):
            out = torch_model(torch.tensor(batch.astype(np.int64)), output_hidden_states=True)
            final.update(out.logits.log_softmax(-1), assume_normalized=True)
            for i, h in enumerate(out.hidden_states[:-1]):
                for name, lens in lenses.items():
                    lps = lens(h, idx=i).log_softmax(-1)
                    recorders[name, i].update(lps, assume_normalized=True)
    assert set(saved) == {"logit", "tuned", "baseline"}
    for (name, i), recorder in recorders.items():
        np.testing.assert_allclose(
            saved[name]["logit_stats"][f"layer_{i}"],
            recorder.marginal_probs.numpy(),
            rtol=1e-4,
            atol=1e-9,
        )
    np.testing.assert_allclose(
        saved["baseline"]["logit_stats"]["final"], final.marginal_probs.numpy(), rtol=1e-4
    )
    assert saved["tuned"]["logit_stats"]["layer_0"] != saved["logit"]["logit_stats"]["layer_0"]
    assert "bias, KL(model's mean distribution || lens's)" in eval_report.format_table(result)
    # Each lens's bias: KL(model's mean distribution || the lens's), in float64 from tuned-lens's.
    p = final.marginal_probs.numpy().astype(np.float64)
    for name in lenses:
        for i in range(model.num_layers):
            q = recorders[name, i].marginal_probs.numpy().astype(np.float64)
            want = (p * (np.log(p) - np.log(q))).sum()
            got = result[name]["marginal_kl_nats"][i]
            assert got == pytest.approx(want, rel=1e-4, abs=1e-7)


def test_a_token_budget_beyond_the_data_or_a_shift_beyond_the_sequence_is_refused(
    tiny_lm, text_dir, tmp_path
):

    config = _tiny_config(tiny_lm, text_dir)
    with pytest.raises(ValueError, match=r"--tokens=100000 exceeds the 256 held-out tokens"):
        evaluate_lens(config, "logit", tmp_path / "out", tokens=100_000)
    with pytest.raises(ValueError, match=r"token_shift=-32 leaves no label in sequences of 32"):
        evaluate_lens(config, "logit", tmp_path / "out", token_shift=-32)
    assert not (tmp_path / "out").exists()


def test_layer_transfer_files_nest_as_tuned_lens_and_agree_with_the_layer_metrics(
    tiny_lm, text_dir, tmp_path
):

    config = _tiny_config(tiny_lm, text_dir)
    # The logit lens: every translator is the identity, so translator i on layer j is layer j.
    evaluate_lens(config, "logit", tmp_path, tokens=64, layer_transfer=True)
    saved = json.loads((tmp_path / "aggregate_metrics.json").read_text())
    transfer = saved["tuned"]["layer_transfer"]
    layers = list(saved["logit"]["ce"])
    assert list(transfer["ce"]) == layers and list(transfer["ce"]["layer_0"]) == layers
    for i in layers:
        for j in layers:
            assert transfer["ce"][i][j] == pytest.approx(saved["logit"]["ce"][j], rel=1e-5)
            assert transfer["kl"][i][j] == pytest.approx(0.0, abs=1e-5)


def test_evaluation_sharded_over_four_devices_equals_one_device(tiny_lm, text_dir, tmp_path):
    """The command on a 2x2 mesh (bank and frozen weights split over "model") vs one device,
    with `--record_logit_stats`."""

    _, lens_dir = _random_lens(tiny_lm, tmp_path / "lens", seed=3)
    config = _tiny_config(tiny_lm, text_dir)
    evaluate_lens(config, str(lens_dir), tmp_path / "one", record_logit_stats=True)
    repo = pathlib.Path(__file__).resolve().parents[1]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxlens.evaluate",
            "--config=configs/tiny.py",
            f"--config.model.source={tiny_lm}",
            f"--config.data.source={text_dir}",
            "--config.mesh.data=2",
            "--config.mesh.model=2",
            "--config.mesh.shard_model_params=True",
            f"--lens={lens_dir}",
            f"--out={tmp_path / 'four'}",
            "--record_logit_stats",
        ],
        cwd=repo,
        env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4"),
        check=True,
    )
    one = json.loads((tmp_path / "one" / "aggregate_metrics.json").read_text())
    four = json.loads((tmp_path / "four" / "aggregate_metrics.json").read_text())
    assert one.keys() == four.keys()
    for lens in one:
        for metric in one[lens]:
            for layer, value in one[lens][metric].items():
                assert four[lens][metric][layer] == pytest.approx(value, rel=1e-5, abs=1e-6)
    assert one["tuned"]["kl"] != one["logit"]["kl"]  # the lens is not the identity
    one, four = (
        json.loads((tmp_path / run / "logit_stats.json").read_text()) for run in ("one", "four")
    )
    assert one.keys() == four.keys()
    for lens in one:
        for layer, probs in one[lens]["logit_stats"].items():
            np.testing.assert_allclose(
                four[lens]["logit_stats"][layer], probs, rtol=1e-5, atol=1e-9
            )
