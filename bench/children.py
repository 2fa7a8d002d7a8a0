"""Running the benchmark's child processes, and what the parent records about the machine.

`Children` starts `python -m bench.worker SPEC` one process at a time, each with its spec, output
and log in the run's work directory, so that measurements never overlap on the machine's cores.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

from jaxlens import hardware

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "numpy",
    "torch",
    "tuned-lens",
    "transformers",
    "safetensors",
)


class Children:
    """Runs child processes one at a time, each with its spec, output and log in `workdir`."""

    def __init__(self, workdir: pathlib.Path, timeout: int):
        self.workdir = workdir
        self.timeout = timeout
        self.count = 0
        self.began = time.perf_counter()
        self.failures = 0

    def run(self, label: str, spec: dict) -> dict:
        self.count += 1
        stem = self.workdir / f"{self.count:03d}-{label.replace(' ', '_').replace('/', '_')}"
        spec = dict(spec, out=str(stem.with_suffix(".out.json")))
        stem.with_suffix(".spec.json").write_text(json.dumps(spec))
        log = stem.with_suffix(".log")
        command = [sys.executable, "-m", "bench.worker", str(stem.with_suffix(".spec.json"))]
        began = time.perf_counter()
        try:
            with log.open("w") as f:
                code = subprocess.run(
                    command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=self.timeout
                ).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        wall = time.perf_counter() - began
        if code != 0:
            self.failures += 1
            tail = log.read_text()[-3000:]
            print(f"  !! {label} failed ({code}) after {wall:.0f} s; log tail:\n{tail}", flush=True)
            return {"error": f"exit {code}", "log_tail": tail, "child_wall_s": wall}
        result = json.loads(pathlib.Path(spec["out"]).read_text())
        result["child_wall_s"] = wall
        return result

    def say(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.began:6.0f} s] {message}", flush=True)


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine() -> dict:
    info = pathlib.Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                  if line.startswith("model name")), platform.processor())  # fmt: skip
    memory = pathlib.Path("/proc/meminfo").read_text().splitlines()[0]
    return {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "flags": sorted(
            ({"avx512f", "amx_tile"} | hardware.BF16_MATMUL_CPU_FLAGS) & hardware.cpu_flags()
        ),
        "memory": memory.split(":", 1)[1].strip(),
        "platform": platform.platform(),
        "thread_env": {
            k: os.environ.get(k, "")
            for k in ("XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
        },
    }


def thread_settings(runs: list[dict]) -> dict:
    """Each side's threads and flags, as its first successful child reported them."""
    out = {}
    for run in runs:
        if "environment" in run:
            out.setdefault(run["impl"]["side"], run["environment"])
    return out
