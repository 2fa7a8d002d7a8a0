"""From raw child results to the summary: per-run metrics, spreads, ratios, parity, the tables.

Every statistic over repeats is reported as min / median / max. A ratio `a / b` is formed per
repeat (the runs of `a` and `b` in the same repeat ran back to back, so they saw the same machine
load) and then summarised the same way.
"""

from __future__ import annotations

import json
import statistics

import numpy as np

from bench import flops

# What `run_metrics` derives from one throughput run; each is summarised over repeats.
METRICS = (
    "train_step_s",
    "eval_step_s",
    "train_tokens_per_s",
    "eval_tokens_per_s",
    "first_step_s",
    "compile_s",
    "train_gflops",
    "train_fraction_of_peak",
    "eval_gflops",
    "eval_fraction_of_peak",
    "train_loop_peak_rss_mib",
    "train_loop_growth_mib",
    "ru_maxrss_mib",
    "setup_s",
)


def run_metrics(run: dict, peak_gflops: float) -> dict:
    """The derived metrics of one throughput run (None where a run has no such part)."""
    case, facts = run["case"], run["facts"]
    tokens = case["tokens_per_step"]
    train_tps = case["train_steps"] * tokens / run["train_loop_s"]
    out = dict.fromkeys(METRICS)
    out.update(
        train_step_s=run["train_loop_s"] / case["train_steps"],
        train_tokens_per_s=train_tps,
        first_step_s=run["compile_s"] + run["first_step_s"],
        compile_s=run["compile_s"],
        train_gflops=flops.train_flops_per_token(facts) * train_tps / 1e9,
        train_loop_peak_rss_mib=run["train_rss"]["peak_mib"],
        train_loop_growth_mib=run["train_rss"]["peak_mib"] - run["train_rss"]["start_mib"],
        ru_maxrss_mib=run["ru_maxrss_mib"],
        setup_s=run["import_s"] + run["load_s"],
    )
    out["train_fraction_of_peak"] = out["train_gflops"] / peak_gflops
    if run.get("eval_loop_s"):
        eval_tps = case["eval_steps"] * tokens / run["eval_loop_s"]
        out["eval_step_s"] = run["eval_loop_s"] / case["eval_steps"]
        out["eval_tokens_per_s"] = eval_tps
        out["eval_gflops"] = flops.eval_flops_per_token(facts) * eval_tps / 1e9
        out["eval_fraction_of_peak"] = out["eval_gflops"] / peak_gflops
    return out


def spread(values: list[float | None]) -> dict | None:
    """min / median / max / n of the values that exist."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
        "n": len(values),
    }


def summarize_throughput(runs: list[dict], peak_gflops: float, ratios) -> dict:
    """`{case: {"impls": {impl: {metric: spread}}, "ratios": {"a / b": {metric: spread}}}}`."""
    by_case: dict[str, dict[str, dict[int, dict]]] = {}
    for run in runs:
        if "error" in run:
            continue
        metrics = run_metrics(run, peak_gflops)
        by_case.setdefault(run["case"]["name"], {}).setdefault(run["impl"]["name"], {})[
            run["repeat"]
        ] = metrics
    summary = {}
    for case, impls in by_case.items():
        summary[case] = {
            "impls": {
                impl: {m: spread([r[m] for r in reps.values()]) for m in METRICS}
                for impl, reps in impls.items()
            },
            "ratios": _ratios(impls, ratios),
        }
    return summary


def _ratios(impls: dict, pairs) -> dict:
    """`top / bottom` of each metric, per repeat that both ran."""
    out = {}
    for top, bottom in pairs:
        if top not in impls or bottom not in impls:
            continue
        ratio = {}
        for metric in ("train_tokens_per_s", "eval_tokens_per_s", "train_loop_peak_rss_mib"):
            below = impls[bottom]
            if not any(run[metric] for run in below.values()):
                # tuned-lens as shipped evaluates in float32 on a CPU: its float32 runs stand in.
                below = impls.get("tuned-lens-f32", {})
            ratio[metric] = spread(
                [
                    run[metric] / below[r][metric]
                    for r, run in impls[top].items()
                    if r in below and run[metric] and below[r][metric]
                ]
            )
        out[f"{top} / {bottom}"] = ratio
    return out


def summarize_memory(runs: list[dict]) -> dict:
    """`{impl: {tokens: {loop peak, loop start, growth, ru_maxrss}}}` in MiB."""
    out: dict[str, dict] = {}
    for run in runs:
        if "error" in run:
            continue
        rss = run["train_rss"]
        out.setdefault(run["impl"]["name"], {})[str(run["case"]["tokens_per_step"])] = {
            "loop_peak_mib": rss["peak_mib"],
            "loop_start_mib": rss["start_mib"],
            "loop_growth_mib": rss["peak_mib"] - rss["start_mib"],
            "ru_maxrss_mib": run["ru_maxrss_mib"],
        }
    return out


# Parity ------------------------------------------------------------------------------------


def _flat(result: dict, part: str) -> dict[str, float]:
    """The training losses (`part="train"`) or evaluation metrics ("eval") of a parity result,
    keyed by where each comes from."""
    flat = {}
    if part == "train":
        for step, losses in enumerate(result["train_loss_sl"]):
            flat.update({f"train step {step + 1} layer {i}": v for i, v in enumerate(losses)})
        return flat
    for lens in ("logit", "tuned"):
        for metric, values in result["eval"][lens].items():
            flat.update({f"eval {lens} {metric} layer {i}": v for i, v in enumerate(values)})
    for metric, value in result["eval"]["baseline"].items():
        flat[f"eval baseline {metric}"] = value
    return flat


def compare(result: dict, reference: dict, tolerances: dict[str, float]) -> dict:
    """Largest deviations of `result` from `reference`, per part ("train", "eval"), and whether
    every value is within `tolerances[part] * max(1, |reference|)`."""
    out = {"ok": True}
    for part, tolerance in tolerances.items():
        got, want = _flat(result, part), _flat(reference, part)
        if got.keys() != want.keys():
            return {"ok": False, "why": f"different {part} layers or metrics"}
        keys = sorted(want)
        a = np.array([got[k] for k in keys])
        b = np.array([want[k] for k in keys])
        error = np.abs(a - b)
        scaled = error / np.maximum(1.0, np.abs(b))
        worst = int(np.argmax(scaled))
        ok = bool(np.all(scaled <= tolerance)) and bool(np.all(np.isfinite(a)))
        out["ok"] = out["ok"] and ok
        out[part] = {
            "ok": ok,
            "tolerance": tolerance,
            "compared": len(keys),
            "max_abs_error": float(error.max()),
            "max_scaled_error": float(scaled.max()),
            "worst": keys[worst],
            "worst_values": [float(a[worst]), float(b[worst])],
            "reference_range": [float(b.min()), float(b.max())],
        }
    return out


# Tables ------------------------------------------------------------------------------------


def _fmt(s: dict | None, scale: float = 1.0, digits: int = 1) -> str:
    if not s:
        return "-"
    med = f"{s['median'] * scale:.{digits}f}"
    if s["n"] == 1:
        return med
    return f"{med} [{s['min'] * scale:.{digits}f}-{s['max'] * scale:.{digits}f}]"


def throughput_table(summary: dict) -> str:
    head = (
        f"{'case':<11} {'implementation':<19} {'train tok/s':>20} {'eval tok/s':>20} "
        f"{'1st step s':>11} {'train % peak':>13} {'eval % peak':>12} {'loop RSS MiB':>13}"
    )
    lines = [head, "-" * len(head)]
    for case, entry in summary.items():
        for impl, m in entry["impls"].items():
            lines.append(
                f"{case:<11} {impl:<19} {_fmt(m['train_tokens_per_s']):>20} "
                f"{_fmt(m['eval_tokens_per_s']):>20} {_fmt(m['first_step_s'], digits=1):>11} "
                f"{_fmt(m['train_fraction_of_peak'], 100, 0):>13} "
                f"{_fmt(m['eval_fraction_of_peak'], 100, 0):>12} "
                f"{_fmt(m['train_loop_peak_rss_mib'], digits=0):>13}"
            )
    return "\n".join(lines)


def ratio_table(summary: dict) -> str:
    head = f"{'case':<11} {'ratio':<38} {'train tok/s':>18} {'eval tok/s':>18} {'loop RSS':>18}"
    lines = [head, "-" * len(head)]
    for case, entry in summary.items():
        for name, r in entry["ratios"].items():
            lines.append(
                f"{case:<11} {name:<38} {_fmt(r.get('train_tokens_per_s'), digits=2):>18} "
                f"{_fmt(r.get('eval_tokens_per_s'), digits=2):>18} "
                f"{_fmt(r.get('train_loop_peak_rss_mib'), digits=2):>18}"
            )
    return "\n".join(lines)


def memory_table(memory: dict) -> str:
    sizes = sorted({int(t) for impl in memory.values() for t in impl})
    head = f"{'implementation':<19} " + " ".join(f"{f'{t} tok/step':>22}" for t in sizes)
    lines = [head, "-" * len(head)]
    for impl, per_size in memory.items():
        cells = []
        for t in sizes:
            m = per_size.get(str(t))
            if m is None:
                cells.append("-")
                continue
            growth = m["loop_growth_mib"]
            cells.append(f"{m['loop_peak_mib']:>6.0f} (+{growth:>5.0f}) {m['ru_maxrss_mib']:>6.0f}")
        lines.append(f"{impl:<19} " + " ".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def parity_table(parity: dict) -> str:
    lines = []
    for case, entry in parity.items():
        for impl, c in entry["comparisons"].items():
            if "why" in c:
                lines.append(f"{case:<11} {impl:<19} FAIL  {c['why']}")
                continue
            for part in ("train", "eval"):
                p = c[part]
                verdict = ("PASS" if p["ok"] else "FAIL") if c["gating"] else "info"
                lines.append(
                    f"{case:<11} {impl:<19} {part:<5} {verdict:<4} max |diff| "
                    f"{p['max_abs_error']:.1e}, scaled {p['max_scaled_error']:.1e} "
                    f"(limit {p['tolerance']:.0e}; worst: {p['worst']}, "
                    f"{p['worst_values'][0]:.4g} vs {p['worst_values'][1]:.4g})"
                )
    return "\n".join(lines)


def _gflops_line(peak: dict) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in peak.items() if k != "size")


def tables(record: dict) -> str:
    """Everything a run prints: parity, matmul peaks, throughput, ratios, memory, machine."""
    peak = record["peak"]
    parts = [
        "\nParity (per-layer losses of 2 training steps and the evaluation metrics, against "
        "tuned-lens-f32):",
        parity_table(record["parity"]),
        f"\nMatmul GFLOP/s ({peak['start']['size']}^2), start: {_gflops_line(peak['start'])}; "
        f"end: {_gflops_line(peak.get('end', {}))}.",
        "\nThroughput: median [min-max] over repeats. 1st step s = compilation + first step. "
        f"% peak = achieved matmul GFLOP/s over the best float32 product "
        f"({peak['float32_peak_gflops']:.0f} GFLOP/s). loop RSS = peak resident memory sampled "
        "during the training steps (MiB). tuned-lens-shipped has no evaluation of its own: "
        "tuned-lens's eval loop autocasts only on CUDA, so on a CPU it is tuned-lens-f32's.",
        throughput_table(record["summary"]),
        "\nRatios per repeat, then median [min-max] (tok/s: > 1 means the first is faster; "
        "RSS: < 1 means the first uses less):",
        ratio_table(record["summary"]),
    ]
    if record["memory"]:
        parts += [
            "\nPeak memory (MiB) by tokens per step: resident peak during the training steps "
            "(+ its growth over the loop's start), then ru_maxrss of the whole child process "
            "(imports and compilation included):",
            memory_table(record["memory"]),
        ]
    threads = record["thread_settings"]
    parts.append(f"\nThreads and flags: {json.dumps(threads)}")
    start, end = (
        " / ".join(f"{x:.2f}" for x in record[k]) for k in ("load_avg_start", "load_avg_end")
    )
    parts.append(f"\nLoad average (1 / 5 / 15 min): before {start}, after {end}.")
    return "\n".join(parts)
