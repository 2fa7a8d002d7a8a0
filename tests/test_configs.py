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
