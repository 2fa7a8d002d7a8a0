"""`python -m bench.eval_vs_train`: jaxlens's evaluation step against its own training step, in
pairs, back to back in one process.

`bench.run` times training and evaluation in separate processes and repeats, so on a shared
machine whose speed drifts by about 10% within minutes, their ratio carries that drift. Here one
child process (`jax_side.paired`) builds both steps exactly as `bench.run`'s throughput runs do
(the same config, model, step size and ahead-of-time compilation), runs each once untimed, then
alternates a training step and an evaluation step `--pairs` times. Each pair's ratio compares two
steps that ran seconds apart; the median of the ratios is printed with the tokens per second of
each.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import shutil
import sys
import tempfile

import numpy as np

from bench.cases import CASES, IMPLS
from bench.children import Children
from bench.run import NUM_STEPS, prepare_model, save_batches


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=["gpt2-small", "smollm2"], choices=CASES)
    parser.add_argument("--pairs", type=int, default=6, help="train/eval step pairs per case")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per child process")
    args = parser.parse_args()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="jaxlens-eval-vs-train-"))
    children = Children(workdir, args.timeout)
    try:
        for name in args.cases:
            case = CASES[name]
            spec = {
                "task": "paired",
                "case": case.to_dict(),
                "impl": dataclasses.asdict(IMPLS["jaxlens"]),
                "model": prepare_model(children, case, workdir)["jax"],
                "batches": save_batches(workdir / f"batches-{name}.npy", case, 2, seed=3),
                "num_steps": NUM_STEPS,
                "pairs": args.pairs,
            }
            result = children.run(f"paired {name}", spec)
            if "error" in result:
                continue
            train_s, eval_s = np.array(result["train_step_s"]), np.array(result["eval_step_s"])
            tokens = case.tokens_per_step
            children.say(
                f"{name}: train {np.median(tokens / train_s):.1f} tok/s, "
                f"eval {np.median(tokens / eval_s):.1f} tok/s, "
                f"eval vs training {np.median(train_s / eval_s):.2f}x "
                f"(pairs: {' '.join(f'{r:.2f}' for r in train_s / eval_s)})"
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if children.failures else 0


if __name__ == "__main__":
    sys.exit(main())
