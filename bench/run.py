"""`python -m bench.run`: jaxlens against tuned-lens, training and evaluation, side by side.

    .venv/bin/python -m bench.run                  # full run, about 25 min on a 2-core CPU
    .venv/bin/python -m bench.run --quick          # smoke run of every path, about 2-3 min
    .venv/bin/python -m bench.run --cases gpt2-small --repeats 3 --out bench/results/x.json

In order: the models and token batches are prepared; the matrix-multiply peak is measured in
fresh processes; for each case, jaxlens and tuned-lens (float32) compute per-layer losses from the
same random non-zero translators (two training steps, then the evaluation metrics), and a case
that disagrees beyond `TOLERANCES` is not timed; then every (repeat, case, implementation) runs in
its own fresh process, the implementations interleaved in an order rotated each repeat; then peak
memory at several step sizes, and the matmul peak again. The tables are printed and everything,
raw runs included, is written as JSON. The exit status is 1 if any parity check or child fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np

from bench import cases as cases_lib
from bench import report
from bench.cases import IMPLS, Case
from bench.children import ROOT, Children, machine, thread_settings, versions
from jaxlens import hardware

# Parity limits on |jaxlens - tuned-lens| / max(1, |tuned-lens|), float32, for the training losses
# and the evaluation metrics (the latest full run's worst: 1.1e-5 and 4.2e-6, on SmolLM2).
TOLERANCES = {"train": 1e-4, "eval": 1e-4}
NUM_STEPS = 250  # the schedule's length (tuned-lens's default); only its first steps run
PARITY_SHAPE = (2, 32)  # sequences x tokens of each parity batch


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument("--repeats", type=int, help="repeats of every case (default: per case)")
    parser.add_argument("--cases", nargs="+", help=f"cases to time, from {list(cases_lib.CASES)}")
    parser.add_argument(
        "--impls",
        nargs="+",
        default=default_impls(),
        help=f"implementations, from {list(IMPLS)} (default: all of them, less the bfloat16 ones "
        "on a CPU that emulates bfloat16, where they run 100x slower)",
    )
    parser.add_argument(
        "--bf16-repeats",
        type=int,
        help="run jaxlens-bf16 in the first N repeats of every case (default: per case, 1 for "
        "gpt2-4x256, 0 for the others)",
    )
    parser.add_argument("--out", help="JSON output (default bench/results/latest.json)")
    parser.add_argument(
        "--memory-case",
        default=cases_lib.MEMORY_CASE,
        help="the case whose peak memory is measured at several step sizes",
    )
    parser.add_argument(
        "--memory-tokens", type=int, nargs="+", help="tokens per step of the memory runs"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory runs")
    parser.add_argument(
        "--parity-info",
        choices=("first", "all", "none"),
        default="first",
        help="cases whose bfloat16 implementations' deviations are also measured",
    )
    parser.add_argument("--chunk-tokens", type=int, help="jaxlens chunk_tokens (default: config)")
    parser.add_argument(
        "--tl-micro-batch",
        type=int,
        help="sequences per tuned-lens micro-batch (its --per_gpu_batch_size; default: the "
        "whole step, one backward per layer per step, as jaxlens's one micro-batch)",
    )
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per child process")
    parser.add_argument("--keep-workdir", action="store_true", help="keep models and logs")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.impls) - set(IMPLS))
    if unknown:
        parser.error(f"unknown implementation(s) {unknown}; choose from {list(IMPLS)}")
    if args.out is None:
        name = "quick.json" if args.quick else "latest.json"
        args.out = str(ROOT / "bench" / "results" / name)
    return args


def default_impls() -> list[str]:
    """Every implementation, less the bfloat16 ones where this CPU has no bfloat16 matrix
    instructions: there PyTorch's bfloat16 matmul runs about 100x slower than its float32 one,
    and a tuned-lens-shipped run would take hours (`jaxlens.hardware`)."""
    if hardware.cpu_multiplies_bfloat16():
        return list(IMPLS)
    return [name for name, impl in IMPLS.items() if not impl.bfloat16]


# Preparation -------------------------------------------------------------------------------


def prepare_model(children: Children, case: Case, workdir: pathlib.Path) -> dict[str, str]:
    """Where each side reads the case's model: `{"jax": source, "torch": directory}`.

    A random GPT-2 is saved once as safetensors and both sides read that directory. For SmolLM2,
    jaxlens reads the cached GGUF file itself ("embedded:smollm2") and tuned-lens a safetensors
    copy that transformers' GGUF reader writes once (the same weights; parity checks it).
    """
    directory = workdir / f"model-{case.name}"
    if not directory.is_dir():
        children.say(f"prepare {case.name} (L={case.n_layer}, d={case.n_embd})")
        spec = {"task": "prepare", "case": case.to_dict(), "model": str(directory), "seed": 0}
        if "error" in children.run(f"prepare {case.name}", spec):
            raise RuntimeError(f"Could not prepare the model of {case.name}.")
    jax_source = case.source if case.source == cases_lib.SMOLLM2_SOURCE else str(directory)
    return {"jax": jax_source, "torch": str(directory)}


def save_batches(path: pathlib.Path, case: Case, steps: int, seed: int) -> str:
    """`steps` batches of token ids `[steps, batch, seq_len]`, drawn uniformly."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, case.vocab_size, (steps, case.batch, case.seq_len), dtype=np.int32)
    np.save(path, ids)
    return str(path)


def save_translators(path: pathlib.Path, case: Case, seed: int) -> str:
    """Random non-zero translators: `h + h @ W + b` moves h by about 10% of its norm."""
    rng = np.random.default_rng(seed)
    layers, d = case.n_layer, case.n_embd
    kernel = rng.standard_normal((layers, d, d), np.float32) * np.float32(0.1 / np.sqrt(d))
    bias = rng.standard_normal((layers, d), np.float32) * np.float32(0.1)
    np.savez(path, kernel_ldd=kernel, bias_ld=bias)
    return str(path)


# Stages ------------------------------------------------------------------------------------


def measure_peak(children: Children, quick: bool, libraries: tuple[str, ...]) -> dict:
    """GFLOP/s of large square matmuls, each library in a fresh process."""
    size, repeats = (2048, 2) if quick else (4096, 2)
    out = {"size": size}
    for library in libraries:
        spec = {"task": "peak", "library": library, "size": size, "repeats": repeats}
        out.update(children.run(f"peak {library}", spec).get("gflops", {}))
    children.say(
        "matmul GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in out.items() if k != "size")
    )
    return out


def float32_peak(peaks: dict) -> float:
    """The run's float32 reference: the best jax or numpy product, at the start or the end."""
    values = [
        p[k] for p in peaks.values() if isinstance(p, dict)
        for k in ("jax_float32", "numpy_float32") if k in p
    ]  # fmt: skip
    return max(values) if values else float("nan")


def check_parity(children, case, models, workdir, args, info: bool) -> dict:
    """Both float32 implementations from the same translators and tokens; with `info`, the
    bfloat16 ones too, for information (they are not expected to agree to 1e-4)."""
    small = dataclasses.replace(case, batch=PARITY_SHAPE[0], seq_len=PARITY_SHAPE[1])
    spec = {
        "task": "parity",
        "case": small.to_dict(),
        "batches": save_batches(workdir / f"parity-{case.name}.npy", small, 2, seed=1),
        "translators": save_translators(workdir / f"parity-{case.name}.npz", case, seed=2),
        "num_steps": NUM_STEPS,
        "chunk_tokens": args.chunk_tokens,
        "tl_batch": args.tl_micro_batch,
    }
    names = ["tuned-lens-f32", "jaxlens"]
    if info:
        names += [n for n in ("tuned-lens-shipped", "jaxlens-bf16") if n in args.impls]
    results = {}
    for name in names:
        impl = dataclasses.asdict(IMPLS[name])
        source = models[IMPLS[name].side]
        results[name] = children.run(
            f"parity {case.name} {name}", dict(spec, impl=impl, model=source)
        )
    reference = results["tuned-lens-f32"]
    comparisons = {}
    for name in names[1:]:
        if "error" in results[name] or "error" in reference:
            comparisons[name] = {"ok": False, "why": "a child failed", "gating": True}
            continue
        comparisons[name] = report.compare(results[name], reference, TOLERANCES)
        comparisons[name]["gating"] = IMPLS[name].reference
    ok = all(c["ok"] for c in comparisons.values() if c["gating"])
    children.say(f"parity {case.name}: {'PASS' if ok else 'FAIL'}")
    return {"ok": ok, "tolerances": TOLERANCES, "comparisons": comparisons, "results": results}


def run_throughput(children, timed, models, workdir, args) -> list[dict]:
    runs = []
    batches = {
        c.name: save_batches(workdir / f"batches-{c.name}.npy", c, c.train_steps + 1, seed=3)
        for c in timed
    }
    for repeat in range(max((c.repeats for c in timed), default=0)):
        for case in timed:
            if repeat >= case.repeats:
                continue
            names = [
                n for n in args.impls if not (n == "jaxlens-bf16" and repeat >= case.bf16_repeats)
            ]
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                spec = {
                    "task": "throughput",
                    "case": case.to_dict(),
                    "impl": dataclasses.asdict(IMPLS[name]),
                    "model": models[case.name][IMPLS[name].side],
                    "batches": batches[case.name],
                    "num_steps": NUM_STEPS,
                    "chunk_tokens": args.chunk_tokens,
                    "tl_batch": args.tl_micro_batch,
                }
                result = children.run(f"throughput {case.name} {name} r{repeat}", spec)
                result.update(case=case.to_dict(), impl=spec["impl"], repeat=repeat)
                runs.append(result)
                children.say(_progress(result))
    return runs


def _progress(run: dict) -> str:
    label = f"{run['case']['name']} {run['impl']['name']} r{run['repeat']}"
    if "error" in run:
        return f"{label}: FAILED"
    m = report.run_metrics(run, 1.0)
    evals = f"{m['eval_tokens_per_s']:.1f}" if m["eval_tokens_per_s"] else "-"
    return (
        f"{label}: train {m['train_tokens_per_s']:.1f} tok/s, eval {evals} tok/s, first step "
        f"{m['first_step_s']:.1f} s, loop RSS {m['train_loop_peak_rss_mib']:.0f} MiB "
        f"({run['child_wall_s']:.0f} s)"
    )


def run_memory(children, models, workdir, args) -> list[dict]:
    runs = []
    for case in cases_lib.memory_cases(args.memory_case, args.quick, args.memory_tokens):
        path = workdir / f"memory-{case.name}-{case.tokens_per_step}.npy"
        batches = save_batches(path, case, 2, seed=4)
        for name in [n for n in cases_lib.MEMORY_IMPLS if n in args.impls]:
            spec = {
                "task": "throughput",
                "case": case.to_dict(),
                "impl": dataclasses.asdict(IMPLS[name]),
                "model": models[case.name][IMPLS[name].side],
                "batches": batches,
                "num_steps": NUM_STEPS,
                "chunk_tokens": args.chunk_tokens,
                "tl_batch": args.tl_micro_batch,
            }
            label = f"memory {case.name} {case.tokens_per_step} {name}"
            result = children.run(label, spec)
            result.update(case=case.to_dict(), impl=spec["impl"])
            runs.append(result)
            if "error" not in result:
                children.say(f"{label}: loop peak RSS {result['train_rss']['peak_mib']:.0f} MiB")
    return runs


# Main --------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    timed_cases = cases_lib.select(args.cases, args.quick)
    if args.repeats:
        timed_cases = [dataclasses.replace(c, repeats=args.repeats) for c in timed_cases]
    if args.bf16_repeats is not None:
        timed_cases = [dataclasses.replace(c, bf16_repeats=args.bf16_repeats) for c in timed_cases]
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="jaxlens-bench-"))
    children = Children(workdir, args.timeout)
    record = {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "args": vars(args),
        "load_avg_start": os.getloadavg(),
        "versions": versions(),
        "machine": machine(),
        "workdir": str(workdir),
    }
    children.say(f"work directory {workdir}; load average {record['load_avg_start']}")
    try:
        refused = run_stages(children, record, timed_cases, workdir, args)
    finally:
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    record["load_avg_end"] = os.getloadavg()
    record["wall_s"] = time.perf_counter() - children.began
    peak = record["peak"]["float32_peak_gflops"] = float32_peak(record["peak"])
    record["summary"] = report.summarize_throughput(record["runs"], peak, cases_lib.RATIOS)
    record["memory"] = report.summarize_memory(record["memory_runs"])
    record["thread_settings"] = thread_settings(record["runs"] + record["memory_runs"])
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(report.tables(record))
    print(f"\nWritten {out} ({record['wall_s'] / 60:.1f} min).")
    return 1 if refused or children.failures else 0


def run_stages(children, record: dict, timed_cases: list[Case], workdir, args) -> list[str]:
    """Fills `record` stage by stage; returns the cases refused for failing parity."""
    memory_cases = [] if args.no_memory else [cases_lib.CASES[args.memory_case]]
    models = {c.name: prepare_model(children, c, workdir) for c in [*timed_cases, *memory_cases]}
    record["peak"] = {"start": measure_peak(children, args.quick, ("jax", "torch"))}
    record["parity"] = {}
    for i, case in enumerate(timed_cases):
        info = args.parity_info == "all" or (args.parity_info == "first" and i == 0)
        record["parity"][case.name] = check_parity(
            children, case, models[case.name], workdir, args, info
        )
    timed = [c for c in timed_cases if record["parity"][c.name]["ok"]]
    refused = [c.name for c in timed_cases if c not in timed]
    if refused:
        children.say(f"NOT timing {refused}: their losses differ from tuned-lens's")
    record["runs"] = run_throughput(children, timed, models, workdir, args)
    record["memory_runs"] = [] if args.no_memory else run_memory(children, models, workdir, args)
    record["peak"]["end"] = measure_peak(children, args.quick, ("jax",))
    return refused


if __name__ == "__main__":
    sys.exit(main())
