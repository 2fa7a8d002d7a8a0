"""The formats of an evaluation result: tuned-lens's JSON files, a text table, a plot.

`eval_lib.evaluate` returns per-layer means in nats and bits per byte, and for each batch the
metrics nested as tuned-lens's `aggregate_metrics.json` nests them (lens type -> metric ->
`layer_i`), so tuned-lens users can read jaxlens's files with their own tools.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np


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


def tuned_lens_logit_stats(marginals: dict) -> dict:
    """Mean distributions nested as tuned-lens's `logit_stats.json`: lens type -> "logit_stats"
    -> `layer_i` -> `[V]` probabilities, and `baseline` -> "logit_stats" -> `final`, from
    `{"<lens>/marginal": [L, V], "logit/baseline_marginal": [V]}`."""
    out = {
        name: {
            "logit_stats": {
                f"layer_{i}": row.tolist() for i, row in enumerate(marginals[f"{name}/marginal"])
            }
        }
        for name in ("logit", "tuned")
    }
    out["baseline"] = {"logit_stats": {"final": marginals["logit/baseline_marginal"].tolist()}}
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
    if "marginal_kl_nats" in logit:
        lines.append(
            "bias, KL(model's mean distribution || lens's), mean over layers: "
            f"logit {np.mean(logit['marginal_kl_nats']):.3f}, "
            f"tuned {np.mean(tuned['marginal_kl_nats']):.3f} nats"
        )
    return "\n".join(lines)


def plot_curves(result: dict, path) -> None:
    """Saves per-layer curves (KL, cross-entropy, entropy), logit vs tuned lens, as a PNG."""
    from jaxlens import plotting

    plotting.metric_curves_png(result, path)


def write_files(result: dict, out: pathlib.Path) -> None:
    """`aggregate_metrics.json`, `batches.jsonl` (and `logit_stats.json` when recorded) as
    tuned-lens writes them, plus the rest of the result as `eval.json` and its curves as
    `eval.png`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "aggregate_metrics.json").write_text(json.dumps(aggregate(result)))
    (out / "batches.jsonl").write_text("".join(json.dumps(b) + "\n" for b in result["batches"]))
    rest = dict(result)
    if "logit_stats" in rest:
        (out / "logit_stats.json").write_text(json.dumps(rest.pop("logit_stats")))
    (out / "eval.json").write_text(json.dumps(rest, indent=1))
    plot_curves(result, out / "eval.png")
