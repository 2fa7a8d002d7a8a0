"""The child process: one measurement, described by a JSON spec file, answered in a JSON file.

    python -m bench.worker SPEC.json

Spec `task`: "peak" (matrix-multiply peak of `library`), "prepare" (save the model of `case`
for PyTorch to `model`), "snapshots" (tuned-lens's training loop from zeros, translators saved
at given steps: `torch_side.train_snapshots`), "throughput" (time training and evaluation
steps; memory runs are throughput runs without evaluation), "parity" (losses from given
translators) or "paired" (jaxlens only: training and evaluation steps alternated,
`jax_side.paired`). These last three import only their implementation's side: a jaxlens child
never imports torch (transformers is told not to, with USE_TORCH=0), and a tuned-lens child
never imports jax.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

from bench.memory import MIB, max_rss_bytes, rss_bytes


def run(spec: dict) -> dict:
    task = spec["task"]
    if task == "peak":
        from bench import peak

        measure = peak.measure_jax if spec["library"] == "jax" else peak.measure_torch
        return {"gflops": measure(spec["size"], spec["repeats"])}
    if task == "prepare":
        from bench import torch_side

        torch_side.save_model(spec["case"], spec["model"], spec["seed"])
        return {}
    if task == "snapshots":
        from bench import torch_side

        return torch_side.train_snapshots(spec)
    if task not in ("throughput", "parity", "paired"):
        raise ValueError(f"Unknown task {task!r}.")
    if spec["impl"]["side"] == "jax":
        # transformers imports torch whenever it is installed; jaxlens never uses it.
        os.environ["USE_TORCH"] = "0"
        from bench import jax_side as side
    else:
        from bench import torch_side as side
    result = getattr(side, task)(spec)
    result["environment"] = side.environment()
    return result


def main(argv: list[str]) -> None:
    spec = json.loads(pathlib.Path(argv[1]).read_text())
    began = time.perf_counter()
    load_start = os.getloadavg()
    result = run(spec)
    result.update(
        load_avg_start=load_start,
        load_avg_end=os.getloadavg(),
        wall_s=time.perf_counter() - began,
        ru_maxrss_mib=max_rss_bytes() / MIB,
        final_rss_mib=rss_bytes() / MIB,
    )
    pathlib.Path(spec["out"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv)
