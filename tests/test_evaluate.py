"""Evaluation metrics against an independent computation (PyTorch head, numpy float64 maths)."""

import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models
import torch

from jaxlens.lens import TunedLens
from jaxlens.losses import layer_metrics
from jaxlens.models import load_model


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("chunk", [5, 4096])
def test_layer_metrics_equal_numpy_on_pytorch_logits(tmp_path, chunk):
    torch_model = tiny_models.build("gptj", seed=21)
    model = load_model(tiny_models.save(torch_model, tmp_path))
    ids = np.random.default_rng(0).integers(0, model.vocab_size, size=(3, 8))
    num_layers = model.num_layers
    translators = tiny_models.random_translators(num_layers, model.d_model, seed=1, scale=0.1)
    hidden = model(ids).hidden_lbtd
    lens = TunedLens(decoder=model.decoder(), translators=translators)
    got = layer_metrics(lens, hidden[:-1], hidden[-1], jnp.asarray(ids), chunk_tokens=chunk)

    with torch.no_grad():
        out = torch_model(torch.tensor(ids), output_hidden_states=True)
        log_p = _log_softmax(out.logits.numpy().astype(np.float64))
        head, norm = torch_model.get_output_embeddings(), tiny_models.final_norm_module(torch_model)
        for layer in range(num_layers):
            h = out.hidden_states[layer]
            moved = h + h @ torch.tensor(np.asarray(translators.kernel_ldd[layer]))
            moved = moved + torch.tensor(np.asarray(translators.bias_ld[layer]))
            log_q = _log_softmax(head(norm(moved)).numpy().astype(np.float64))
            kl = (np.exp(log_p) * (log_p - log_q)).sum(-1).mean()
            ce = -np.take_along_axis(log_q[:, :-1], ids[:, 1:, None], -1).mean()
            entropy = -(np.exp(log_q) * log_q).sum(-1).mean()
            np.testing.assert_allclose(got["kl"][layer], kl, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got["ce"][layer], ce, rtol=1e-5)
            np.testing.assert_allclose(got["entropy"][layer], entropy, rtol=1e-5)
    base_ce = -np.take_along_axis(log_p[:, :-1], ids[:, 1:, None], -1).mean()
    base_entropy = -(np.exp(log_p) * log_p).sum(-1).mean()
    np.testing.assert_allclose(got["baseline_ce"], base_ce, rtol=1e-5)
    np.testing.assert_allclose(got["baseline_entropy"], base_entropy, rtol=1e-5)


def test_evaluate_command_writes_tuned_lens_metrics_equal_to_tuned_lens_own_logit_lens(
    tokenizer, text_dir, tmp_path
):
    import json

    import transformers
    from conftest import save_tiny_lm
    from tuned_lens.nn.lenses import LogitLens as TorchLogitLens

    from configs import tiny
    from jaxlens import data as data_lib
    from jaxlens.evaluate import evaluate_lens

    model_dir = save_tiny_lm(tmp_path / "gpt2", "gpt2", tokenizer)
    config = tiny.get_config()
    config.model.source = str(model_dir)
    config.data.source = str(text_dir)
    result = evaluate_lens(config, "logit", tmp_path / "out", tokens=128)
    saved = json.loads((tmp_path / "out" / "aggregate_metrics.json").read_text())
    assert set(saved) == {"logit", "tuned", "baseline"}
    assert set(saved["logit"]) == {"ce", "entropy", "kl"}
    assert list(saved["logit"]["kl"]) == ["layer_0", "layer_1", "layer_2"]
    assert result["tokens"] == 128

    # tuned-lens's own logit lens and metric formulas (its eval loop), on the same tokens.
    corpus = data_lib.tokenize_corpus(
        data_lib.load_texts(str(text_dir)), tokenizer, config.data.seq_len
    )
    _, heldout = data_lib.split_heldout(
        corpus, heldout_chunks=config.data.heldout_sequences, seed=config.seed
    )
    ids = torch.tensor(heldout.chunks[:4].astype(np.int64))
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    lens = TorchLogitLens.from_model(torch_model)
    with torch.no_grad():
        out = torch_model(ids, output_hidden_states=True)
        final_lps = out.logits.log_softmax(-1)
        for i, h in enumerate(out.hidden_states[:-1]):
            lps = lens(h, idx=i).log_softmax(-1)
            ce = torch.nn.functional.cross_entropy(lps[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            entropy = (-lps.exp() * lps).sum(-1).mean()
            kl = (final_lps.exp() * (final_lps - lps)).sum(-1).mean()
            for name, value in (("ce", ce), ("entropy", entropy), ("kl", kl)):
                want = value.item() * heldout.nats_to_bpb
                assert saved["logit"][name][f"layer_{i}"] == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_a_token_budget_larger_than_the_data_is_refused(tiny_lm, text_dir, tmp_path):
    from configs import tiny
    from jaxlens.evaluate import evaluate_lens

    config = tiny.get_config()
    config.model.source = str(tiny_lm)
    config.data.source = str(text_dir)
    with pytest.raises(ValueError, match=r"--tokens=100000 exceeds the 256 held-out tokens"):
        evaluate_lens(config, "logit", tmp_path / "out", tokens=100_000)


def test_layer_transfer_equals_numpy_on_pytorch_logits(tmp_path):
    from jaxlens.losses import transfer_metrics

    torch_model = tiny_models.build("gpt2", seed=22)
    model = load_model(tiny_models.save(torch_model, tmp_path))
    ids = np.random.default_rng(0).integers(0, model.vocab_size, size=(2, 6))
    num_layers = model.num_layers
    translators = tiny_models.random_translators(num_layers, model.d_model, seed=1, scale=0.2)
    hidden = model(ids).hidden_lbtd
    lens = TunedLens(decoder=model.decoder(), translators=translators)
    got = transfer_metrics(lens, hidden[:-1], jnp.asarray(ids), chunk_tokens=5)

    head, norm = torch_model.get_output_embeddings(), tiny_models.final_norm_module(torch_model)
    with torch.no_grad():
        out = torch_model(torch.tensor(ids), output_hidden_states=True)

        def log_q(i, j):
            h = out.hidden_states[j]
            moved = h + h @ torch.tensor(np.asarray(translators.kernel_ldd[i]))
            moved = moved + torch.tensor(np.asarray(translators.bias_ld[i]))
            return _log_softmax(head(norm(moved)).numpy().astype(np.float64))

        for j in range(num_layers):
            own = log_q(j, j)
            for i in range(num_layers):
                moved = log_q(i, j)
                ce = -np.take_along_axis(moved[:, :-1], ids[:, 1:, None], -1).mean()
                kl = (np.exp(own) * (own - moved)).sum(-1).mean()
                np.testing.assert_allclose(got["ce"][i, j], ce, rtol=1e-5)
                np.testing.assert_allclose(got["kl"][i, j], kl, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.diag(got["kl"]), 0.0, atol=1e-5)


def test_layer_transfer_files_nest_as_tuned_lens_and_agree_with_the_layer_metrics(
    tiny_lm, text_dir, tmp_path
):
    import json

    from configs import tiny
    from jaxlens.evaluate import evaluate_lens

    config = tiny.get_config()
    config.model.source = str(tiny_lm)
    config.data.source = str(text_dir)
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
    """The command on a 2x2 mesh (bank and frozen weights split over "model") vs one device."""
    import json
    import os
    import pathlib
    import subprocess
    import sys

    from configs import tiny
    from jaxlens import lens_io
    from jaxlens.evaluate import evaluate_lens

    model = load_model(tiny_lm)
    translators = tiny_models.random_translators(model.num_layers, model.d_model, seed=3)
    lens_dir = lens_io.save_lens(tmp_path / "lens", translators, model)
    config = tiny.get_config()
    config.model.source = str(tiny_lm)
    config.data.source = str(text_dir)
    evaluate_lens(config, str(lens_dir), tmp_path / "one")
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


def test_metrics_keep_their_digits_when_all_logits_are_large(tmp_path):
    """Adding a constant to every logit changes no distribution, so no metric may move; a
    formula that subtracts two logit-sized numbers (lse - sum q z) would lose ~1e-4 here."""
    import dataclasses

    torch_model = tiny_models.build("gptj", seed=23)
    model = load_model(tiny_models.save(torch_model, tmp_path))
    ids = np.random.default_rng(2).integers(0, model.vocab_size, size=(2, 8))
    translators = tiny_models.random_translators(model.num_layers, model.d_model, seed=4)
    hidden = model(ids).hidden_lbtd
    decoder = model.decoder()
    shifted = dataclasses.replace(decoder, unembed_bias_v=decoder.unembed_bias_v + 3000.0)
    results = [
        layer_metrics(
            TunedLens(decoder=d, translators=translators),
            hidden[:-1],
            hidden[-1],
            jnp.asarray(ids),
            chunk_tokens=7,
        )
        for d in (decoder, shifted)
    ]
    for key in results[0]:
        np.testing.assert_allclose(results[1][key], results[0][key], rtol=1e-5, atol=2e-6)
