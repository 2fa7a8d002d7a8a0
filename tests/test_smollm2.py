"""The real embedded model: SmolLM2-135M-Instruct from its GGUF, torch-free, against PyTorch."""

import numpy as np
import pytest
import torch
import transformers

from jaxlens import assets
from jaxlens.models import load_embedded_default


@pytest.fixture(scope="module")
def smollm2():
    return load_embedded_default()


@pytest.fixture(scope="module")
def passage_ids(smollm2):
    return smollm2.tokenize(assets.shakespeare_passage())[:, :96]


def test_facts_of_the_real_model(smollm2):
    assert (smollm2.num_layers, smollm2.d_model, smollm2.vocab_size) == (30, 576, 49152)
    assert smollm2.config.rope_theta == 100000.0
    assert smollm2.config.tie_word_embeddings
    assert smollm2.model_type == "llama"


def test_logits_match_transformers_gguf_loading_in_pytorch(smollm2, passage_ids):
    path = assets.smollm2_gguf_path()
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, torch_dtype=torch.float32
    ).eval()
    with torch.no_grad():
        want = torch_model(torch.tensor(passage_ids)).logits.numpy()
    got = np.asarray(smollm2(passage_ids).logits_btv)
    relative = np.abs(got - want).max() / np.abs(want).max()
    assert relative < 1e-3, relative


def _next_token_loss(model, ids) -> float:
    """Mean next-token cross-entropy (nats/token), in float64 numpy."""
    logits = np.asarray(model(ids).logits_btv[0, :-1], np.float64)
    logits -= logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return float(-log_probs[np.arange(len(log_probs)), ids[0, 1:]].mean())


def test_loss_on_shakespeare_is_that_of_a_real_language_model(smollm2, passage_ids):
    loss = _next_token_loss(smollm2, passage_ids)
    assert 1.0 < loss < 4.0, loss


def test_load_model_knows_the_embedded_default_by_name(smollm2):
    from jaxlens.models import load_model

    again = load_model("embedded:smollm2")
    assert again.name_or_path == smollm2.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (again.num_layers, again.d_model) == (smollm2.num_layers, smollm2.d_model)
