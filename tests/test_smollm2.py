"""The real embedded model: SmolLM2-135M-Instruct from its GGUF, torch-free, against PyTorch."""

import numpy as np
import pytest
import torch

from jaxlens import assets


@pytest.fixture(scope="module")
def passage_ids(smollm2):
    return smollm2.tokenize(assets.shakespeare_passage())[:, :96]


def test_facts_of_the_real_model(smollm2):
    assert (smollm2.num_layers, smollm2.d_model, smollm2.vocab_size) == (30, 576, 49152)
    assert smollm2.config.rope_theta == 100000.0
    assert smollm2.config.tie_word_embeddings
    assert smollm2.model_type == "llama"


def test_logits_match_transformers_gguf_loading_in_pytorch(smollm2, torch_smollm2, passage_ids):
    with torch.no_grad():
        want = torch_smollm2(torch.tensor(passage_ids)).logits.numpy()
    got = np.asarray(smollm2(passage_ids).logits_btv)
    relative = np.abs(got - want).max() / np.abs(want).max()
    assert relative < 1e-3, relative


def _next_token_loss(logits_tv, ids) -> float:
    """Mean next-token cross-entropy (nats/token), in float64 numpy."""
    logits = np.asarray(logits_tv[:-1], np.float64)
    logits -= logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return float(-log_probs[np.arange(len(log_probs)), ids[0, 1:]].mean())


def test_loss_on_shakespeare_is_that_of_the_real_model(smollm2, torch_smollm2, passage_ids):
    """The loss equals PyTorch's on the same weights, and is the known 3.08 nats/token of this
    passage's first 96 tokens (a random or mis-tied head would give about ln 49152 = 10.8)."""
    loss = _next_token_loss(smollm2(passage_ids).logits_btv[0], passage_ids)
    with torch.no_grad():
        want = _next_token_loss(torch_smollm2(torch.tensor(passage_ids)).logits[0], passage_ids)
    assert loss == pytest.approx(want, rel=1e-4)
    assert loss == pytest.approx(3.08, abs=0.02)


def test_load_model_knows_the_embedded_default_by_name(smollm2):
    from jaxlens.models import load_model

    again = load_model("embedded:smollm2")
    assert again.name_or_path == smollm2.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (again.num_layers, again.d_model) == (smollm2.num_layers, smollm2.d_model)
