"""Trains a tuned lens: `python -m jaxlens.train --config=configs/<name>.py --workdir=DIR`.

Only parses flags; the job is `train_lib.train_and_evaluate`, which notebooks and tests call too.
Any config field can be overridden on the command line, e.g. `--config.num_steps=100`.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from jaxlens import train_lib
from jaxlens.evaluate import format_table

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    result = train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    print("\nHeld-out evaluation, logit lens vs tuned lens:\n")
    print(format_table(result))
    print(f"\nCheckpoints, metrics.jsonl, eval.json and eval.png are in {_WORKDIR.value}")


def run():
    """Console-script entry point (`jaxlens-train`)."""
    app.run(main)


if __name__ == "__main__":
    run()
