"""Time to quality: held-out KL of a tuned lens against its training wall time, SmolLM2/Shakespeare.

Run (73 minutes on a shared 2-core CPU; writes bench/results/time_to_quality.json and
docs/time_to_quality.png):
  .venv/bin/python -m bench.time_to_quality
  .venv/bin/python -m bench.time_to_quality --quick      # every path at tiny sizes, a few minutes

Data and model are the demo's (`configs/smollm2_shakespeare.py`): the embedded SmolLM2 on
Shakespeare, sequences of 256 tokens, steps of 1,024 tokens (4 sequences, the same batches in
the same order for every method), the same 8 held-out sequences (2,048 tokens). Methods:

  tuned-lens (peer)   tuned-lens 0.2.0's own training loop (`bench.torch_side`, its TunedLens,
                      optimizer and schedule, as shipped: bfloat16 autocast) from zero
                      translators, 20 steps, in a child process that never imports jax
  zeros + SGD         jaxlens's step with tuned-lens's recipe from zeros (`init.method=zeros`)
  closed form N       `closed_form.fit_translators` on N training tokens, the first N that the
                      training stream draws (a seeded sample of the split), λ = 1e-3
  closed form + X     the closed form on `--fit-tokens`, then `--finetune-steps` steps of X
                      (the tuned-lens SGD recipe, Adam with warmup, Muon), each with its
                      schedule over those steps, as `train_lib` runs `init.method=least_squares`

Wall time is training only: model loading, tokenization and evaluation are excluded on both
sides; jaxlens's compilation and the closed-form statistics pass are included. The three
fine-tuning runs share one closed-form fit, whose time is added to each. Every lens snapshot is
then evaluated by the same function: mean over tokens of KL(model || lens) per layer on the
held-out tokens (`metrics.layer_metrics`, what `eval_lib.evaluate` reports as `kl_nats`).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import time

os.environ.setdefault("USE_TORCH", "0")  # this process runs jaxlens only; torch is a child's

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from bench.cases import CASES  # noqa: E402
from bench.children import Children, machine, versions  # noqa: E402
from configs import smollm2_shakespeare  # noqa: E402
from jaxlens import closed_form, job  # noqa: E402
from jaxlens import data as data_lib  # noqa: E402
from jaxlens.lens import Translators  # noqa: E402
from jaxlens.metrics import layer_metrics  # noqa: E402
from jaxlens.optim import optimizer_from_config  # noqa: E402
from jaxlens.sharding import model_param_shardings  # noqa: E402
from jaxlens.step import TrainState, make_train_step  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
RIDGE = 1e-3


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.time_to_quality")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--steps", type=int, default=20, help="steps of the runs from zeros")
    parser.add_argument("--snapshots", default="5,10,20", help="steps evaluated (from zeros)")
    parser.add_argument("--budgets", default="2048,8192,16384,32768", help="closed form")
    parser.add_argument("--fit-tokens", type=int, default=16384, help="fit before fine-tuning")
    parser.add_argument("--finetune-steps", type=int, default=4)
    parser.add_argument("--finetune-snapshots", default="2,4")
    parser.add_argument("--optimizers", default="sgd,adam,muon")
    parser.add_argument("--out", default=str(ROOT / "bench/results/time_to_quality.json"))
    parser.add_argument("--png", default=str(ROOT / "docs/time_to_quality.png"))
    parser.add_argument("--report", metavar="JSON", help="only redraw the table and PNG of a run")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.snapshots, args.budgets = 2, "1,2", "512,1024"
        args.fit_tokens, args.finetune_steps, args.finetune_snapshots = 1024, 1, "1"
        args.out = str(ROOT / "bench/results/time_to_quality_quick.json")
        args.png = str(ROOT / "bench/results/time_to_quality_quick.png")
    return args


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def demo_config(num_steps: int, optimizer: str = "sgd"):
    config = smollm2_shakespeare.get_config()
    config.init.method = "zeros"
    config.num_steps = num_steps
    config.optimizer = optimizer
    return config


class Lab:
    """The demo's model and corpus, the step batches, and the one held-out KL function."""

    def __init__(self, steps: int):
        self.setup = job.setup(demo_config(steps))
        self.model = self.setup.model
        self.mesh = self.setup.mesh
        config = self.setup.config
        self.batch_size = job.sequences_per_step(config, self.mesh)
        stream = data_lib.ChunkStream(self.setup.train.chunks, seed=config.seed)
        batches = [stream.next_global_batch(self.batch_size) for _ in range(steps)]
        self.batches_sbt = np.stack(batches)
        self.param_shardings = model_param_shardings(self.model.params, self.mesh, False)
        self.params = jax.device_put(self.model.params, self.param_shardings)
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        heldout = np.asarray(self.setup.heldout.chunks, np.int32)
        forward = jax.jit(lambda p, i: self.model.apply(p, i).hidden_lbtd)
        self.heldout_ids = heldout
        self.heldout_hidden = forward(self.params, heldout)

        @jax.jit
        def kl_l(bank, decoder, hidden, ids):  # all arguments: no folding of [t, V] constants
            return layer_metrics(decoder, bank, hidden[:-1], hidden[-1], ids, chunk_tokens=128)[
                "kl"
            ]

        self._kl_l = kl_l

    def heldout_kl(self, bank: Translators | None) -> np.ndarray:
        """Per-layer mean KL(model || lens) in nats on the held-out tokens (None: logit lens)."""
        if bank is None:
            bank = Translators.zeros(self.model.num_layers, self.model.d_model)
        decoder = self.model.decoder(self.params)
        kl = self._kl_l(bank, decoder, self.heldout_hidden, self.heldout_ids)
        return np.asarray(kl, np.float64)

    def train(self, start: Translators, optimizer: str, steps: int, snapshots: list[int]):
        """jaxlens's jitted step from `start`, as `train_lib` builds and compiles it.

        Returns (wall seconds after each step, {step: translators on the host}); the clock
        includes compilation and stops while a snapshot is copied out.
        """
        config = demo_config(steps, optimizer)
        tx, schedule = optimizer_from_config(config)
        replicated = NamedSharding(self.mesh, P())
        step_fn = jax.jit(
            make_train_step(self.model, tx, schedule, loss="kl", chunk_tokens=config.chunk_tokens),
            in_shardings=(replicated, self.param_shardings, self.batch_sharding),
            out_shardings=(replicated, replicated),
            donate_argnames=("state",),
        )
        ids = [jax.device_put(b, self.batch_sharding) for b in self.batches_sbt[:steps]]
        began = time.perf_counter()
        state = jax.jit(lambda bank: TrainState.create(bank, tx))(start)
        step_fn = step_fn.lower(state, self.params, ids[0]).compile()
        elapsed, wall, saved = time.perf_counter() - began, [], {}
        for step in range(1, steps + 1):
            began = time.perf_counter()
            state, metrics = step_fn(state, self.params, ids[step - 1])
            jax.block_until_ready(metrics)
            elapsed += time.perf_counter() - began
            wall.append(elapsed)
            if step in snapshots:
                saved[step] = jax.device_get(state.translators)
        return wall, saved

    def fit(self, tokens: int) -> tuple[Translators, float]:
        """The closed form on the first `tokens` training tokens, as `train_lib` fits it."""
        config = self.setup.config
        sequences = -(-tokens // config.data.seq_len)
        stream = data_lib.ChunkStream(self.setup.train.chunks, seed=config.seed)
        fit_nt = stream.next_global_batch(sequences)
        began = time.perf_counter()
        bank = closed_form.fit_translators(
            self.model,
            fit_nt,
            ridge=RIDGE,
            batch_size=config.eval_batch_size,
            mesh=self.mesh,
            model_params=self.params,
        )
        jax.block_until_ready(bank)
        return bank, time.perf_counter() - began


def run_peer(lab: Lab, steps: int, snapshots: list[int], workdir: pathlib.Path, say) -> dict:
    """tuned-lens's own loop from zeros in a child process; its snapshots as jaxlens banks."""
    children = Children(workdir, timeout=7200)
    use_torch = os.environ.pop("USE_TORCH", None)  # this process's setting, not the child's
    try:
        return _run_peer(children, lab, steps, snapshots, workdir, say)
    finally:
        if use_torch is not None:
            os.environ["USE_TORCH"] = use_torch


def _run_peer(children, lab, steps, snapshots, workdir, say) -> dict:
    model_dir = workdir / "smollm2-safetensors"
    spec = {"task": "prepare", "case": CASES["smollm2"].to_dict(), "model": str(model_dir)}
    if "error" in children.run("prepare smollm2", spec | {"seed": 0}):
        raise RuntimeError("could not write the PyTorch copy of SmolLM2")
    np.save(workdir / "batches.npy", lab.batches_sbt[:steps])
    spec = {
        "task": "snapshots",
        "model": str(model_dir),
        "batches": str(workdir / "batches.npy"),
        "snapshots": snapshots,
        "snapshot_file": str(workdir / "peer_snapshots.npz"),
        "autocast": True,
    }
    say(f"tuned-lens: {steps} steps from zeros (child process)")
    result = children.run("tuned-lens snapshots", spec)
    if "error" in result:
        raise RuntimeError("tuned-lens's loop failed; see the log above")
    saved = np.load(spec["snapshot_file"])
    banks = {s: Translators(saved[f"kernel_ldd_{s}"], saved[f"bias_ld_{s}"]) for s in snapshots}
    return {"wall": result["wall_s_by_step"], "banks": banks, "load_s": result["load_s"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        record = json.loads(pathlib.Path(args.report).read_text())
        record["summary"] = summarize(record, record["args"]["steps"])
        print(table(record))
        plot(record, args.png)
        return 0
    started = time.perf_counter()

    def say(message):
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    snapshots = ints(args.snapshots)
    ft_snapshots = ints(args.finetune_snapshots)
    lab = Lab(max(args.steps, args.finetune_steps))
    say(f"model and corpus ready: {lab.model}")
    runs = []  # {"method", "step", "tokens", "wall_s", "kl_l"}

    def add(method, bank, wall_s, step=0, tokens=0):
        kl_l = lab.heldout_kl(bank)
        row = dict(method=method, step=step, tokens=tokens, wall_s=wall_s, kl_l=kl_l.tolist())
        runs.append(row)
        say(f"{method:<28} step {step:>2}  wall {wall_s:7.1f} s  KL {kl_l.mean():.3f}")

    logit_kl_l = lab.heldout_kl(None)
    say(f"logit lens KL {logit_kl_l.mean():.3f}")

    # Cheapest first, so that the closed-form rows are on screen within minutes.
    fits = {}
    for tokens in ints(args.budgets) + [args.fit_tokens]:
        if tokens not in fits:
            fits[tokens] = lab.fit(tokens)
            if tokens in ints(args.budgets):
                add(f"closed form {tokens}", fits[tokens][0], fits[tokens][1], 0, tokens)
    start, fit_s = fits[args.fit_tokens]
    for optimizer in args.optimizers.split(","):
        say(f"jaxlens: closed form on {args.fit_tokens} tokens + {optimizer}")
        wall, saved = lab.train(start, optimizer, args.finetune_steps, ft_snapshots)
        for s in ft_snapshots:
            add(f"closed form + {optimizer}", saved[s], fit_s + wall[s - 1], s, s * 1024)
    save(runs, logit_kl_l, args, started, partial=True)

    zeros = Translators.zeros(lab.model.num_layers, lab.model.d_model)
    say(f"jaxlens: {args.steps} steps of the SGD recipe from zeros")
    wall, saved = lab.train(zeros, "sgd", args.steps, snapshots)
    for s in snapshots:
        add("zeros + SGD", saved[s], wall[s - 1], s, s * 1024)
    save(runs, logit_kl_l, args, started, partial=True)

    with tempfile.TemporaryDirectory(prefix="jaxlens-ttq-") as tmp:
        peer = run_peer(lab, args.steps, snapshots, pathlib.Path(tmp), say)
    for s in snapshots:
        add("tuned-lens (peer)", peer["banks"][s], peer["wall"][s - 1], s, s * 1024)
    record = save(runs, logit_kl_l, args, started, partial=False)
    print(table(record))
    plot(record, args.png)
    say(f"wrote {args.out} and {args.png}")
    return 0


def save(runs, logit_kl_l, args, started, *, partial: bool) -> dict:
    """Writes what has been measured so far (`partial`: the peer's rows are still to come)."""
    record = {
        "logit_kl_l": logit_kl_l.tolist(),
        "runs": runs,
        "args": vars(args),
        "versions": versions(),
        "machine": machine(),
        "partial": partial,
        "load_avg": os.getloadavg(),
        "total_s": time.perf_counter() - started,
    }
    if not partial:
        record["summary"] = summarize(record, args.steps)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(record, indent=1))
    return record


def summarize(record: dict, steps: int) -> dict:
    """The issue's two targets, against the peer's last snapshot (`steps` steps from zeros)."""
    runs = record["runs"]
    peer = next(r for r in runs if r["method"] == "tuned-lens (peer)" and r["step"] == steps)
    peer_kl = float(np.mean(peer["kl_l"]))
    ours = [r for r in runs if r["method"] != "tuned-lens (peer)"]
    reached = [r for r in ours if np.mean(r["kl_l"]) <= peer_kl]
    first = min(reached, key=lambda r: r["wall_s"], default=None)
    in_time = [r for r in ours if r["wall_s"] <= peer["wall_s"]]
    best = min(in_time, key=lambda r: np.mean(r["kl_l"]), default=None)
    out = {"peer_kl": peer_kl, "peer_wall_s": peer["wall_s"]}
    if first:
        out["first_to_peer_kl"] = {
            "method": first["method"],
            "step": first["step"],
            "wall_s": first["wall_s"],
            "fraction_of_peer_wall": first["wall_s"] / peer["wall_s"],
        }
    if best:
        wins = int(np.sum(np.asarray(best["kl_l"]) < np.asarray(peer["kl_l"])))
        out["best_within_peer_wall"] = {
            "method": best["method"],
            "step": best["step"],
            "wall_s": best["wall_s"],
            "kl": float(np.mean(best["kl_l"])),
            "layers_lower": wins,
            "layers": len(best["kl_l"]),
        }
    return out


def table(record: dict) -> str:
    logit = np.asarray(record["logit_kl_l"])
    peer = record["summary"]
    peer_run = next(
        r
        for r in record["runs"]
        if r["method"] == "tuned-lens (peer)" and r["wall_s"] == peer["peer_wall_s"]
    )
    peer_l = np.asarray(peer_run["kl_l"])
    lines = [
        "| method | steps | fit tokens | train wall s | held-out KL (nats) | % of logit lens | "
        "layers below logit lens | layers below tuned-lens 20 steps |",
        "|---|---|---|---|---|---|---|---|",
        f"| logit lens | - | - | 0 | {logit.mean():.3f} | 100% | - | "
        f"{int(np.sum(logit < peer_l))}/{len(logit)} |",
    ]
    for r in record["runs"]:
        kl = np.asarray(r["kl_l"])
        fit_tokens = r["tokens"] if is_budget_row(r) else "-"
        if r["method"].startswith("closed form +"):
            fit_tokens = record["args"]["fit_tokens"]
        lines.append(
            f"| {r['method']} | {r['step']} | {fit_tokens} | {r['wall_s']:.1f} | {kl.mean():.3f} | "
            f"{kl.mean() / logit.mean():.1%} | {int(np.sum(kl < logit))}/{len(kl)} | "
            f"{int(np.sum(kl < peer_l))}/{len(kl)} |"
        )
    summary = record["summary"]
    lines.append("")
    lines.append(
        f"tuned-lens's loop from zeros: {summary['peer_kl']:.3f} nats after "
        f"{summary['peer_wall_s']:.0f} s of training."
    )
    if "first_to_peer_kl" in summary:
        f = summary["first_to_peer_kl"]
        lines.append(
            f"First jaxlens lens at or below it: {f['method']} (step {f['step']}) after "
            f"{f['wall_s']:.1f} s = 1/{1 / f['fraction_of_peer_wall']:.0f} of that time "
            "(target: at most 1/20)."
        )
    if "best_within_peer_wall" in summary:
        b = summary["best_within_peer_wall"]
        lines.append(
            f"Best jaxlens lens within the same wall time: {b['method']} (step {b['step']}), "
            f"{b['kl']:.3f} nats, lower at {b['layers_lower']}/{b['layers']} layers "
            "(target: every layer)."
        )
    return "\n".join(lines)


def is_budget_row(run: dict) -> bool:
    """A closed form alone (one row per token budget), not a fine-tuning run."""
    method = run["method"]
    return method.startswith("closed form ") and not method.startswith("closed form +")


def plot(record: dict, path: str) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    logit = float(np.mean(record["logit_kl_l"]))
    ax.axhline(logit, color="grey", ls=":", label=f"logit lens ({logit:.2f})")
    methods = dict.fromkeys(r["method"] for r in record["runs"])
    for method in methods:
        rows = [r for r in record["runs"] if r["method"] == method]
        wall = [r["wall_s"] for r in rows]
        kl = [float(np.mean(r["kl_l"])) for r in rows]
        if is_budget_row(rows[0]):
            continue
        ax.plot(wall, kl, marker="o", label=method)
    budgets = [r for r in record["runs"] if is_budget_row(r)]
    if budgets:
        ax.plot(
            [r["wall_s"] for r in budgets],
            [float(np.mean(r["kl_l"])) for r in budgets],
            marker="s",
            color="black",
            label="closed form alone (by token budget)",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):  # plain numbers, not powers of ten
        axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_yticks([1, 2, 5, 10, 17])
    ax.set_xticks([10, 30, 100, 300, 1000])
    ax.set_xlabel("training wall time, s (loading and evaluation excluded)")
    ax.set_ylabel("held-out mean KL to the model (nats)")
    ax.set_title("SmolLM2-135M on Shakespeare, 2-core CPU: lens quality against time")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
