"""Tuned lens for Gemma-2B with tuned-lens's full recipe (gated: accept the licence, log in).

Run (needs the network for the model and FineWeb, and an accelerator):
  python -m jaxlens.train --config=configs/gemma.py --workdir=/tmp/jaxlens/gemma
TPU VM slice: run the same command on every worker with --config.distributed=True.
"""

from configs import hub_common


def get_config():
    c = hub_common.get_config()
    c.model.source = "google/gemma-2b"
    c.model.dtype = "bfloat16"
    return c
