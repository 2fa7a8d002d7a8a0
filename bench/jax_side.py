"""jaxlens's side: the real training step and evaluation step, built as `train_lib` builds them.

The training step is `step.make_train_step` with the optimizer of `optim.optimizer_from_config`
on `configs/base.py`'s defaults (tuned-lens's SGD Nesterov recipe, KL loss, chunk_tokens=2048,
one micro-batch), jitted with the state donated and compiled ahead of time
(`lower(...).compile()`), exactly as `train_lib.train_and_evaluate` does before its loop. The
loop then dispatches steps without fetching anything, as `train_lib` does between log steps, and
blocks once at the end. The evaluation step is `eval_lib.make_eval_step` (logit and tuned lens:
KL, cross-entropy, entropy per layer), also compiled ahead of time.

Importing this module imports jax and jaxlens; the import time is reported (`IMPORT_S`).
"""

from __future__ import annotations

import os
import sys
import time

_began = time.perf_counter()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from bench import flops  # noqa: E402
from bench.memory import RssSampler  # noqa: E402
from configs import base  # noqa: E402
from jaxlens import job  # noqa: E402
from jaxlens.eval_lib import make_eval_step  # noqa: E402
from jaxlens.lens import Translators  # noqa: E402
from jaxlens.optim import optimizer_from_config  # noqa: E402
from jaxlens.sharding import make_mesh, model_param_shardings  # noqa: E402
from jaxlens.step import TrainState, make_train_step  # noqa: E402

IMPORT_S = time.perf_counter() - _began


def make_config(spec: dict):
    """`configs/base.py` with the case's model, dtype and step size; everything else default."""
    case, impl = spec["case"], spec["impl"]
    config = base.get_config()
    config.model.source = spec["model"]
    config.model.dtype = impl["dtype"]
    config.data.seq_len = case["seq_len"]
    config.tokens_per_step = case["tokens_per_step"]
    config.num_steps = spec["num_steps"]
    if spec.get("chunk_tokens"):
        config.chunk_tokens = spec["chunk_tokens"]
    return config


class Runner:
    """The subject model, the jitted steps and their inputs, as `train_lib` sets them up."""

    def __init__(self, spec: dict):
        self.config = config = make_config(spec)
        began = time.perf_counter()
        self.model = model = job.load_subject(config)
        self.load_s = time.perf_counter() - began
        job.validate_config(config)
        job.check_against_model(config, model)
        self.mesh = mesh = make_mesh(config.mesh.data, config.mesh.model)
        self.batch_size = job.sequences_per_step(config, mesh)
        self.optimizer, schedule = optimizer_from_config(config)
        param_shardings = model_param_shardings(model.params, mesh, False)
        self.params = jax.device_put(model.params, param_shardings)
        self.batch_sharding = NamedSharding(mesh, P("data"))
        replicated = NamedSharding(mesh, P())
        train_step = make_train_step(
            model,
            self.optimizer,
            schedule,
            loss=config.loss,
            token_shift=None if config.token_shift < 0 else config.token_shift,
            chunk_tokens=config.chunk_tokens,
            micro_batches=config.micro_batches,
        )
        # One device here: the bank's "model"-axis sharding of train_lib is replication.
        self.step_fn = jax.jit(
            train_step,
            in_shardings=(replicated, param_shardings, self.batch_sharding),
            out_shardings=(replicated, replicated),
            donate_argnames=("state",),
        )
        self.eval_fn = jax.jit(make_eval_step(model, chunk_tokens=config.eval_chunk_tokens))

    def facts(self, seq_len: int) -> dict:
        return flops.model_facts(self.model.config, seq_len)

    def batches(self, ids_nbt: np.ndarray) -> list[jax.Array]:
        """Each step's token ids, placed as `train_lib` places a batch."""
        return [jax.device_put(ids.astype(np.int32), self.batch_sharding) for ids in ids_nbt]

    def state(self, translators: Translators) -> TrainState:
        return jax.jit(lambda: TrainState.create(translators, self.optimizer))()

    def compile_train(self, state, ids_bt):
        return self.step_fn.lower(state, self.params, ids_bt).compile()

    def compile_eval(self, translators, ids_bt):
        return self.eval_fn.lower(translators, self.params, ids_bt).compile()


def zero_translators(model) -> Translators:
    return Translators.zeros(model.num_layers, model.d_model, bias=True)


def throughput(spec: dict) -> dict:
    """Times the first and the steady-state training steps, then evaluation steps."""
    case = spec["case"]
    runner = Runner(spec)
    ids = runner.batches(np.load(spec["batches"]))
    state = runner.state(zero_translators(runner.model))
    began = time.perf_counter()
    train = runner.compile_train(state, ids[0])
    result = {"import_s": IMPORT_S, "load_s": runner.load_s}
    result["compile_s"] = time.perf_counter() - began
    result["facts"] = runner.facts(case["seq_len"])
    with RssSampler() as rss:
        began = time.perf_counter()
        state, metrics = jax.block_until_ready(train(state, runner.params, ids[0]))
        result["first_step_s"] = time.perf_counter() - began
        began = time.perf_counter()
        for i in range(1, case["train_steps"] + 1):
            state, metrics = train(state, runner.params, ids[i % len(ids)])
        jax.block_until_ready((state, metrics))
        result["train_loop_s"] = time.perf_counter() - began
    result["train_rss"] = rss.to_dict()
    result["train_loss_l"] = np.asarray(metrics["loss_l"]).tolist()
    if case["eval_steps"]:
        result.update(_time_eval(runner, state.translators, ids, case["eval_steps"]))
    result["torch_imported"] = _torch_imported()
    return result


def paired(spec: dict) -> dict:
    """`spec["pairs"]` training steps and evaluation steps, alternated on the same batches after
    one untimed step of each (`bench.eval_vs_train`); seconds per step."""
    runner = Runner(spec)
    ids = runner.batches(np.load(spec["batches"]))
    state = runner.state(zero_translators(runner.model))
    train = runner.compile_train(state, ids[0])
    evaluate = runner.compile_eval(state.translators, ids[0])
    state, _ = jax.block_until_ready(train(state, runner.params, ids[0]))
    jax.block_until_ready(evaluate(state.translators, runner.params, ids[0]))
    result = {"train_step_s": [], "eval_step_s": []}
    for i in range(spec["pairs"]):
        ids_bt = ids[i % len(ids)]
        began = time.perf_counter()
        state, _ = jax.block_until_ready(train(state, runner.params, ids_bt))
        result["train_step_s"].append(time.perf_counter() - began)
        began = time.perf_counter()
        jax.block_until_ready(evaluate(state.translators, runner.params, ids_bt))
        result["eval_step_s"].append(time.perf_counter() - began)
    return result


def _time_eval(runner: Runner, translators, ids, steps: int) -> dict:
    began = time.perf_counter()
    evaluate = runner.compile_eval(translators, ids[0])
    out = {"eval_compile_s": time.perf_counter() - began}
    with RssSampler() as rss:
        # The first step is timed apart, as training's is: it also pays the executable's first
        # run (fresh buffers), which the evaluation of a held-out set pays once.
        began = time.perf_counter()
        jax.block_until_ready(evaluate(translators, runner.params, ids[0]))
        out["eval_first_step_s"] = time.perf_counter() - began
        began = time.perf_counter()
        metrics = [evaluate(translators, runner.params, ids[i % len(ids)]) for i in range(steps)]
        jax.block_until_ready(metrics)
        out["eval_loop_s"] = time.perf_counter() - began
    out["eval_rss"] = rss.to_dict()
    return out


def parity(spec: dict) -> dict:
    """Per-layer losses of two training steps and the evaluation metrics, from given translators.

    Evaluation uses the starting translators (before any update) on the first batch; training
    then takes one step per batch. Losses are in nats.
    """
    runner = Runner(spec)
    ids = runner.batches(np.load(spec["batches"]))
    bank = np.load(spec["translators"])
    start = Translators(jax.numpy.asarray(bank["kernel_ldd"]), jax.numpy.asarray(bank["bias_ld"]))
    metrics = jax.device_get(runner.eval_fn(start, runner.params, ids[0]))
    result = {"eval": _eval_tree(metrics), "facts": runner.facts(spec["case"]["seq_len"])}
    state = runner.state(start)
    losses = []
    for ids_bt in ids:
        state, step_metrics = runner.step_fn(state, runner.params, ids_bt)
        losses.append(np.asarray(step_metrics["loss_l"]).tolist())
    result["train_loss_sl"] = losses
    return result


def _eval_tree(metrics: dict) -> dict:
    """`make_eval_step`'s flat metrics as {lens: {metric: [L]}, baseline: {metric: value}}."""
    tree = {
        lens: {m: np.asarray(metrics[f"{lens}/{m}"]).tolist() for m in ("kl", "ce", "entropy")}
        for lens in ("logit", "tuned")
    }
    tree["baseline"] = {
        "ce": float(metrics["logit/baseline_ce"]),
        "entropy": float(metrics["logit/baseline_entropy"]),
    }
    return tree


def _torch_imported() -> bool:
    return "torch" in sys.modules


def environment() -> dict:
    """What this side's speed depends on."""
    return {
        "jax_devices": [str(d) for d in jax.devices()],
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "USE_TORCH": os.environ.get("USE_TORCH", ""),
    }
