"""Tuned lens for Gemma-2B with tuned-lens's full recipe (gated: accept the licence, log in).

Run (needs the network for the model and FineWeb; preset: a TPU v5e-8, 8 chips of 16 GiB):
  python -m jaxlens.train --config=configs/gemma.py --workdir=/tmp/jaxlens/gemma
TPU VM slice: run the same command on every worker with --config.distributed=True.
"""

from configs import hub_common

# The Cloud TPU slice this preset is sized for (`jaxlens plan` checks it fits there).
TOPOLOGY = "v5e-8"


def get_config():
    c = hub_common.get_config()
    c.model.source = "google/gemma-2b"
    c.model.dtype = "bfloat16"
    return c
