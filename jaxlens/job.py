"""The set-up every config-driven job shares: validate, distribute, mesh, text, model, corpus.

Training, evaluation and the notebooks all start the same way, from one `ml_collections` config
(see configs/base.py): `setup(config)` checks every field that can be checked without a model,
joins the other processes of a multi-host run, builds the ("data", "model") mesh, reads the text
(before the model, so a wrong path costs no waiting), loads the subject model, checks what
depends on it, and tokenizes the text into a training and a held-out corpus. Each step raises a
ValueError (or FileNotFoundError) whose message names the field to change.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from jaxlens import data as data_lib
from jaxlens.models import SubjectModel, load_model
from jaxlens.sharding import make_mesh

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
LOSSES = ("kl", "ce")
OPTIMIZERS = ("sgd", "adam", "muon")
INIT_METHODS = ("zeros", "least_squares")


@dataclasses.dataclass(frozen=True)
class Job:
    """What a set-up job holds: its config, mesh, model and the two disjoint corpora."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    model: SubjectModel
    train: data_lib.TokenizedCorpus
    heldout: data_lib.TokenizedCorpus


def setup(config: ml_collections.ConfigDict, *, training: bool = True) -> Job:
    """Validates `config` and builds everything a job needs from it, cheapest checks first.

    Args:
      config: a config with the fields of configs/base.py.
      training: also check that a training step's batch divides over the mesh.
    """
    validate_config(config)
    if config.distributed:
        start_distributed(config)
    mesh = make_mesh(config.mesh.data, config.mesh.model)
    if training:
        sequences_per_step(config, mesh)
    texts = read_texts(config)
    model = load_subject(config)
    check_against_model(config, model)
    train, heldout = tokenize_corpus(config, texts, model.tokenizer)
    return Job(config, mesh, model, train, heldout)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks the fields that need neither a model nor devices; raises ValueError naming one."""
    if not config.model.source:
        raise ValueError("Set --config.model.source to a model directory, .gguf file or hub id.")
    _one_of("model.dtype", config.model.dtype, DTYPES)
    _one_of("loss", config.loss, LOSSES)
    _one_of("optimizer", config.optimizer, OPTIMIZERS)
    if not config.data.source:
        raise ValueError("Set --config.data.source to a text file, directory, glob or dataset.")
    _one_of("init.method", config.init.method, INIT_METHODS)
    closed_form = config.init.method == "least_squares"
    # A closed-form fit is a lens by itself: fine-tuning it is optional.
    if config.num_steps < (0 if closed_form else 1):
        raise ValueError(
            f"--config.num_steps={config.num_steps} must be at least 1"
            + (" (or 0 with --config.init.method=least_squares)." if not closed_form else ".")
        )
    if closed_form:
        if config.init_lens:
            raise ValueError(
                "--config.init_lens and --config.init.method=least_squares both set the start; "
                "choose one."
            )
        if config.init.tokens < config.data.seq_len:
            raise ValueError(
                f"--config.init.tokens={config.init.tokens} must be at least one sequence "
                f"(--config.data.seq_len={config.data.seq_len})."
            )
        if not math.isfinite(config.init.ridge) or config.init.ridge < 0:
            raise ValueError(
                f"--config.init.ridge={config.init.ridge} must be a finite number >= 0 (e.g. 1e-3)."
            )
    for field in (
        "micro_batches",
        "chunk_tokens",
        "eval_chunk_tokens",
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
        "eval_batch_size",
        "data.heldout_sequences",
    ):
        value = _field(config, field)
        if value < 1:
            raise ValueError(f"--config.{field}={value} must be at least 1.")
    seq_len = config.data.seq_len
    if seq_len < 2:
        raise ValueError(f"--config.data.seq_len={seq_len} must be at least 2.")
    if config.tokens_per_step < seq_len or config.tokens_per_step % seq_len:
        per_step = max(config.tokens_per_step // seq_len, 1)
        raise ValueError(
            f"--config.tokens_per_step={config.tokens_per_step} must be a positive multiple of "
            f"--config.data.seq_len={seq_len}; use e.g. {per_step * seq_len}."
        )
    if config.bias_only and not config.bias:
        raise ValueError("--config.bias_only=True needs --config.bias=True.")


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


def sequences_per_step(config, mesh: Mesh) -> int:
    """Sequences per optimizer step, checked to divide into data-parallel devices and
    micro-batches (`validate_config` has checked it is a whole number of sequences)."""
    per_step = config.tokens_per_step // config.data.seq_len
    unit = mesh.shape["data"] * config.micro_batches
    if per_step % unit:
        raise ValueError(
            f"{per_step} sequences per step do not divide into {mesh.shape['data']} data-parallel "
            f"devices x {config.micro_batches} micro-batches; make --config.tokens_per_step a "
            f"multiple of {unit * config.data.seq_len}."
        )
    return per_step


def read_texts(config) -> list[str]:
    """This process's block of the documents of `config.data` (all of them on one process)."""
    return data_lib.load_texts(
        config.data.source,
        text_field=config.data.text_field,
        split=config.data.split,
        max_documents=config.data.max_documents or None,
        hub_config=config.data.hub_config or None,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def load_subject(config) -> SubjectModel:
    """The model `config.model` names, in its dtype."""
    return load_model(
        config.model.source,
        dtype=DTYPES[config.model.dtype],
        revision=config.model.revision or None,
    )


def check_against_model(config, model: SubjectModel) -> None:
    """Validates what can be checked once the model is known, before anything compiles."""
    limit = model.max_positions
    if limit is not None and config.data.seq_len > limit:
        raise ValueError(
            f"--config.data.seq_len={config.data.seq_len} exceeds the model's {limit} "
            f"positions; use --config.data.seq_len={limit} or less."
        )


def tokenize_corpus(config, texts, tokenizer):
    """`texts` tokenized and chunked: `(train, heldout)` corpora, disjoint.

    The token streams of all processes are joined, so every process holds the same corpus as a
    single process would.
    """
    stream = data_lib.gather_streams(data_lib.tokenize_stream(texts, tokenizer))
    data_lib.check_has_text(stream.num_documents, stream.text_bytes, config.data.source)
    corpus = data_lib.chunk_stream(stream, config.data.seq_len)
    return data_lib.split_heldout(
        corpus, heldout_chunks=config.data.heldout_sequences, seed=config.seed
    )


def _one_of(field: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"--config.{field}={value!r} must be one of {sorted(allowed)}.")


def _field(config, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config
