"""Config files: each loads, states the command that runs it, and the base comments every field."""

import importlib
import pathlib
import re

import pytest

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
RUNNABLE = sorted(p.stem for p in CONFIGS.glob("*.py") if p.stem not in ("__init__", "hub_common"))


@pytest.mark.parametrize("name", RUNNABLE)
def test_config_loads_and_its_docstring_is_the_run_command(name):
    module = importlib.import_module(f"configs.{name}")
    config = module.get_config()
    assert f"python -m jaxlens.train --config=configs/{name}.py" in module.__doc__
    base = importlib.import_module("configs.base").get_config()
    assert set(config.keys()) == set(base.keys()), "configs override fields; they never add any"


def test_every_base_field_has_a_comment():
    source = (CONFIGS / "base.py").read_text()
    fields = re.findall(r"^    c\.[\w.]+ = (?!ml_collections).*$", source, flags=re.M)
    assert len(fields) > 30
    uncommented = [line for line in fields if "#" not in line]
    assert not uncommented, uncommented


# Chips in a Cloud TPU accelerator type: v4 and v5p names count TensorCores (2 a chip), v5e and
# v6e names count chips (Cloud TPU's "TPU versions" pages).
_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v5litepod": 1, "v6e": 1}
HUB = sorted(
    name for name in RUNNABLE if hasattr(importlib.import_module(f"configs.{name}"), "TOPOLOGY")
)


def _chips(topology: str) -> int:
    generation, count = topology.split("-")
    return int(count) // _CORES_PER_CHIP[generation]


def test_every_hub_config_names_its_topology():
    assert set(HUB) == set(RUNNABLE) - {"base", "tiny", "smollm2_shakespeare"}


@pytest.mark.parametrize("name", HUB)
def test_hub_config_mesh_and_step_fit_its_topology(name):
    module = importlib.import_module(f"configs.{name}")
    config = module.get_config()
    chips = _chips(module.TOPOLOGY)
    assert module.TOPOLOGY in module.__doc__
    assert chips % config.mesh.model == 0, (chips, config.mesh.model)
    data = chips // config.mesh.model if config.mesh.data == -1 else config.mesh.data
    assert data * config.mesh.model <= chips
    sequences = config.tokens_per_step // config.data.seq_len
    assert sequences % (data * config.micro_batches) == 0, (sequences, data, config.micro_batches)


@pytest.mark.parametrize("name", HUB)
def test_hub_config_sequences_fit_the_models_positions(name):
    from jaxlens.models.published_configs import published_config

    config = importlib.import_module(f"configs.{name}").get_config()
    published = published_config(config.model.source)
    positions = published.get("max_position_embeddings", published.get("n_positions"))
    assert config.data.seq_len <= positions
