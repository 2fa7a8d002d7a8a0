"""Held-out evaluation of a tuned lens against the logit lens, per layer, sharded like training.

For each layer and each lens: KL(model output || lens) and next-token (or `token_shift`)
cross-entropy, averaged over tokens, plus the model's own cross-entropy as a baseline
(`metrics.lenses_metrics`: both lenses in one pass). Cross-entropies are reported in bits per byte
(tuned-lens's unit, via the corpus's `nats_to_bpb`); KL in nats and in bits per byte. Batches are
split over the mesh's "data" axis, the bank over "model", as in training. `evaluate_lens` is the
whole evaluation job that `python -m jaxlens.evaluate` runs; the result's formats live in
`eval_report`.
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlens import eval_report, job, lens_io
from jaxlens.lens import Translators
from jaxlens.metrics import labelled_positions, lenses_metrics, transfer_metrics
from jaxlens.models import SubjectModel
from jaxlens.sharding import (
    bank_shardings,
    global_batch,
    make_mesh,
    model_param_shardings,
    process_row_block,
    put,
)


def make_eval_step(
    model: SubjectModel,
    *,
    chunk_tokens: int = 128,
    token_shift: int = 1,
    layer_transfer: bool = False,
    logit_stats: bool = False,
):
    """`eval_step(translators, model_params, ids_bt)` -> per-layer metrics of both lenses (with
    `logit_stats`, also each lens's mean distribution: `lenses_metrics`'s marginals; labels
    `token_shift` positions away, as there)."""

    def eval_step(translators, model_params, ids_bt):
        hidden = model.apply(model_params, ids_bt).hidden_lbtd
        decoder = model.decoder(model_params)
        metrics = {}
        per_lens = lenses_metrics(
            decoder,
            (None, translators),
            hidden[:-1],
            hidden[-1],
            ids_bt,
            chunk_tokens=chunk_tokens,
            token_shift=token_shift,
            marginals=logit_stats,
        )
        for name, per_layer in zip(("logit", "tuned"), per_lens, strict=True):
            metrics.update({f"{name}/{k}": v for k, v in per_layer.items()})
        if layer_transfer:  # translator i on layer j, for the tuned lens (trivial for logit)
            transfer = transfer_metrics(
                decoder,
                translators,
                hidden[:-1],
                ids_bt,
                chunk_tokens=chunk_tokens,
                token_shift=token_shift,
            )
            metrics.update({f"tuned/transfer_{k}": v for k, v in transfer.items()})
        return metrics

    return eval_step


def evaluate(
    model: SubjectModel,
    translators: Translators,
    sequences_nt: np.ndarray,
    *,
    nats_to_bpb: float,
    batch_size: int = 4,
    chunk_tokens: int = 128,
    model_params=None,
    token_shift: int = 1,
    layer_transfer: bool = False,
    logit_stats: bool = False,
    mesh: Mesh | None = None,
    shard_model_params: bool = False,
) -> dict:
    """Per-layer metrics of the tuned lens and the logit lens on held-out sequences.

    Runs on a device mesh as training does: each batch is split over "data", the bank over
    "model" (and the frozen weights too with `shard_model_params`). In a multi-host run every
    host passes the same sequences and feeds only its own rows.

    Args:
      model: the subject model.
      translators: the trained bank (host values, or global arrays laid out by the mesh).
      sequences_nt: held-out token ids `[n, t]`.
      nats_to_bpb: the corpus's conversion factor (`TokenizedCorpus.nats_to_bpb`).
      batch_size: sequences per jitted evaluation batch, rounded up to a multiple of the mesh's
        "data" size when there are enough sequences (the last partial batch is dropped unless it
        is the only one).
      model_params: the parameters to use (default: the model's own).
      token_shift: the cross-entropies' labels: position i's is token i + token_shift (1: the
        next token, as tuned-lens's evaluation defaults to; 0: the same token).
      layer_transfer: also apply every translator to every layer (L^2 unembeddings per token);
        reported in the tuned-lens files under "tuned" -> "layer_transfer".
      logit_stats: also each lens's distribution at each layer, and the model's, averaged over
        every position (tuned-lens's `--record_logit_stats`): `result["logit_stats"]`, nested as
        its `logit_stats.json`, and each lens's bias `result[lens]["marginal_kl_nats"]`
        (`marginal_kl`).
      mesh: a ("data", "model") mesh (default: all devices on "data").
      shard_model_params: split the frozen weights over "model" (`model_param_shardings`).
    Returns:
      `{"logit": {"kl_nats", "kl_bpb", "ce_bpb", "entropy_bpb": [L]}, "tuned": {...},
        "baseline": {"ce_bpb", "entropy_bpb": float}, "tokens": int, "token_shift": int}` (with
        `logit_stats`, also "marginal_kl_nats" per lens and "logit_stats").
    """
    mesh = make_mesh(-1, 1) if mesh is None else mesh
    params = model.params if model_params is None else model_params
    param_shardings = model_param_shardings(params, mesh, shard_model_params)
    translator_shardings = bank_shardings(mesh, translators)
    batch_size, spec = _batch_layout(len(sequences_nt), batch_size, mesh.shape["data"])
    step = jax.jit(
        make_eval_step(
            model,
            chunk_tokens=chunk_tokens,
            token_shift=token_shift,
            layer_transfer=layer_transfer,
            logit_stats=logit_stats,
        ),
        in_shardings=(translator_shardings, param_shardings, NamedSharding(mesh, spec)),
        out_shardings=NamedSharding(mesh, P()),
    )
    params = put(params, param_shardings)
    translators = put(translators, translator_shardings)
    block, num_blocks = process_row_block(mesh, spec, (batch_size, sequences_nt.shape[1]))
    rows = batch_size // num_blocks
    per_batch, marginal_sums = [], {}
    for start in range(0, len(sequences_nt) - batch_size + 1, batch_size):
        mine = start + block * rows
        ids = global_batch(sequences_nt[mine : mine + rows], mesh, spec)
        metrics = jax.device_get(step(translators, params, ids))
        metrics = jax.tree.map(lambda x: np.asarray(x, np.float64), metrics)
        # [L, V] per lens: summed here rather than kept per batch (they are not in batches.jsonl).
        for key in [k for k in metrics if k.endswith("marginal")]:
            marginal_sums[key] = marginal_sums.get(key, 0.0) + metrics.pop(key)
        per_batch.append(metrics)
    means = jax.tree.map(lambda *xs: np.mean(xs, axis=0), *per_batch)
    result = {
        "tokens": int(len(per_batch) * batch_size * sequences_nt.shape[1]),
        "token_shift": token_shift,
    }
    for name in ("logit", "tuned"):
        kl = means[f"{name}/kl"]
        result[name] = {
            "kl_nats": kl.tolist(),
            "kl_bpb": (kl * nats_to_bpb).tolist(),
            "ce_bpb": (means[f"{name}/ce"] * nats_to_bpb).tolist(),
            "entropy_bpb": (means[f"{name}/entropy"] * nats_to_bpb).tolist(),
        }
    result["baseline"] = {
        "ce_bpb": float(means["logit/baseline_ce"] * nats_to_bpb),
        "entropy_bpb": float(means["logit/baseline_entropy"] * nats_to_bpb),
    }
    result["batches"] = [eval_report.tuned_lens_format(m, nats_to_bpb) for m in per_batch]
    if logit_stats:  # equal batches: the mean of their means is the mean over every position
        marginals = {key: total / len(per_batch) for key, total in marginal_sums.items()}
        result["logit_stats"] = eval_report.tuned_lens_logit_stats(marginals)
        for name in ("logit", "tuned"):
            result[name]["marginal_kl_nats"] = marginal_kl(
                marginals["logit/baseline_marginal"], marginals[f"{name}/marginal"]
            ).tolist()
    return result


def marginal_kl(model_marginal_v: np.ndarray, lens_marginals_lv: np.ndarray) -> np.ndarray:
    """A lens's bias at each layer: KL(model's mean distribution || lens's mean distribution)
    `[L]` in nats, from the marginals of `evaluate(..., logit_stats=True)` (float64 on the host).
    Tokens the model never gives any probability add nothing."""
    p_v = np.asarray(model_marginal_v, np.float64)
    q_lv = np.maximum(np.asarray(lens_marginals_lv, np.float64), np.finfo(np.float64).tiny)
    log_ratio_lv = np.log(np.where(p_v > 0, p_v, 1.0)) - np.log(q_lv)
    return (np.where(p_v > 0, p_v, 0.0) * log_ratio_lv).sum(-1)


def _batch_layout(num_sequences: int, batch_size: int, data: int) -> tuple[int, P]:
    """The batch size and its partition spec: split over "data" when every data-parallel device
    can get a row, else (fewer sequences than devices) the batch replicated on all."""
    batch_size = min(batch_size, num_sequences)
    rounded = -(-batch_size // data) * data
    if rounded <= num_sequences:
        return rounded, P("data")
    return batch_size, P()


def evaluate_lens(
    config,
    lens_source: str,
    out_dir,
    *,
    tokens: int = 0,
    token_shift: int = 1,
    layer_transfer: bool = False,
    record_logit_stats: bool = False,
) -> dict:
    """Evaluates a lens on the held-out split of `config`'s data; writes tuned-lens-style files.

    Args:
      config: a training config (model, data, seq_len, held-out size, seed).
      lens_source: a jaxlens workdir, a tuned-lens lens directory (or id), or "logit".
      out_dir: where `aggregate_metrics.json`, `batches.jsonl`, `eval.json`, `eval.png` go.
      tokens: evaluate on this many held-out tokens (0 = all of them).
      token_shift: the cross-entropies' label shift (see `evaluate`).
      layer_transfer: also write the translator-i-on-layer-j matrices.
      record_logit_stats: also write `logit_stats.json`, each lens's mean distribution per layer
        and the model's (tuned-lens's `--record_logit_stats`).
    """
    labelled_positions(config.data.seq_len, token_shift)  # refused before the model loads
    setup = job.setup(config, training=False)
    model, heldout = setup.model, setup.heldout
    available = heldout.chunks.size
    if tokens > available:
        raise ValueError(
            f"--tokens={tokens} exceeds the {available} held-out tokens "
            f"({heldout.num_chunks} sequences of {config.data.seq_len}); lower --tokens or raise "
            "--config.data.heldout_sequences."
        )
    sequences = heldout.chunks[: -(-tokens // config.data.seq_len)] if tokens else heldout.chunks
    if lens_source == "logit":  # the logit lens against itself: its numbers in both columns
        translators = Translators.zeros(model.num_layers, model.d_model)
    else:
        translators = lens_io.load_translators(lens_source, model)
    result = evaluate(
        model,
        translators,
        sequences,
        nats_to_bpb=heldout.nats_to_bpb,
        batch_size=config.eval_batch_size,
        chunk_tokens=config.eval_chunk_tokens,
        token_shift=token_shift,
        layer_transfer=layer_transfer,
        logit_stats=record_logit_stats,
        mesh=setup.mesh,
        shard_model_params=config.mesh.shard_model_params,
    )
    if jax.process_index() == 0:
        eval_report.write_files(result, pathlib.Path(out_dir))
    return result
