"""The table of published architectures: every model a shipped config names is in it, each entry
builds a transformers config that jaxlens's Flax models accept, and its parameter count (from the
abstract parameter tree; nothing allocated) is the one the model's card publishes, within 1%."""

import importlib
import math
import pathlib

import jax
import jax.numpy as jnp
import pytest
import transformers

from jaxlens.models.published_configs import PUBLISHED_CONFIGS, published_config
from jaxlens.models.subject import SubjectModel

# Parameter counts as the model cards (or the hub's safetensors summary) publish them.
PUBLISHED_PARAMETERS = {
    "gpt2": 124.44e6,
    "EleutherAI/pythia-410m-deduped": 405.33e6,
    "HuggingFaceTB/SmolLM2-1.7B": 1.71e9,
    "mistralai/Mistral-7B-v0.1": 7.24e9,
    "google/gemma-2b": 2.51e9,
    "Qwen/Qwen3-0.6B": 0.6e9,
    "google/gemma-2-2b": 2.61e9,
    "google/gemma-2-9b": 9.24e9,
    "google/gemma-3-1b-pt": 1.0e9,
    "allenai/OLMo-2-0425-1B": 1.48e9,
    "microsoft/Phi-3-mini-4k-instruct": 3.82e9,
    "mistralai/Mixtral-8x7B-v0.1": 46.7e9,
    "openai/gpt-oss-20b": 20.9e9,
}

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def test_every_shipped_hub_config_names_a_model_in_the_table():
    named = set()
    for path in sorted(CONFIGS.glob("*.py")):
        if path.stem in ("__init__", "hub_common", "base", "tiny", "smollm2_shakespeare"):
            continue
        named.add(importlib.import_module(f"configs.{path.stem}").get_config().model.source)
    assert named <= set(PUBLISHED_CONFIGS), named - set(PUBLISHED_CONFIGS)
    assert set(PUBLISHED_PARAMETERS) == set(PUBLISHED_CONFIGS)


@pytest.mark.parametrize("hub_id", sorted(PUBLISHED_CONFIGS))
def test_published_config_builds_with_the_published_parameter_count(hub_id):
    config = transformers.AutoConfig.for_model(**published_config(hub_id))
    shapes = SubjectModel.flax_model_for(config, jnp.bfloat16).params_shape_tree
    count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))
    assert count == pytest.approx(PUBLISHED_PARAMETERS[hub_id], rel=0.01)


def test_published_config_is_a_copy_and_unknown_ids_give_none():
    entry = published_config("google/gemma-2-9b")
    entry["hidden_size"] = 1
    assert published_config("google/gemma-2-9b")["hidden_size"] == 3584
    assert published_config("nobody/no-such-model") is None
