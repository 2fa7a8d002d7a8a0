"""`jaxlens.hardware`: which processors multiply bfloat16 matrices natively."""

import pathlib

import pytest

from jaxlens import hardware


@pytest.mark.parametrize(
    "backend, flags, fast",
    [
        ("cpu", {"avx2", "fma"}, False),  # emulated: slower than float32
        ("cpu", {"avx512f", "avx512_bf16"}, True),
        ("cpu", {"amx_tile", "amx_bf16"}, True),
        ("gpu", set(), True),
        ("tpu", set(), True),
    ],
)
def test_bfloat16_is_fast_on_accelerators_and_cpus_with_bfloat16_matrix_instructions(
    backend, flags, fast
):
    assert hardware.fast_bfloat16_matmul(backend, frozenset(flags)) is fast


def test_cpu_flags_are_read_from_proc_cpuinfo():
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        assert hardware.cpu_flags() == frozenset()
        return
    first = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags"))
    assert set(first.split(":", 1)[1].split()) <= hardware.cpu_flags()
    assert "fpu" in hardware.cpu_flags()
