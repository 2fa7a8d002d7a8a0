"""`train_and_evaluate(config, workdir)`: the whole training job, as notebooks and tests call it.

Reads top to bottom: set up (validate the config, mesh, text, subject model, corpus: `job`) ->
optimizer and state -> restore or start -> compile -> loop (metrics fetched only at log steps)
-> final checkpoint -> held-out evaluation of the tuned lens against the logit lens.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlens import data as data_lib
from jaxlens import eval_lib, eval_report, job, lens_io, torch_format
from jaxlens.checkpointing import Checkpointer
from jaxlens.lens import Translators
from jaxlens.metrics_log import MetricsLog
from jaxlens.models import SubjectModel
from jaxlens.optim import optimizer_from_config
from jaxlens.sharding import (
    bank_shardings,
    global_batch,
    model_param_shardings,
    process_row_block,
    put,
)
from jaxlens.step import TrainState, make_train_step


class NonFiniteLossError(FloatingPointError):
    """A training loss became NaN or infinite."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Trains a tuned lens as `config` says, checkpointing under `workdir`; returns eval metrics.

    Resumes automatically from `workdir/checkpoints`. Writes `workdir/metrics.jsonl` (per log
    step), `workdir/eval.json` and `workdir/eval.png` (held-out logit vs tuned lens). A workdir
    that this call created is removed again if the run fails before its first checkpoint.
    """
    workdir = pathlib.Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise NotADirectoryError(f"--workdir={workdir} is a file; name a directory.")
    setup = job.setup(config)
    created = not workdir.exists()
    try:
        return _train_and_evaluate(setup, workdir)
    except BaseException:
        if created and jax.process_index() == 0:
            _remove_if_no_checkpoint(workdir)
        raise


def run_metadata(config, model: SubjectModel) -> dict:
    """What an existing checkpoint must agree with to be resumed."""
    return {
        "model": model.name_or_path,
        "revision": model.revision,
        "unembed_hash": lens_io.model_unembed_hash(model),
        "num_layers": model.num_layers,
        "d_model": model.d_model,
        "vocab_size": model.vocab_size,
        "bias": bool(config.bias),
        "lens_type": torch_format.LENS_TYPE,
        "seq_len": config.data.seq_len,
        "data_source": config.data.source,
        "seed": config.seed,
        "tokens_per_step": config.tokens_per_step,
        "num_steps": config.num_steps,
    }


def initial_translators(config, setup: job.Job, model_params) -> Translators:
    """Where training starts: zero translators (= the logit lens, tuned-lens's start), a warm
    start from `config.init_lens`, or a closed-form least-squares fit (`config.init`)."""
    model = setup.model
    if config.init.method == "least_squares":
        return _closed_form(config, setup, model_params)
    if not config.init_lens:
        return Translators.zeros(model.num_layers, model.d_model, bias=config.bias)
    bank = lens_io.load_translators(config.init_lens, model)
    if bank.bias_ld is None and config.bias:
        bank = Translators(bank.kernel_ldd, jnp.zeros((model.num_layers, model.d_model)))
    if bank.bias_ld is not None and not config.bias:
        raise ValueError(
            f"--config.init_lens={config.init_lens} has biases but --config.bias=False; "
            "set --config.bias=True to keep them."
        )
    _say(f"Warm start from {config.init_lens}.")
    return bank


def _closed_form(config, setup: job.Job, model_params) -> Translators:
    from jaxlens import closed_form

    seq_len, available = config.data.seq_len, len(setup.train.chunks)
    sequences = -(-config.init.tokens // seq_len)
    if sequences > available:
        raise ValueError(
            f"--config.init.tokens={config.init.tokens} needs {sequences} sequences of {seq_len} "
            f"tokens, but the training split has {available} ({available * seq_len} tokens); "
            "lower --config.init.tokens or give more text."
        )
    # The sequences the training stream draws first: a seeded sample of the whole split. (The
    # split's first sequences come from its first documents: on Shakespeare, 16,384 of them fit
    # 1.65 nats of held-out KL against 1.41 for the sample, bench/time_to_quality.py.)
    fit_nt = data_lib.ChunkStream(setup.train.chunks, seed=config.seed).next_global_batch(sequences)
    began = time.perf_counter()
    bank = closed_form.fit_translators(
        setup.model,
        fit_nt,
        ridge=config.init.ridge,
        batch_size=config.eval_batch_size,
        mesh=setup.mesh,
        model_params=model_params,
        shard_model_params=config.mesh.shard_model_params,
        bias=config.bias,
    )
    _say(
        f"Closed-form least-squares fit on {sequences * seq_len} tokens "
        f"(ridge {config.init.ridge}) in {time.perf_counter() - began:.1f} s."
    )
    return bank


def _train_and_evaluate(setup: job.Job, workdir: pathlib.Path) -> dict:
    config, mesh, model = setup.config, setup.mesh, setup.model
    _say(f"Subject model: {model}")
    batch_size = job.sequences_per_step(config, mesh)
    stream = data_lib.ChunkStream(setup.train.chunks, seed=config.seed)
    stream.check_enough(config.num_steps, batch_size, allow_repeat=config.data.allow_repeat)

    optimizer, schedule = optimizer_from_config(config)
    param_shardings = model_param_shardings(model.params, mesh, config.mesh.shard_model_params)
    model_params = put(model.params, param_shardings)

    def init(bank):
        return TrainState.create(bank, optimizer)

    zeros = Translators.zeros(model.num_layers, model.d_model, bias=config.bias)
    abstract_state = jax.eval_shape(init, zeros)
    state_shardings = bank_shardings(mesh, abstract_state)
    batch_sharding = NamedSharding(mesh, P("data"))
    step_fn = jax.jit(
        make_train_step(
            model,
            optimizer,
            schedule,
            loss=config.loss,
            token_shift=None if config.token_shift < 0 else config.token_shift,
            chunk_tokens=config.chunk_tokens,
            micro_batches=config.micro_batches,
        ),
        in_shardings=(state_shardings, param_shardings, batch_sharding),
        out_shardings=(state_shardings, NamedSharding(mesh, P())),
        donate_argnames=("state",),
    )

    workdir.mkdir(parents=True, exist_ok=True)
    with (
        Checkpointer(
            workdir / "checkpoints",
            metadata=run_metadata(config, model),
            save_every=config.checkpoint_every,
            keep=config.keep_checkpoints,
        ) as checkpointer,
        MetricsLog(workdir, num_steps=config.num_steps, tensorboard=config.tensorboard) as log,
    ):
        # Written once the checkpoints are known to fit this run: what export reads them with.
        if jax.process_index() == 0:
            (workdir / "config.json").write_text(config.to_json(indent=1))
        if checkpointer.latest_step() is not None:
            abstract = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                abstract_state,
                state_shardings,
            )
            items, extra, start = checkpointer.restore(abstract.checkpoint_items())
            state = TrainState.from_checkpoint_items(items)
            stream = data_lib.ChunkStream.from_state(
                setup.train.chunks, extra["data"], seed=config.seed
            )
            _say(f"Resumed from step {start} (data position {stream.position}).")
        else:  # the start is computed only here: a resumed run never refits or reloads it
            bank = initial_translators(config, setup, model_params)
            state = jax.jit(init, out_shardings=state_shardings)(bank)
            start = 0
            if config.init.method != "zeros" or config.init_lens:  # worth keeping at once
                checkpointer.save(0, state.checkpoint_items(), {"data": stream.state()}, force=True)

        block = process_row_block(mesh, P("data"), (batch_size, config.data.seq_len))

        def next_batch():
            return global_batch(stream.next_local_batch(batch_size, *block), mesh, P("data"))

        ids_shape = jax.ShapeDtypeStruct(
            (batch_size, config.data.seq_len), jnp.int32, sharding=batch_sharding
        )
        # Compile before the first step so that memory errors surface now, not mid-run.
        if start < config.num_steps:
            step_fn = step_fn.lower(state, model_params, ids_shape).compile()
        tokens_per_step = batch_size * config.data.seq_len
        began = time.perf_counter()
        for step in range(start, config.num_steps):  # none with num_steps=0: the start is the lens
            state, metrics = step_fn(state, model_params, next_batch())
            done = step + 1
            last = done == config.num_steps
            if done % config.log_every == 0 or last or done % config.checkpoint_every == 0:
                # The only place metrics leave the device.
                record = _record(jax.device_get(metrics), done, setup.train.nats_to_bpb)
                _check_finite(record, checkpointer.latest_step())
                rate = (done - start) * tokens_per_step / max(time.perf_counter() - began, 1e-9)
                record["tokens_per_second"] = rate
                eta = (config.num_steps - done) * tokens_per_step / max(rate, 1e-9)
                log.write(record, eta_seconds=eta)
            checkpointer.save(done, state.checkpoint_items(), {"data": stream.state()}, force=last)

    result = eval_lib.evaluate(
        model,
        state.translators,
        setup.heldout.chunks,
        nats_to_bpb=setup.heldout.nats_to_bpb,
        batch_size=config.eval_batch_size,
        chunk_tokens=config.eval_chunk_tokens,
        model_params=model_params,
        mesh=mesh,
        shard_model_params=config.mesh.shard_model_params,
    )
    if jax.process_index() == 0:
        (workdir / "eval.json").write_text(json.dumps(result, indent=1))
        eval_report.plot_curves(result, workdir / "eval.png")
    return result


def _record(metrics: dict, step: int, nats_to_bpb: float) -> dict:
    loss_l = np.asarray(metrics["loss_l"])
    return {
        "step": step,
        "loss_bpb_l": (loss_l * nats_to_bpb).tolist(),
        "loss_nats_mean": float(loss_l.mean()),
        "grad_norm": float(metrics["grad_norm"]),
        "learning_rate": float(metrics["learning_rate"]),
    }


def _check_finite(record: dict, last_good_step: int | None) -> None:
    loss_l = np.asarray(record["loss_bpb_l"])
    if not np.all(np.isfinite(loss_l)):
        bad = np.flatnonzero(~np.isfinite(loss_l)).tolist()
        raise NonFiniteLossError(
            f"Non-finite loss at step {record['step']} in layers {bad}; the last good checkpoint "
            f"(step {last_good_step}) is kept. Lower --config.lr_scale or check the data."
        )


def _remove_if_no_checkpoint(workdir: pathlib.Path) -> None:
    """Removes a workdir this run created if no checkpoint step was saved in it: a failed start
    leaves nothing behind, and nothing a later run could resume is ever lost."""
    checkpoints = workdir / "checkpoints"
    if checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()):
        return
    shutil.rmtree(workdir, ignore_errors=True)


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)
