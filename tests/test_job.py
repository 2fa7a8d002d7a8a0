"""The shared job set-up: what it checks, in which order, and the corpora it builds."""

import pytest

from configs import tiny
from jaxlens import job


def _config(model, text, **overrides):
    config = tiny.get_config()
    config.model.source, config.data.source = str(model), str(text)
    for key, value in overrides.items():
        config[key] = value
    return config


def test_setup_builds_disjoint_corpora_of_the_configured_shape(tiny_lm, text_dir):
    setup = job.setup(_config(tiny_lm, text_dir))
    assert setup.model.num_layers == 3
    assert setup.train.chunks.shape[1] == setup.heldout.chunks.shape[1] == 32
    assert len(setup.heldout.chunks) == 8
    train_rows = {row.tobytes() for row in setup.train.chunks}
    assert not any(row.tobytes() in train_rows for row in setup.heldout.chunks)
    assert setup.train.nats_to_bpb == pytest.approx(setup.heldout.nats_to_bpb, rel=0.2)
    assert setup.mesh.shape == {"data": 1, "model": 1}


def test_the_text_is_read_before_the_model_is_loaded(tmp_path):
    """A wrong text path is reported even when the model could not load either."""
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        job.setup(_config(tmp_path / "no-model", tmp_path / "missing.txt"))


def test_config_values_are_checked_before_anything_else(tmp_path):
    with pytest.raises(ValueError, match="--config.num_steps=0 must be at least 1"):
        job.setup(_config(tmp_path / "no-model", tmp_path / "missing.txt", num_steps=0))


def test_a_batch_that_does_not_divide_over_the_mesh_is_refused_only_for_training(tmp_path):
    config = _config(tmp_path / "no-model", tmp_path / "missing.txt", micro_batches=3)
    with pytest.raises(ValueError, match="1 data-parallel devices x 3 micro-batches"):
        job.setup(config)
    with pytest.raises(FileNotFoundError):  # evaluation has no step batch: it reads the text
        job.setup(config, training=False)


def test_every_base_default_passes_validation():
    from configs import base

    job.validate_config(base.get_config())
