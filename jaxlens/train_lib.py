"""`train_and_evaluate(config, workdir)`: the whole training job, as notebooks and tests call it.

Reads top to bottom: validate the config -> mesh -> subject model -> data -> optimizer and state
-> restore or start -> compile -> loop (metrics fetched only at log steps) -> final checkpoint ->
held-out evaluation of the tuned lens against the logit lens.
"""

from __future__ import annotations

import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlens import data as data_lib
from jaxlens import evaluate as evaluate_lib
from jaxlens import lens_io, sharding
from jaxlens.checkpointing import Checkpointer
from jaxlens.lens import Translators
from jaxlens.models import SubjectModel, load_model
from jaxlens.optim import optimizer_from_config
from jaxlens.sharding import bank_shardings, make_mesh, model_param_shardings, put
from jaxlens.step import TrainState, make_train_step

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class NonFiniteLossError(FloatingPointError):
    """A training loss became NaN or infinite."""


def start_distributed(config) -> None:
    """`jax.distributed.initialize`, with explicit coordinates where the config gives them."""
    kwargs = {}
    if config.coordinator_address:
        kwargs["coordinator_address"] = config.coordinator_address
    if config.num_processes > 0:
        kwargs["num_processes"] = config.num_processes
    if config.process_id >= 0:
        kwargs["process_id"] = config.process_id
    # Cross-process collectives on CPU hosts (tests, CPU clusters); accelerators ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)


def load_subject(config) -> SubjectModel:
    if not config.model.source:
        raise ValueError("Set --config.model.source to a model directory, .gguf file or hub id.")
    if config.model.dtype not in DTYPES:
        raise ValueError(f"--config.model.dtype must be one of {sorted(DTYPES)}.")
    return load_model(
        config.model.source,
        dtype=DTYPES[config.model.dtype],
        revision=config.model.revision or None,
    )


def sequences_per_step(config, mesh) -> int:
    """Checks the step's token budget divides into sequences, devices and micro-batches."""
    seq_len = config.data.seq_len
    per_step, rest = divmod(config.tokens_per_step, seq_len)
    if rest or per_step == 0:
        raise ValueError(
            f"--config.tokens_per_step={config.tokens_per_step} is not a multiple of "
            f"--config.data.seq_len={seq_len}; use e.g. {max(per_step, 1) * seq_len}."
        )
    unit = mesh.shape["data"] * config.micro_batches
    if per_step % unit:
        raise ValueError(
            f"{per_step} sequences per step do not divide into {mesh.shape['data']} data-parallel "
            f"devices x {config.micro_batches} micro-batches; make tokens_per_step a multiple of "
            f"{unit * seq_len}."
        )
    return per_step


def check_config(config, model: SubjectModel) -> None:
    """Validates what can be checked once the model is known, before anything compiles."""
    limit = model.max_positions
    if limit is not None and config.data.seq_len > limit:
        raise ValueError(
            f"--config.data.seq_len={config.data.seq_len} exceeds the model's {limit} "
            f"positions; use --config.data.seq_len={limit} or less."
        )
    if config.loss not in ("kl", "ce"):
        raise ValueError(f"--config.loss must be 'kl' or 'ce'; got {config.loss!r}.")
    if config.bias_only and not config.bias:
        raise ValueError("--config.bias_only=True needs --config.bias=True.")
    if config.num_steps < 1:
        raise ValueError("--config.num_steps must be at least 1.")


def load_corpus(config, tokenizer):
    """`config.data`'s text, tokenized and chunked: `(train, heldout)` corpora, disjoint.

    Each process reads and tokenizes only its own block of documents; the token streams are then
    joined across processes, so every process holds the same corpus as a single process would.
    """
    texts = data_lib.load_texts(
        config.data.source,
        text_field=config.data.text_field,
        split=config.data.split,
        max_documents=config.data.max_documents or None,
        hub_config=config.data.hub_config or None,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    stream = data_lib.gather_streams(data_lib.tokenize_stream(texts, tokenizer))
    data_lib.check_has_text(stream.num_documents, stream.text_bytes, config.data.source)
    corpus = data_lib.chunk_stream(stream, config.data.seq_len)
    return data_lib.split_heldout(
        corpus, heldout_chunks=config.data.heldout_sequences, seed=config.seed
    )


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
        "lens_type": "linear_tuned_lens",
        "seq_len": config.data.seq_len,
        "data_source": config.data.source,
        "seed": config.seed,
        "tokens_per_step": config.tokens_per_step,
        "num_steps": config.num_steps,
    }


def initial_translators(config, model: SubjectModel) -> Translators:
    """Zero translators (= the logit lens), or a warm start from `config.init_lens`."""
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Trains a tuned lens as `config` says, checkpointing under `workdir`; returns eval metrics.

    Resumes automatically from `workdir/checkpoints`. Writes `workdir/metrics.jsonl` (per log
    step), `workdir/eval.json` and `workdir/eval.png` (held-out logit vs tuned lens).
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if config.distributed:
        start_distributed(config)
    mesh = make_mesh(config.mesh.data, config.mesh.model)
    batch_size = sequences_per_step(config, mesh)

    model = load_subject(config)
    check_config(config, model)
    _say(f"Subject model: {model}")

    train_data, heldout = load_corpus(config, model.tokenizer)
    stream = data_lib.ChunkStream(train_data.chunks, seed=config.seed)
    stream.check_enough(config.num_steps, batch_size, allow_repeat=config.data.allow_repeat)

    optimizer, schedule = optimizer_from_config(config)
    replicated = NamedSharding(mesh, P())
    param_shardings = model_param_shardings(model.params, mesh, config.mesh.shard_model_params)
    model_params = put(model.params, param_shardings)

    start_bank = initial_translators(config, model)

    def init():
        return TrainState.create(start_bank, optimizer)

    abstract_state = jax.eval_shape(init)
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
        out_shardings=(state_shardings, replicated),
        donate_argnames=("state",),
    )

    with Checkpointer(
        workdir / "checkpoints",
        save_every=config.checkpoint_every,
        keep=config.keep_checkpoints,
        metadata=run_metadata(config, model),
    ) as checkpointer:
        # Written once the checkpoints are known to fit this run: what export reads them with.
        if jax.process_index() == 0:
            (workdir / "config.json").write_text(config.to_json(indent=1))
        if checkpointer.latest_step() is not None:
            abstract = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                abstract_state,
                state_shardings,
            )
            state, extra, start = checkpointer.restore(abstract)
            stream = data_lib.ChunkStream.from_state(
                train_data.chunks, extra["data"], seed=config.seed
            )
            _say(f"Resumed from step {start} (data position {stream.position}).")
        else:
            state = jax.jit(init, out_shardings=state_shardings)()
            start = 0

        block = sharding.process_row_block(mesh, P("data"), (batch_size, config.data.seq_len))
        ids_shape = jax.ShapeDtypeStruct(
            (batch_size, config.data.seq_len), jnp.int32, sharding=batch_sharding
        )
        # Compile before the first step so that memory errors surface now, not mid-run.
        compiled = step_fn.lower(state, model_params, ids_shape).compile()
        state = _train_loop(
            config,
            compiled,
            state,
            model_params,
            stream,
            block,
            mesh,
            checkpointer,
            start,
            batch_size,
            train_data.nats_to_bpb,
            workdir,
        )

    result = evaluate_lib.evaluate(
        model,
        state.translators,
        heldout.chunks,
        nats_to_bpb=heldout.nats_to_bpb,
        batch_size=config.eval_batch_size,
        chunk_tokens=config.chunk_tokens,
        model_params=model_params,
        mesh=mesh,
        shard_model_params=config.mesh.shard_model_params,
    )
    if jax.process_index() == 0:
        (workdir / "eval.json").write_text(json.dumps(result, indent=1))
        evaluate_lib.plot_curves(result, workdir / "eval.png")
    return result


def _train_loop(
    config,
    step_fn,
    state,
    model_params,
    stream,
    block,
    mesh,
    checkpointer,
    start,
    batch_size,
    nats_to_bpb,
    workdir,
):
    metrics_file = workdir / "metrics.jsonl"
    board = _tensorboard(workdir) if config.tensorboard and jax.process_index() == 0 else None
    tokens_per_step = batch_size * config.data.seq_len
    began, timed_from = time.perf_counter(), start
    for step in range(start, config.num_steps):
        rows = stream.next_local_batch(batch_size, *block)
        ids = sharding.global_batch(rows, mesh, P("data"))
        state, metrics = step_fn(state, model_params, ids)
        done = step + 1
        last = done == config.num_steps
        if done % config.log_every == 0 or last or done % config.checkpoint_every == 0:
            metrics = jax.device_get(metrics)
            loss_l = np.asarray(metrics["loss_l"])
            if not np.all(np.isfinite(loss_l)):
                bad = np.flatnonzero(~np.isfinite(loss_l)).tolist()
                raise NonFiniteLossError(
                    f"Non-finite loss at step {done} in layers {bad}; the last good checkpoint "
                    f"(step {checkpointer.latest_step()}) is kept. Lower --config.lr_scale or "
                    "check the data."
                )
            elapsed = time.perf_counter() - began
            rate = (done - timed_from) * tokens_per_step / max(elapsed, 1e-9)
            eta = (config.num_steps - done) * tokens_per_step / max(rate, 1e-9)
            record = {
                "step": done,
                "loss_bpb_l": (loss_l * nats_to_bpb).tolist(),
                "loss_nats_mean": float(loss_l.mean()),
                "grad_norm": float(metrics["grad_norm"]),
                "learning_rate": float(metrics["learning_rate"]),
                "tokens_per_second": rate,
            }
            if jax.process_index() == 0:
                with metrics_file.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                if board is not None:
                    _log_scalars(board, record)
                print(
                    f"step {done}/{config.num_steps}  loss {record['loss_nats_mean']:.3f} nats "
                    f"(mean over layers)  {rate:,.0f} tok/s  ETA {_duration(eta)}",
                    flush=True,
                )
        checkpointer.save(done, state, {"data": stream.state()}, force=last)
    if board is not None:
        board.close()
    return state


def _tensorboard(workdir):
    try:
        from tensorboardX import SummaryWriter
    except ImportError as error:
        raise ImportError(
            "--config.tensorboard=True needs tensorboardX: pip install tensorboardX"
        ) from error
    return SummaryWriter(str(workdir / "tensorboard"))


def _log_scalars(board, record: dict) -> None:
    step = record["step"]
    for i, value in enumerate(record["loss_bpb_l"]):
        board.add_scalar(f"loss_bpb/layer_{i}", value, step)
    for key in ("loss_nats_mean", "grad_norm", "learning_rate", "tokens_per_second"):
        board.add_scalar(key, record[key], step)
    board.flush()


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"
