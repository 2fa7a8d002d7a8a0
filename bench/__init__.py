"""Benchmark harness: jaxlens's training and evaluation steps against tuned-lens's, side by side.

Run `python -m bench.run` (see `bench/run.py` for the options). The parent process only
orchestrates: every measurement runs in a fresh child process (`bench/worker.py`), one at a time,
so that no implementation inherits another's imports, threads, caches or heap.

Modules: `run` (the stages), `cases` (what is measured), `flops` (the FLOP count both sides
share), `children` (starting the child processes; machine facts), `worker` (the child entry point),
`jax_side` / `torch_side` (the two implementations), `memory` (resident-set sampling), `peak` (the
matrix-multiply peak), `report` (statistics, parity comparison, tables).
"""
