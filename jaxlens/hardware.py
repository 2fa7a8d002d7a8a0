"""What this machine's processor can do fast: bfloat16 matrix products or not.

On GPUs and TPUs, and on CPUs with bfloat16 matrix instructions (Intel AMX, AVX-512 BF16),
a bfloat16 matmul with float32 accumulation runs about 1.7-3x as fast as float32. On other CPUs
(e.g. AVX2-only x86) bfloat16 is emulated: XLA's bfloat16 unembedding ran 1.4x slower than
float32 on a 2-core AVX2 EPYC, and PyTorch's bfloat16 matmul at about 1 GFLOP/s there, 100x
slower than its float32 one. Callers that pick a dtype for speed ask `fast_bfloat16_matmul`.
"""

from __future__ import annotations

import functools
import pathlib

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
