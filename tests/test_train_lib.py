"""The training job end to end: a tiny real model on real Shakespeare text, real Orbax state."""

import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import save_tiny_lm

from configs import tiny
from jaxlens import lens_io, train_lib
from jaxlens.checkpointing import IncompatibleCheckpointError

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(model_dir, text_dir, **overrides):
    config = tiny.get_config()
    config.model.source = str(model_dir)
    config.data.source = str(text_dir)
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


def test_training_lowers_the_lens_loss_and_beats_the_logit_lens(tiny_lm, text_dir, tmp_path):
    config = _config(tiny_lm, text_dir, num_steps=12)
    result = train_lib.train_and_evaluate(config, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert records[-1]["loss_nats_mean"] < records[0]["loss_nats_mean"]
    assert np.mean(result["tuned"]["kl_nats"]) < np.mean(result["logit"]["kl_nats"])
    assert (tmp_path / "eval.png").stat().st_size > 0
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["logit"]["kl_nats"] == pytest.approx(result["logit"]["kl_nats"])


def _train_command(model_dir, text_dir, workdir, *extra):
    return [
        sys.executable,
        "-m",
        "jaxlens.train",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        f"--config.model.source={model_dir}",
        f"--config.data.source={text_dir}",
        *extra,
    ]


def test_a_killed_run_resumes_to_the_same_lens_and_data_order(tiny_lm, text_dir, tmp_path):
    """A closed-form start, then SGD: killed after a checkpoint, it resumes (without refitting)
    to the lens and the per-step losses of an uninterrupted run."""
    # Killed within ~50 ms of its first checkpoint (step 4), it is a few steps further at most:
    # 24 steps leave most of the run, and four more checkpoints, to the resume.
    steps = [
        "--config.num_steps=24",
        "--config.checkpoint_every=4",
        "--config.keep_checkpoints=50",
        "--config.init.method=least_squares",
        "--config.init.tokens=256",
    ]
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        _train_command(tiny_lm, text_dir, killed, *steps),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 300
        while not (killed / "checkpoints" / "4").is_dir():
            assert process.poll() is None, "the run ended before its first checkpoint"
            assert time.time() < deadline
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        process.kill()
    resumed_records = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert resumed_records[-1]["step"] < 24, "the run finished before it was killed"
    # The resumed and the uninterrupted run need no process of their own.
    config = _config(
        tiny_lm,
        text_dir,
        num_steps=24,
        checkpoint_every=4,
        keep_checkpoints=50,
        **{"init.method": "least_squares", "init.tokens": 256},
    )
    train_lib.train_and_evaluate(config, killed)
    whole = tmp_path / "whole"
    train_lib.train_and_evaluate(config, whole)

    a = lens_io.restore_translators(killed)
    b = lens_io.restore_translators(whole)
    np.testing.assert_allclose(a.kernel_ldd, b.kernel_ldd, atol=1e-6)
    np.testing.assert_allclose(a.bias_ld, b.bias_ld, atol=1e-6)
    # Same data order: every step's loss after the resume equals the uninterrupted run's.
    by_step = {}
    for line in (whole / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_step[record["step"]] = record["loss_nats_mean"]
    final = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    for record in final[len(resumed_records) :]:
        assert record["loss_nats_mean"] == pytest.approx(by_step[record["step"]], abs=1e-6)


# The multi-device runs' batches: 8 sequences of 32 tokens, so every device of both meshes below
# (4 x 2 in one process, 2 x 4 data-parallel over two) gets whole sequences. They start from a
# closed-form fit, kept as checkpoint 0, so they check the fit across meshes and processes too.
_MESH_RUN = {
    "tokens_per_step": 256,
    "num_steps": 4,
    "keep_checkpoints": 5,
    "init.method": "least_squares",
    "init.tokens": 256,
}


@pytest.fixture(scope="module")
def one_device_run(tiny_lm, text_dir, tmp_path_factory):
    """The run the multi-device and multi-process runs must reproduce, on one device."""
    directory = tmp_path_factory.mktemp("one_device")
    train_lib.train_and_evaluate(_config(tiny_lm, text_dir, **_MESH_RUN), directory)
    return directory


def _mesh_run_flags():
    return [f"--config.{key}={value}" for key, value in _MESH_RUN.items()]


def _assert_same_lens(a, b):
    """Two mesh runs' closed-form fits (checkpoint 0) agree within 1e-5 of the map's scale (the
    tolerance of tests/test_closed_form.py), and their trained lenses within 1e-5."""
    fit_a, fit_b = lens_io.restore_translators(a, step=0), lens_io.restore_translators(b, step=0)
    scale = np.abs(np.asarray(fit_a.kernel_ldd) + np.eye(fit_a.kernel_ldd.shape[-1])).max()
    assert np.abs(np.asarray(fit_a.kernel_ldd) - np.asarray(fit_b.kernel_ldd)).max() / scale < 1e-5
    assert np.abs(np.asarray(fit_a.kernel_ldd)).max() > 0.1  # a fit, not the zero start
    trained_a, trained_b = lens_io.restore_translators(a), lens_io.restore_translators(b)
    np.testing.assert_allclose(trained_a.kernel_ldd, trained_b.kernel_ldd, atol=1e-5)
    np.testing.assert_allclose(trained_a.bias_ld, trained_b.bias_ld, atol=1e-5)
    _assert_same_evaluation(a, b)


def test_eight_devices_train_the_same_lens_as_one(tiny_lm, text_dir, one_device_run, tmp_path):
    one = one_device_run
    eight = tmp_path / "eight"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    subprocess.run(
        _train_command(
            tiny_lm,
            text_dir,
            eight,
            *_mesh_run_flags(),
            "--config.mesh.data=4",
            "--config.mesh.model=2",
            "--config.mesh.shard_model_params=True",
        ),
        cwd=REPO,
        env=env,
        check=True,
    )
    _assert_same_lens(one, eight)


def _assert_same_evaluation(a, b):
    """The held-out evaluations (sharded over the mesh in the multi-device runs) agree."""
    x = json.loads((a / "eval.json").read_text())
    y = json.loads((b / "eval.json").read_text())
    assert x["tokens"] == y["tokens"]
    for lens in ("logit", "tuned"):
        for metric in ("kl_nats", "ce_bpb", "entropy_bpb"):
            np.testing.assert_allclose(x[lens][metric], y[lens][metric], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(x["baseline"]["ce_bpb"], y["baseline"]["ce_bpb"], rtol=1e-5)


# Bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"num_steps": 100_000}, r"The training split has \d+ sequences of 32 tokens"),
        ({"tokens_per_step": 100}, "must be a positive multiple of --config.data.seq_len=32"),
        ({"tokens_per_step": 0}, "must be a positive multiple of --config.data.seq_len=32"),
        ({"data.seq_len": 128, "tokens_per_step": 512}, "exceeds the model's 64 positions"),
        ({"micro_batches": 3}, "do not divide into 1 data-parallel devices x 3 micro-batches"),
        (
            {"init.method": "least_squares", "init.tokens": 10**7},
            r"--config.init.tokens=10000000 needs 312500 sequences of 32 tokens, but the "
            r"training split has \d+",
        ),
        (
            {"init.method": "least_squares", "init.ridge": 0.0, "init.tokens": 32},
            "singular",
        ),
    ],
)
def test_bad_config_is_refused_before_training(tiny_lm, text_dir, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train_lib.train_and_evaluate(_config(tiny_lm, text_dir, **overrides), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_the_closed_form_alone_is_a_lens_better_than_the_logit_lens_at_every_layer(
    tiny_lm, text_dir, tmp_path
):
    """num_steps=0: the fit is the lens; it is checkpointed (step 0), evaluated and exported."""
    config = _config(tiny_lm, text_dir, num_steps=0, **{"init.method": "least_squares"})
    result = train_lib.train_and_evaluate(config, tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["0"]
    assert not (tmp_path / "metrics.jsonl").exists()
    tuned, logit = np.array(result["tuned"]["kl_nats"]), np.array(result["logit"]["kl_nats"])
    assert np.all(tuned < logit) and tuned.mean() < 0.8 * logit.mean()
    bank = lens_io.restore_translators(tmp_path)
    assert np.abs(bank.kernel_ldd).max() > 0 and np.all(np.asarray(bank.bias_ld) == 0)


def test_a_failed_start_leaves_no_workdir_behind(tiny_lm, text_dir, tmp_path):
    workdir = tmp_path / "new"
    with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
        config = _config(tiny_lm, text_dir, **{"data.seq_len": 128, "tokens_per_step": 512})
        train_lib.train_and_evaluate(config, workdir)
    assert not workdir.exists()
    config = _config(tiny_lm, text_dir, lr_scale=1e30, clip_norm=0.0, checkpoint_every=100)
    with pytest.raises(train_lib.NonFiniteLossError):
        train_lib.train_and_evaluate(config, workdir)
    assert not workdir.exists()  # failed before its first checkpoint: nothing to resume


def _tree_digest(directory):
    digest = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            digest[str(path.relative_to(directory))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def test_an_incompatible_checkpoint_stops_the_run_and_is_kept(
    tiny_lm, text_dir, tmp_path, tokenizer
):
    train_lib.train_and_evaluate(_config(tiny_lm, text_dir, num_steps=2), tmp_path / "run")
    before = _tree_digest(tmp_path / "run")
    wider = save_tiny_lm(tmp_path / "wider", "llama", tokenizer, hidden_size=48, head_dim=12)
    with pytest.raises(IncompatibleCheckpointError, match="d_model"):
        train_lib.train_and_evaluate(_config(wider, text_dir, num_steps=2), tmp_path / "run")
    assert _tree_digest(tmp_path / "run") == before


def test_a_non_finite_loss_stops_the_run_naming_step_and_layers(tiny_lm, text_dir, tmp_path):
    config = _config(tiny_lm, text_dir, lr_scale=1e30, clip_norm=0.0)
    with pytest.raises(train_lib.NonFiniteLossError, match=r"at step \d+ in layers \[0"):
        train_lib.train_and_evaluate(config, tmp_path)


def test_two_processes_train_the_same_lens_as_one(tiny_lm, text_dir, one_device_run, tmp_path):
    """Two localhost processes with 4 simulated devices each, via jax.distributed: the
    closed-form fit (its statistics summed across the processes) and the training after it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = tmp_path / "two"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    processes = [
        subprocess.Popen(
            _train_command(
                tiny_lm,
                text_dir,
                two,
                *_mesh_run_flags(),
                "--config.distributed=True",
                f"--config.coordinator_address=127.0.0.1:{port}",
                "--config.num_processes=2",
                f"--config.process_id={i}",
            ),
            cwd=REPO,
            env=env,
        )
        for i in range(2)
    ]
    assert [p.wait(timeout=600) for p in processes] == [0, 0]
    _assert_same_lens(one_device_run, two)


def _tensorboard_scalars(directory):
    """Reads scalar summaries from TFRecord event files (framing and protobuf by hand)."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in directory.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_tensorboard_scalars_match_metrics_jsonl(tiny_lm, text_dir, tmp_path):
    config = _config(tiny_lm, text_dir, num_steps=3, tensorboard=True)
    train_lib.train_and_evaluate(config, tmp_path)
    scalars = _tensorboard_scalars(tmp_path / "tensorboard")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        assert scalars["grad_norm"][record["step"]] == pytest.approx(record["grad_norm"])
        for i, value in enumerate(record["loss_bpb_l"]):
            assert scalars[f"loss_bpb/layer_{i}"][record["step"]] == pytest.approx(value)
