"""Closed-form translators on SmolLM2 / Shakespeare: held-out KL and fit time by token budget and
ridge, with and without a bias, with and without attention-sink tokens; precision of the sums.

Run (about 12 minutes on a 2-core CPU; writes bench/results/closed_form.json):
  PYTHONPATH=$PWD python bench/closed_form_measure.py
and the larger budget (about 3 minutes):
  PYTHONPATH=$PWD python bench/closed_form_measure.py --budgets=32768 --ridges=1e-4,1e-3 \
      --grid_only --out=bench/results/closed_form_32k.json

Data as in configs/smollm2_shakespeare.py: sequences of 256 tokens, 8 held-out sequences picked by
seed 42; the fit's sequences are a seeded random draw from the training split. Held-out KL is the
mean over the 30 layers of KL(model || lens) in nats on all 2048 held-out tokens, computed by
`jaxlens.metrics.layer_metrics` (what `jaxlens.eval_lib.evaluate` runs; the last row checks one
lens against `evaluate` itself). "fit s" is the wall time of the statistics pass over the budget
(compilation included) plus the solve.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import numpy as np

from jaxlens import assets
from jaxlens import data as data_lib
from jaxlens.closed_form import accumulate_statistics, fold, solve
from jaxlens.closed_form.statistics import Accumulator, observed_coordinates
from jaxlens.eval_lib import evaluate
from jaxlens.lens import Translators
from jaxlens.metrics import layer_metrics
from jaxlens.models import load_model

BUDGETS = (2048, 4096, 8192, 16384)
RIDGES = (1e-4, 1e-3, 1e-2, 1e-1)
SEQ_LEN, HELDOUT, SEED, BATCH = 256, 8, 42, 8


def log(*args):
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/closed_form.json")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny budgets")
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="tokens, a,b,..")
    parser.add_argument("--ridges", default=",".join(map(str, RIDGES)), help="λ values, a,b,..")
    parser.add_argument("--grid_only", action="store_true", help="only the budget x λ grid")
    args = parser.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    ridges = [float(r) for r in args.ridges.split(",")]
    if args.quick:
        budgets, ridges = (512, 1024), (1e-3, 1e-2)
    started = time.perf_counter()
    model = load_model("embedded:smollm2")
    stream = data_lib.tokenize_stream(assets.shakespeare_texts(), model.tokenizer)
    train, heldout = data_lib.split_heldout(
        data_lib.chunk_stream(stream, SEQ_LEN), heldout_chunks=HELDOUT, seed=SEED
    )
    order = np.random.default_rng(SEED).permutation(train.num_chunks)
    fit_sequences = train.chunks[order[: max(budgets) // SEQ_LEN]]
    observed = observed_coordinates(model.decoder())
    heldout_ids = heldout.chunks[:2] if args.quick else heldout.chunks
    per_layer_kl = held_out_kl(model, heldout_ids)
    rows, results = [], {}

    def record(name, bank, fit_seconds, **extra):
        t = time.perf_counter()
        kl_l = per_layer_kl(bank)
        row = dict(name=name, kl=float(kl_l.mean()), fit_s=fit_seconds, **extra)
        row["eval_s"] = time.perf_counter() - t
        row["kl_l"] = kl_l.tolist()
        rows.append(row)
        log(f"{name:<40} KL {row['kl']:.3f}  fit {fit_seconds:6.1f} s")
        return row

    logit = record("logit lens", Translators.zeros(model.num_layers, model.d_model), 0.0)
    stats_at = {}
    for budget in budgets:
        t = time.perf_counter()
        acc = accumulate_statistics(model, fit_sequences[: budget // SEQ_LEN], batch_size=BATCH)
        jax.block_until_ready(acc)
        stats_s = time.perf_counter() - t
        stats_at[budget] = (acc, stats_s)
        for ridge in ridges:
            bank, solve_s = timed_solve(acc, ridge=ridge, observed_d=observed)
            record(
                f"closed form {budget} tok, ridge {ridge:g}",
                bank,
                stats_s + solve_s,
                budget=budget,
                ridge=ridge,
                stats_s=stats_s,
                solve_s=solve_s,
            )

    if args.grid_only:
        return finish(args.out, results, rows, logit["kl"], started)
    budget = budgets[min(2, len(budgets) - 1)]
    at_budget = [r for r in rows if r.get("budget") == budget]
    best = min(at_budget, key=lambda r: r["kl"])
    ridge = best["ridge"]
    acc, stats_s = stats_at[budget]
    for label, kwargs in (
        ("bias fitted", dict(fit_bias=True)),
        ("ridge towards identity", dict(towards_identity=True)),
    ):
        bank, solve_s = timed_solve(acc, ridge=ridge, observed_d=observed, **kwargs)
        record(
            f"{label}, {budget} tok, ridge {ridge:g}",
            bank,
            stats_s + solve_s,
            budget=budget,
            ridge=ridge,
            variant=label,
        )
    for label, kwargs in (
        ("position 0 excluded", dict(skip_positions=1)),
        ("rms > 5x median excluded", dict(max_rms_ratio=5.0)),
    ):
        t = time.perf_counter()
        sink_acc = accumulate_statistics(
            model, fit_sequences[: budget // SEQ_LEN], batch_size=BATCH, **kwargs
        )
        jax.block_until_ready(sink_acc)
        sink_s = time.perf_counter() - t
        bank, solve_s = timed_solve(sink_acc, ridge=ridge, observed_d=observed)
        record(
            f"{label}, {budget} tok, ridge {ridge:g}",
            bank,
            sink_s + solve_s,
            budget=budget,
            ridge=ridge,
            variant=label,
        )

    # The same lens through jaxlens.eval_lib.evaluate (forward included, both lenses).
    bank, _ = timed_solve(acc, ridge=ridge, observed_d=observed)
    t = time.perf_counter()
    official = evaluate(
        model,
        bank,
        heldout_ids,
        nats_to_bpb=heldout.nats_to_bpb,
        batch_size=HELDOUT,
        chunk_tokens=1024,
    )
    results["evaluate_check"] = {
        "logit_kl": float(np.mean(official["logit"]["kl_nats"])),
        "tuned_kl": float(np.mean(official["tuned"]["kl_nats"])),
        "fast_path_tuned_kl": best["kl"],
        "seconds": time.perf_counter() - t,
        "tuned_kl_l": official["tuned"]["kl_nats"],
        "logit_kl_l": official["logit"]["kl_nats"],
    }
    log("evaluate() check", results["evaluate_check"])
    results["precision"] = precision_check(
        model, fit_sequences[: (512 if args.quick else 2048) // SEQ_LEN], observed
    )
    results["memory"] = step_memory(model)
    finish(args.out, results, rows, logit["kl"], started)


def finish(out, results, rows, logit_kl, started):
    results["rows"] = rows
    results["logit_kl"] = logit_kl
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(out).write_text(json.dumps(results, indent=1))
    print_table(rows, logit_kl)
    log(f"total {time.perf_counter() - started:.0f} s")


def timed_solve(acc, **kwargs):
    t = time.perf_counter()
    bank = solve(acc, **kwargs)
    return bank, time.perf_counter() - t


def held_out_kl(model, sequences_nt):
    """Per-layer held-out KL of a bank, from hidden states computed once (one compile)."""
    ids = np.asarray(sequences_nt, np.int32)
    hidden = jax.jit(lambda p, i: model.apply(p, i).hidden_lbtd)(model.params, ids)
    decoder = model.decoder()

    @jax.jit
    def kl_l(bank, decoder, hidden, ids):  # all arguments: no constant folding of [t, V] logits
        return layer_metrics(decoder, bank, hidden[:-1], hidden[-1], ids, chunk_tokens=1024)["kl"]

    def per_layer(bank):
        if bank.bias_ld is None:
            bank = Translators(bank.kernel_ldd, np.zeros(bank.kernel_ldd.shape[:2], np.float32))
        return np.asarray(kl_l(bank, decoder, hidden, ids), np.float64)

    return per_layer


def precision_check(model, sequences_nt, observed):
    """Device sums (float64, and the float32 compensated fallback) against float64 numpy sums of
    the same hidden states (computed in the same batches of 2), and against reversed batches."""
    hidden = np.concatenate(
        [
            np.asarray(forward_hidden(model, sequences_nt[i : i + 2]), np.float64)
            for i in range(0, len(sequences_nt), 2)
        ],
        axis=1,
    )
    decoder = model.decoder()
    d = model.d_model
    y = hidden[-1].reshape(-1, d) / np.asarray(decoder.norm_scale_d, np.float64)
    ridges = (1e-4, 1e-3, 1e-2)
    out = {}
    for dtype in ("float64", "float32"):
        acc = accumulate_statistics(model, sequences_nt, batch_size=2, dtype=dtype)
        reversed_acc = accumulate_statistics(model, sequences_nt[::-1], batch_size=2, dtype=dtype)
        for r in ridges:
            fast = np.asarray(solve(acc, ridge=r, observed_d=observed).kernel_ldd, np.float64)
            other = np.asarray(solve(reversed_acc, ridge=r, observed_d=observed).kernel_ldd)
            worst_f64 = worst_order = 0.0
            for layer in range(model.num_layers):
                x = hidden[layer].reshape(-1, d)
                x = x / np.sqrt((x**2).mean(-1, keepdims=True))
                xx = x.T @ x
                m = np.linalg.solve(xx + r * np.trace(xx) / d * np.eye(d), x.T @ y)
                scale = np.abs(m).max()
                worst_f64 = max(worst_f64, np.abs(fast[layer] + np.eye(d) - m).max() / scale)
                worst_order = max(worst_order, np.abs(other[layer] - fast[layer]).max() / scale)
            out[f"{dtype} sums, ridge {r:g}"] = {
                "vs_float64_numpy": worst_f64,
                "vs_reversed_batches": worst_order,
            }
    log("precision (max over layers of max|diff| / max|M|):", json.dumps(out, indent=1))
    return out


_FORWARD = {}


def forward_hidden(model, ids):
    if "f" not in _FORWARD:
        _FORWARD["f"] = jax.jit(lambda p, i: model.apply(p, i).hidden_lbtd)
    return _FORWARD["f"](model.params, np.asarray(ids, np.int32))


def step_memory(model):
    """XLA's memory analysis of one batch (BATCH x 256 tokens, one device): the forward step
    and the float64 fold of its hidden states into the sums."""
    ids = np.zeros((BATCH, SEQ_LEN), np.int32)
    hidden = jax.eval_shape(lambda p, i: model.apply(p, i).hidden_lbtd, model.params, ids)
    weights = jax.ShapeDtypeStruct((hidden.shape[0] - 1, *hidden.shape[1:3]), np.float32)
    forward = jax.jit(lambda p, i: model.apply(p, i).hidden_lbtd).lower(model.params, ids)
    with jax.enable_x64(True):
        acc = jax.eval_shape(lambda: Accumulator.zeros(model.num_layers, model.d_model, np.float64))
        folded = jax.jit(fold, donate_argnums=0).lower(acc, model.decoder(), hidden, weights)
        out = {"accumulator_bytes": sum(x.size * 8 for x in jax.tree.leaves(acc))}
        for name, lowered in (("forward", forward), ("fold", folded)):
            analysis = lowered.compile().memory_analysis()
            out[f"{name}_temp_bytes"] = getattr(analysis, "temp_size_in_bytes", None)
            out[f"{name}_argument_bytes"] = getattr(analysis, "argument_size_in_bytes", None)
    log("memory", out)
    return out


def print_table(rows, logit_kl):
    print("\n| fit | held-out mean KL (nats) | % of logit lens | fit wall s (compile incl.) |")
    print("|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['name']} | {row['kl']:.3f} | {row['kl'] / logit_kl:.1%} | {row['fit_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
