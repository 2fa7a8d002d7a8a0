"""Held-out evaluation of a tuned lens against the logit lens, per layer.

For each layer and each lens: KL(model output || lens) and next-token cross-entropy, averaged
over tokens, plus the model's own cross-entropy as a baseline. Cross-entropies are reported in
bits per byte (tuned-lens's unit, via the corpus's `nats_to_bpb`); KL in nats and in bits per byte.
Everything is computed with the chunked losses, so all layers' logits never exist at once, and
sharded over the device mesh like training.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlens.lens import Translators, TunedLens
from jaxlens.losses import layer_metrics, transfer_metrics
from jaxlens.models import SubjectModel
from jaxlens.sharding import (
    bank_shardings,
    global_batch,
    make_mesh,
    model_param_shardings,
    process_row_block,
    put,
)


def make_eval_step(model: SubjectModel, *, chunk_tokens: int = 2048, layer_transfer=False):
    """`eval_step(translators, model_params, ids_bt)` -> per-layer metrics of both lenses."""

    def eval_step(translators, model_params, ids_bt):
        hidden = model.apply(model_params, ids_bt).hidden_lbtd
        decoder = model.decoder(model_params)
        logit_lens = Translators.zeros(model.num_layers, model.d_model, bias=False)
        metrics = {}
        for name, bank in (("logit", logit_lens), ("tuned", translators)):
            lens = TunedLens(decoder=decoder, translators=bank)
            per_layer = layer_metrics(
                lens, hidden[:-1], hidden[-1], ids_bt, chunk_tokens=chunk_tokens
            )
            metrics.update({f"{name}/{k}": v for k, v in per_layer.items()})
        if layer_transfer:  # translator i on layer j, for the tuned lens (trivial for logit)
            lens = TunedLens(decoder=decoder, translators=translators)
            transfer = transfer_metrics(lens, hidden[:-1], ids_bt, chunk_tokens=chunk_tokens)
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
    chunk_tokens: int = 2048,
    model_params=None,
    layer_transfer: bool = False,
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
      layer_transfer: also apply every translator to every layer (L^2 unembeddings per token);
        reported in the tuned-lens files under "tuned" -> "layer_transfer".
      mesh: a ("data", "model") mesh (default: all devices on "data").
      shard_model_params: split the frozen weights over "model" (`model_param_shardings`).
    Returns:
      `{"logit": {"kl_nats", "kl_bpb", "ce_bpb", "entropy_bpb": [L]}, "tuned": {...},
        "baseline": {"ce_bpb", "entropy_bpb": float}, "tokens": int}`.
    """
    mesh = make_mesh(-1, 1) if mesh is None else mesh
    params = model.params if model_params is None else model_params
    param_shardings = model_param_shardings(params, mesh, shard_model_params)
    translator_shardings = bank_shardings(mesh, translators)
    batch_size, spec = _batch_layout(len(sequences_nt), batch_size, mesh.shape["data"])
    step = jax.jit(
        make_eval_step(model, chunk_tokens=chunk_tokens, layer_transfer=layer_transfer),
        in_shardings=(translator_shardings, param_shardings, NamedSharding(mesh, spec)),
        out_shardings=NamedSharding(mesh, P()),
    )
    params = put(params, param_shardings)
    translators = put(translators, translator_shardings)
    block, num_blocks = process_row_block(mesh, spec, (batch_size, sequences_nt.shape[1]))
    rows = batch_size // num_blocks
    per_batch = []
    for start in range(0, len(sequences_nt) - batch_size + 1, batch_size):
        mine = start + block * rows
        ids = global_batch(sequences_nt[mine : mine + rows], mesh, spec)
        metrics = jax.device_get(step(translators, params, ids))
        per_batch.append(jax.tree.map(lambda x: np.asarray(x, np.float64), metrics))
    means = jax.tree.map(lambda *xs: np.mean(xs, axis=0), *per_batch)
    result = {"tokens": int(len(per_batch) * batch_size * sequences_nt.shape[1])}
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
    result["batches"] = [tuned_lens_format(m, nats_to_bpb) for m in per_batch]
    return result


def _batch_layout(num_sequences: int, batch_size: int, data: int) -> tuple[int, P]:
    """The batch size and its partition spec: split over "data" when every data-parallel device
    can get a row, else (fewer sequences than devices) the batch replicated on all."""
    batch_size = min(batch_size, num_sequences)
    rounded = -(-batch_size // data) * data
    if rounded <= num_sequences:
        return rounded, P("data")
    return batch_size, P()


def tuned_lens_format(means: dict, nats_to_bpb: float) -> dict:
    """Metrics nested as tuned-lens's `aggregate_metrics.json`, in bits per byte:
    lens type -> metric -> `layer_i` (and `baseline` -> metric -> `final`)."""
    out = {}
    for name in ("logit", "tuned"):
        out[name] = {
            metric: {
                f"layer_{i}": float(v * nats_to_bpb)
                for i, v in enumerate(means[f"{name}/{metric}"])
            }
            for metric in ("ce", "entropy", "kl")
        }
    if "tuned/transfer_ce" in means:
        out["tuned"]["layer_transfer"] = {
            metric: {
                f"layer_{i}": {f"layer_{j}": float(v * nats_to_bpb) for j, v in enumerate(row)}
                for i, row in enumerate(means[f"tuned/transfer_{metric}"])
            }
            for metric in ("ce", "kl")
        }
    out["baseline"] = {
        "ce": {"final": float(means["logit/baseline_ce"] * nats_to_bpb)},
        "entropy": {"final": float(means["logit/baseline_entropy"] * nats_to_bpb)},
    }
    return out


def aggregate(result: dict) -> dict:
    """tuned-lens's `aggregate_metrics.json` of an `evaluate` result (mean over batches)."""
    batches = result["batches"]
    return jax.tree.map(lambda *xs: float(np.mean(xs)), *batches)


def format_table(result: dict) -> str:
    """A per-layer text table: KL (nats) and cross-entropy (bits/byte), logit vs tuned."""
    lines = [
        f"{'layer':>5}  {'KL logit':>9}  {'KL tuned':>9}  {'CE logit':>9}  {'CE tuned':>9}",
        f"{'':>5}  {'(nats)':>9}  {'(nats)':>9}  {'(bpb)':>9}  {'(bpb)':>9}",
    ]
    logit, tuned = result["logit"], result["tuned"]
    for layer in range(len(logit["kl_nats"])):
        lines.append(
            f"{layer:>5}  {logit['kl_nats'][layer]:>9.3f}  {tuned['kl_nats'][layer]:>9.3f}  "
            f"{logit['ce_bpb'][layer]:>9.3f}  {tuned['ce_bpb'][layer]:>9.3f}"
        )
    mean_logit, mean_tuned = np.mean(logit["kl_nats"]), np.mean(tuned["kl_nats"])
    lines.append(
        f"{'mean':>5}  {mean_logit:>9.3f}  {mean_tuned:>9.3f}  "
        f"{np.mean(logit['ce_bpb']):>9.3f}  {np.mean(tuned['ce_bpb']):>9.3f}"
    )
    lines.append(
        f"model's own cross-entropy: {result['baseline']['ce_bpb']:.3f} bpb; tuned/logit mean KL: "
        f"{mean_tuned / mean_logit:.1%} ({result['tokens']} held-out tokens)"
    )
    return "\n".join(lines)


def plot_curves(result: dict, path) -> None:
    """Saves per-layer curves (KL, cross-entropy, entropy), logit vs tuned lens, as a PNG."""
    from jaxlens import plotting

    plotting.metric_curves_png(result, path)


# Command line ------------------------------------------------------------------------------


def evaluate_lens(
    config, lens_source: str, out_dir, *, tokens: int = 0, layer_transfer: bool = False
) -> dict:
    """Evaluates a lens on the held-out split of `config`'s data; writes tuned-lens-style files.

    Args:
      config: a training config (model, data, seq_len, held-out size, seed).
      lens_source: a jaxlens workdir, a tuned-lens lens directory (or id), or "logit".
      out_dir: where `aggregate_metrics.json`, `batches.jsonl`, `eval.json`, `eval.png` go.
      tokens: evaluate on this many held-out tokens (0 = all of them).
      layer_transfer: also write the translator-i-on-layer-j matrices.
    """
    import json
    import pathlib

    from jaxlens import lens_io, train_lib

    if config.distributed:
        train_lib.start_distributed(config)
    mesh = make_mesh(config.mesh.data, config.mesh.model)
    model = train_lib.load_subject(config)
    train_lib.check_config(config, model)
    _, heldout = train_lib.load_corpus(config, model.tokenizer)
    available = heldout.chunks.size
    if tokens > available:
        raise ValueError(
            f"--tokens={tokens} exceeds the {available} held-out tokens "
            f"({heldout.num_chunks} sequences of {config.data.seq_len}); lower --tokens or raise "
            "--config.data.heldout_sequences."
        )
    sequences = heldout.chunks[: -(-tokens // config.data.seq_len)] if tokens else heldout.chunks
    if lens_source == "logit":
        translators = Translators.zeros(model.num_layers, model.d_model)
    else:
        translators = lens_io.load_translators(lens_source, model)
    result = evaluate(
        model,
        translators,
        sequences,
        nats_to_bpb=heldout.nats_to_bpb,
        batch_size=config.eval_batch_size,
        chunk_tokens=config.chunk_tokens,
        layer_transfer=layer_transfer,
        mesh=mesh,
        shard_model_params=config.mesh.shard_model_params,
    )
    if jax.process_index() != 0:
        return result
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "aggregate_metrics.json").write_text(json.dumps(aggregate(result)))
    (out / "batches.jsonl").write_text("".join(json.dumps(b) + "\n" for b in result["batches"]))
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    plot_curves(result, out / "eval.png")
    return result


def run():
    """`python -m jaxlens.evaluate --config=... --lens=... --out=...` (console: jaxlens-eval)."""
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", None, "Config naming model and data.")
    lens = flags.DEFINE_string("lens", None, "jaxlens workdir, tuned-lens lens dir, or 'logit'.")
    out = flags.DEFINE_string("out", None, "Output directory.")
    tokens = flags.DEFINE_integer("tokens", 0, "Held-out tokens to evaluate on (0 = all).")
    transfer = flags.DEFINE_bool("layer_transfer", False, "Also translator i on layer j.")
    flags.mark_flags_as_required(["config", "lens", "out"])

    def main(argv):
        del argv
        result = evaluate_lens(
            config_flag.value,
            lens.value,
            out.value,
            tokens=tokens.value,
            layer_transfer=transfer.value,
        )
        print(format_table(result))

    app.run(main)


if __name__ == "__main__":
    run()
