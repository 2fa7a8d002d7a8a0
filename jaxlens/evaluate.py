"""Evaluates a lens on held-out text: `python -m jaxlens.evaluate --config --lens --out`.

Writes tuned-lens's `aggregate_metrics.json` and `batches.jsonl` (and with `--record_logit_stats`
its `logit_stats.json`; plus `eval.json`, `eval.png`) to `--out`. The lens is a jaxlens workdir,
a tuned-lens lens directory or id, or "logit". Only parses flags; the job is
`eval_lib.evaluate_lens`.
"""

from absl import flags
from ml_collections import config_flags

from jaxlens import cli

FLAGS = cli.command_flags()
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config naming the model and data.", flag_values=FLAGS
)
_LENS = flags.DEFINE_string(
    "lens", None, "jaxlens workdir, tuned-lens lens dir, or 'logit'.", flag_values=FLAGS
)
_OUT = flags.DEFINE_string("out", None, "Output directory.", flag_values=FLAGS)
_TOKENS = flags.DEFINE_integer(
    "tokens", 0, "Held-out tokens to evaluate on (0 = all).", lower_bound=0, flag_values=FLAGS
)
_TOKEN_SHIFT = flags.DEFINE_integer(
    "token_shift",
    1,
    "Cross-entropy labels: position i's is token i + token_shift (1: next token; 0: same token).",
    flag_values=FLAGS,
)
_TRANSFER = flags.DEFINE_bool(
    "layer_transfer", False, "Also translator i on layer j.", flag_values=FLAGS
)
_LOGIT_STATS = flags.DEFINE_bool(
    "record_logit_stats",
    False,
    "Also write logit_stats.json: each lens's mean distribution per layer, and the model's.",
    flag_values=FLAGS,
)
flags.mark_flags_as_required(["config", "lens", "out"], flag_values=FLAGS)


def job(values) -> None:
    del values
    from jaxlens import eval_lib, eval_report

    result = eval_lib.evaluate_lens(
        _CONFIG.value,
        _LENS.value,
        _OUT.value,
        tokens=_TOKENS.value,
        token_shift=_TOKEN_SHIFT.value,
        layer_transfer=_TRANSFER.value,
        record_logit_stats=_LOGIT_STATS.value,
    )
    print(eval_report.format_table(result))


main = cli.main_of(FLAGS, job)

if __name__ == "__main__":
    main()
