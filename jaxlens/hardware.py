"""What this machine's processor can do fast: bfloat16 matrix products or not.

On GPUs and TPUs, and on CPUs with bfloat16 matrix instructions (Intel AMX, AVX-512 BF16),
a bfloat16 matmul with float32 accumulation runs about 1.7-3x as fast as float32. On other CPUs
(e.g. AVX2-only x86) bfloat16 is emulated: XLA's bfloat16 unembedding ran 1.4x slower than
float32 on a 2-core AVX2 EPYC, and PyTorch's bfloat16 matmul at about 1 GFLOP/s there, 100x
slower than its float32 one. Callers that pick a dtype for speed ask `fast_bfloat16_matmul`.
"""

from __future__ import annotations

import functools
import os
import pathlib
import sys

# CPU flags (as /proc/cpuinfo names them) of instructions that multiply bfloat16 matrices natively.
BF16_MATMUL_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def fast_bfloat16_matmul(backend: str, flags: frozenset[str]) -> bool:
    """Whether bfloat16 matmuls beat float32 on `backend` ("cpu", "gpu", "tpu") with these CPU
    flags (only read for "cpu")."""
    return backend != "cpu" or bool(flags & BF16_MATMUL_CPU_FLAGS)


def cpu_multiplies_bfloat16() -> bool:
    """Whether this machine's CPU multiplies bfloat16 matrices natively (faster than float32)."""
    return fast_bfloat16_matmul("cpu", cpu_flags())


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(
        flag
        for line in text.splitlines()
        if line.startswith("flags")
        for flag in line.partition(":")[2].split()
    )


# PCI vendor id of Google, whose only PCI devices on a machine are its TPU chips.
_GOOGLE_PCI_VENDOR = "0x1ae0"


def has_tpu_chips() -> bool:
    """Whether a TPU chip is attached to this machine (a Google PCI device, as JAX checks)."""
    try:
        vendors = pathlib.Path("/sys/bus/pci/devices").glob("*/vendor")
        return any(v.read_text().strip() == _GOOGLE_PCI_VENDOR for v in vendors)
    except OSError:
        return False


def keep_libtpu_off_tpu_less_hosts() -> None:
    """Keeps JAX from loading libtpu on a machine without TPU chips, unless told otherwise.

    libtpu is installed on machines without a TPU so that `jaxlens plan` can compile for TPU
    topologies. Left alone, JAX then loads it in every process, which prints libtpu's
    TPU_WORKER_HOSTNAMES / TPU_ACCELERATOR_TYPE errors at start-up and finds no chip anyway.
    Naming the other platforms in JAX_PLATFORMS (before JAX starts a backend) avoids that;
    compiling for a TPU topology still works. A JAX_PLATFORMS the user set is kept.
    """
    import importlib.util

    if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
        return
    if has_tpu_chips():
        return
    cuda = any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13))
    gpu = cuda and pathlib.Path("/proc/driver/nvidia").exists()
    os.environ["JAX_PLATFORMS"] = platforms = "cuda,cpu" if gpu else "cpu"
    if "jax" in sys.modules:  # JAX read the variable when it was imported
        sys.modules["jax"].config.update("jax_platforms", platforms)
