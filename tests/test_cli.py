"""Every command fails like a Unix tool: one `error:` line (and a hint), exit status 2 for bad
usage or input, 1 for a failed run, no traceback unless --debug; bad config and data are found
before the model loads, and a failed run leaves no workdir behind.

The commands run in this process (`conftest.run_command`), exactly as their console scripts do.
"""

import os

import pytest
from conftest import run_command

from jaxlens import cli, evaluate, export, train, trajectory


def _assert_fails(result, status: int, *fragments: str) -> None:
    assert result.status == status, (result.status, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert lines and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def _train(tmp_path, *args, model="./no-such-model-dir", data=None):
    """`jaxlens.train` on the tiny config; by default with a model that cannot load, so a test
    that passes shows its error was found before the model was needed."""
    if data is None:
        data = tmp_path / "text.txt"
        data.write_text("To be, or not to be, that is the question. " * 50)
    return run_command(
        train,
        "--config=configs/tiny.py",
        f"--workdir={tmp_path / 'run'}",
        f"--config.model.source={model}",
        f"--config.data.source={data}",
        *args,
    )


def test_a_missing_required_flag(tmp_path):
    result = run_command(train, "--config=configs/tiny.py")
    _assert_fails(result, 2, "--workdir", "hint: see jaxlens --help")


def test_an_unknown_flag_and_a_stray_argument(tmp_path):
    _assert_fails(_train(tmp_path, "--num_steps=3"), 2, "num_steps")
    _assert_fails(_train(tmp_path, "extra"), 2, "unexpected arguments: extra")


def test_a_misspelled_config_field_is_named_with_the_right_one(tmp_path):
    result = _train(tmp_path, "--config.num_stepz=3")
    _assert_fails(
        result, 2, "--config.num_stepz is not a config field; did you mean --config.num_steps?"
    )
    assert "\\n" not in result.stderr and "\\'" not in result.stderr
    result = _train(tmp_path, "--config.data.seq_lenn=3")
    _assert_fails(result, 2, "--config.data.seq_lenn is not a config field")
    assert "--config.data.seq_len?" in result.stderr


@pytest.mark.parametrize(
    "override,message",
    [
        ("tokens_per_step=0", "--config.tokens_per_step=0 must be a positive multiple of"),
        ("tokens_per_step=100", "use e.g. 96"),
        ("num_steps=0", "--config.num_steps=0 must be at least 1"),
        ("loss=mse", "--config.loss='mse' must be one of ['ce', 'kl']"),
        ("model.dtype=float64", "--config.model.dtype='float64' must be one of"),
        ("data.seq_len=1", "--config.data.seq_len=1 must be at least 2"),
        ("bias=False", "--config.bias_only=True needs --config.bias=True"),
    ],
)
def test_bad_config_values_are_refused_before_the_model_loads(tmp_path, override, message):
    extra = ["--config.bias_only=True"] if override == "bias=False" else []
    _assert_fails(_train(tmp_path, f"--config.{override}", *extra), 2, message)
    assert not (tmp_path / "run").exists()


def test_missing_and_non_utf8_text_is_refused_before_the_model_loads(tmp_path):
    _assert_fails(_train(tmp_path, data=tmp_path / "nothing.txt"), 2, "nothing.txt")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Caf\u00e9 society, a long line of text.\n".encode("latin-1") * 20)
    result = _train(tmp_path, data=latin1)
    _assert_fails(result, 2, "latin1.txt", "byte 3", "UTF-8")
    assert not (tmp_path / "run").exists()


def test_a_model_that_cannot_load(tmp_path):
    _assert_fails(_train(tmp_path), 2, "no-such-model-dir")
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(tmp_path):
    result = _train(tmp_path, "--config.num_steps=0", "--debug")
    assert result.status == 2
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --config.num_steps=0")


def test_help_is_not_an_error():
    result = run_command(export, "--help")
    assert result.status == 0, result.stderr
    assert "--workdir" in result.stdout and "--[no]debug" in result.stdout, result.stdout
    assert result.stdout.startswith("Exports a training checkpoint")


def test_a_run_that_fails_on_good_input_exits_1(tiny_lm, text_dir, tmp_path):
    result = _train(
        tmp_path,
        "--config.lr_scale=1e30",
        "--config.clip_norm=0",
        "--config.checkpoint_every=100",
        model=tiny_lm,
        data=text_dir,
    )
    _assert_fails(result, 1, "Non-finite loss at step", "Lower --config.lr_scale")
    assert not (tmp_path / "run").exists()  # no checkpoint was written: nothing to keep


def test_export_from_a_directory_that_is_not_a_workdir(tmp_path):
    result = run_command(export, f"--workdir={tmp_path}", f"--out={tmp_path / 'lens'}")
    _assert_fails(result, 2, "is not a jaxlens training workdir")
    assert not (tmp_path / "lens").exists()


def test_evaluate_with_a_lens_that_is_not_there(tmp_path):
    result = run_command(
        evaluate,
        "--config=configs/tiny.py",
        "--config.model.source=./no-such-model-dir",
        "--lens=./no/such/lens",
        f"--out={tmp_path / 'out'}",
        "--tokens=-1",
    )
    _assert_fails(result, 2, "--tokens")


def test_trajectory_refuses_a_picture_it_cannot_write_before_loading(tmp_path):
    result = run_command(
        trajectory, "--model=./no-such-model-dir", "--lens=logit", "--prompt=Hi", "--out=fig.jpg"
    )
    _assert_fails(result, 2, "--out=fig.jpg must end in .png")
    result = run_command(
        trajectory, "--model=./no-such-model-dir", "--lens=logit", "--prompt= ", "--out=f.png"
    )
    _assert_fails(result, 2, "--prompt is empty")


@pytest.mark.parametrize("preset,seen", [(None, "0"), ("1", "1")])
def test_a_command_tells_transformers_to_leave_torch_out(monkeypatch, preset, seen):
    """A command's process reads everything torch-free, so transformers need not import torch
    (2 s per start); a user's own USE_TORCH setting wins."""
    monkeypatch.setenv("USE_TORCH", preset or "")  # so that monkeypatch restores it afterwards
    if preset is None:
        monkeypatch.delenv("USE_TORCH")
    seen_by_job = []
    main = cli.main_of(
        cli.command_flags(), lambda flags: seen_by_job.append(os.environ["USE_TORCH"])
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["jaxlens-test"])
    assert exit_info.value.code == 0 and seen_by_job == [seen]
