"""Held-out evaluation of a tuned lens against the logit lens, per layer.

For each layer and each lens: KL(model output || lens) and next-token cross-entropy, averaged
over tokens, plus the model's own cross-entropy as a baseline. Cross-entropies are reported in
bits per byte (tuned-lens's unit, via the corpus's `nats_to_bpb`); KL in nats and in bits per byte.
Everything is computed with the chunked losses, so all layers' logits never exist at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.lens import Translators, TunedLens
from jaxlens.losses import layer_metrics
from jaxlens.models import SubjectModel


def make_eval_step(model: SubjectModel, *, chunk_tokens: int = 2048):
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
) -> dict:
    """Per-layer metrics of the tuned lens and the logit lens on held-out sequences.

    Args:
      model: the subject model.
      translators: the trained bank.
      sequences_nt: held-out token ids `[n, t]`.
      nats_to_bpb: the corpus's conversion factor (`TokenizedCorpus.nats_to_bpb`).
      batch_size: sequences per jitted evaluation batch (the last partial batch is dropped
        unless it is the only one).
    Returns:
      `{"logit": {"kl_nats", "kl_bpb", "ce_bpb", "entropy_bpb": [L]}, "tuned": {...},
        "baseline": {"ce_bpb", "entropy_bpb": float}, "tokens": int}`.
    """
    params = model.params if model_params is None else model_params
    step = jax.jit(make_eval_step(model, chunk_tokens=chunk_tokens))
    batch_size = min(batch_size, len(sequences_nt))
    batches = [
        sequences_nt[i : i + batch_size]
        for i in range(0, len(sequences_nt) - batch_size + 1, batch_size)
    ]
    sums = None
    for ids in batches:
        metrics = jax.device_get(step(translators, params, jnp.asarray(ids)))
        sums = metrics if sums is None else jax.tree.map(np.add, sums, metrics)
    means = jax.tree.map(lambda x: np.asarray(x, np.float64) / len(batches), sums)
    result = {"tokens": int(len(batches) * batch_size * sequences_nt.shape[1])}
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
    return result


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
    """Saves per-layer KL and cross-entropy curves, logit vs tuned, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in (
        (axes[0], "kl_nats", "KL(model || lens) [nats]"),
        (axes[1], "ce_bpb", "next-token cross-entropy [bits/byte]"),
    ):
        for name, style in (("logit", "o--"), ("tuned", "o-")):
            ax.plot(result[name][key], style, label=f"{name} lens", markersize=3)
        ax.set_xlabel("layer")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].axhline(result["baseline"]["ce_bpb"], color="gray", lw=1, label="model output")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
