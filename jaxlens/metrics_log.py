"""The training log: one JSON line per log step in `workdir/metrics.jsonl`, a progress line on
stdout, and optionally TensorBoard scalars (tensorboardX). Only process 0 writes."""

from __future__ import annotations

import json
import math
import pathlib

import jax


class MetricsLog:
    """Appends training records; use as a context manager so TensorBoard files are closed."""

    def __init__(self, workdir: pathlib.Path, *, num_steps: int, tensorboard: bool = False):
        self._writes = jax.process_index() == 0
        self._path = workdir / "metrics.jsonl"
        self._num_steps = num_steps
        self._board = _tensorboard(workdir) if tensorboard and self._writes else None

    def write(self, record: dict, *, eta_seconds: float) -> None:
        """Logs `record` (`step`, `loss_bpb_l`, `loss_nats_mean`, `grad_norm`, `learning_rate`,
        `tokens_per_second`) everywhere this log writes to."""
        if not self._writes:
            return
        with self._path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._board is not None:
            _log_scalars(self._board, record)
        print(
            f"step {record['step']}/{self._num_steps}  loss {record['loss_nats_mean']:.3f} nats "
            f"(mean over layers)  {record['tokens_per_second']:,.0f} tok/s  "
            f"ETA {_duration(eta_seconds)}",
            flush=True,
        )

    def close(self) -> None:
        if self._board is not None:
            self._board.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _tensorboard(workdir: pathlib.Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError as error:
        raise ImportError(
            "--config.tensorboard=True needs tensorboardX: pip install tensorboardX"
        ) from error
    return SummaryWriter(str(workdir / "tensorboard"))


def _log_scalars(board, record: dict) -> None:
    step = record["step"]
    for i, value in enumerate(record["loss_bpb_l"]):
        board.add_scalar(f"loss_bpb/layer_{i}", value, step)
    for key in ("loss_nats_mean", "grad_norm", "learning_rate", "tokens_per_second"):
        board.add_scalar(key, record[key], step)
    board.flush()


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"
