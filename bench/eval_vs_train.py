"""`python -m bench.eval_vs_train`: jaxlens's evaluation step against its own training step, in
pairs, back to back in one process.

`bench.run` times training and evaluation in separate processes and repeats, so on a shared
machine whose speed drifts by about 10% within minutes, their ratio carries that drift. Here one
process builds both steps exactly as `bench.run` does (`jax_side.Runner`: the same config, model,
step size and ahead-of-time compilation), runs each once untimed, then alternates a training step
and an evaluation step `--pairs` times on the same batches. Each pair's ratio compares two steps
that ran seconds apart; the median of the ratios is printed with the tokens per second of each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("USE_TORCH", "0")  # transformers imports torch whenever it is installed

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import jax_side  # noqa: E402
from bench.cases import CASES, IMPLS, SMOLLM2_SOURCE  # noqa: E402
from bench.children import ROOT  # noqa: E402


def _model_source(case, workdir: pathlib.Path) -> str:
    """The embedded SmolLM2, or the case's random GPT-2 saved as `bench.run` saves it."""
    if case.source == SMOLLM2_SOURCE:
        return case.source
    directory = workdir / f"model-{case.name}"
    # In a child process, as in `bench.run`, so that torch is never imported here.
    code = (
        "import json, sys; from bench import torch_side; "
        "torch_side.save_model(*json.loads(sys.argv[1]))"
    )
    arguments = json.dumps([case.to_dict(), str(directory), 0])
    env = {k: v for k, v in os.environ.items() if k != "USE_TORCH"}
    subprocess.run([sys.executable, "-c", code, arguments], cwd=ROOT, env=env, check=True)
    return str(directory)


def measure(case_name: str, pairs: int, workdir: pathlib.Path) -> dict:
    case = CASES[case_name]
    ids_nbt = np.random.default_rng(3).integers(
        0, case.vocab_size, (2, case.batch, case.seq_len), dtype=np.int32
    )
    np.save(workdir / "batches.npy", ids_nbt)
    spec = {
        "case": case.to_dict(),
        "impl": dataclasses.asdict(IMPLS["jaxlens"]),
        "model": _model_source(case, workdir),
        "batches": str(workdir / "batches.npy"),
        "num_steps": 1000,
    }
    runner = jax_side.Runner(spec)
    batches = runner.batches(ids_nbt)
    state = runner.state(jax_side.zero_translators(runner.model))
    train = runner.compile_train(state, batches[0])
    evaluate = runner.compile_eval(state.translators, batches[0])
    state, _ = jax.block_until_ready(train(state, runner.params, batches[0]))
    jax.block_until_ready(evaluate(state.translators, runner.params, batches[0]))
    train_s, eval_s = [], []
    for i in range(pairs):
        ids_bt = batches[i % len(batches)]
        began = time.perf_counter()
        state, _ = jax.block_until_ready(train(state, runner.params, ids_bt))
        train_s.append(time.perf_counter() - began)
        began = time.perf_counter()
        jax.block_until_ready(evaluate(state.translators, runner.params, ids_bt))
        eval_s.append(time.perf_counter() - began)
    tokens = case.tokens_per_step
    return {
        "case": case_name,
        "train_tok_s": [tokens / s for s in train_s],
        "eval_tok_s": [tokens / s for s in eval_s],
        "eval_vs_train": [t / e for t, e in zip(train_s, eval_s, strict=True)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=["gpt2-small", "smollm2"], choices=CASES)
    parser.add_argument("--pairs", type=int, default=6, help="train/eval step pairs per case")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="jaxlens-eval-vs-train-") as workdir:
        for name in args.cases:
            result = measure(name, args.pairs, pathlib.Path(workdir))
            print(
                f"{name}: train {np.median(result['train_tok_s']):.1f} tok/s, "
                f"eval {np.median(result['eval_tok_s']):.1f} tok/s, "
                f"eval vs training {np.median(result['eval_vs_train']):.2f}x "
                f"(pairs: {' '.join(f'{r:.2f}' for r in result['eval_vs_train'])})",
                flush=True,
            )


if __name__ == "__main__":
    main()
