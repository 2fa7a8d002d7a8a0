"""Trains a tuned lens: `python -m jaxlens.train --config=configs/<name>.py --workdir=DIR`.

Only parses flags; the job is `train_lib.train_and_evaluate`, which notebooks and tests call too.
Any config field can be overridden on the command line, e.g. `--config.num_steps=100`.
"""

from absl import flags
from ml_collections import config_flags

from jaxlens import cli

FLAGS = cli.command_flags()
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file.", flag_values=FLAGS
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints and metrics.", flag_values=FLAGS
)
flags.mark_flags_as_required(["config", "workdir"], flag_values=FLAGS)


def job(values) -> None:
    del values
    from jaxlens import eval_report, train_lib

    result = train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    print("\nHeld-out evaluation, logit lens vs tuned lens:\n")
    print(eval_report.format_table(result))
    print(f"\nCheckpoints, metrics.jsonl, eval.json and eval.png are in {_WORKDIR.value}")


main = cli.main_of(FLAGS, job)

if __name__ == "__main__":
    main()
