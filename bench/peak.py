"""The machine's matrix-multiply peak, measured in a fresh process of the same run.

A square `n x n` product costs `2 n^3` FLOPs; the best of a few timed products (after one
warm-up) gives GFLOP/s. The float32 reference peak of a run is the best of jax (XLA) and numpy;
torch's float32 and bfloat16 products and jax's bfloat16 product (float32 accumulation) are
reported beside it, since tuned-lens as shipped and jaxlens bf16 run their matmuls in bfloat16.
On a CPU that emulates bfloat16 (`jaxlens.hardware`) the bfloat16 products are measured at
`EMULATED_SIZE` instead: PyTorch's runs at about 1 GFLOP/s there, and one 4096^2 product would
take minutes.
"""

from __future__ import annotations

import time

from jaxlens import hardware

EMULATED_SIZE = 512  # bfloat16 products' size where the CPU emulates bfloat16


def _bfloat16_size(n: int) -> int:
    return n if hardware.cpu_multiplies_bfloat16() else EMULATED_SIZE


def _best_gflops(run, n: int, repeats: int) -> float:
    run()  # warm-up (and, for jax, compilation)
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - began)
    return 2 * n**3 / best / 1e9


def measure_jax(n: int, repeats: int) -> dict:
    """jax float32, jax bfloat16 (float32 accumulation) and numpy float32 GFLOP/s."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    a, b = (np.random.default_rng(i).standard_normal((n, n), np.float32) for i in range(2))
    out = {}
    for name, dtype in (("jax_float32", jnp.float32), ("jax_bfloat16", jnp.bfloat16)):
        size = n if dtype == jnp.float32 else _bfloat16_size(n)
        x, y = jnp.asarray(a[:size, :size], dtype), jnp.asarray(b[:size, :size], dtype)
        product = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
        out[name] = _best_gflops(lambda: product(x, y).block_until_ready(), size, repeats)  # noqa: B023
    out["numpy_float32"] = _best_gflops(lambda: a @ b, n, repeats)
    return out


def measure_torch(n: int, repeats: int) -> dict:
    """torch float32 and bfloat16 GFLOP/s."""
    import torch

    out = {}
    for name, dtype in (("torch_float32", torch.float32), ("torch_bfloat16", torch.bfloat16)):
        size = n if dtype == torch.float32 else _bfloat16_size(n)
        x, y = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        out[name] = _best_gflops(lambda: x @ y, size, repeats)  # noqa: B023
    return out
