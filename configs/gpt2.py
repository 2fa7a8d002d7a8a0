"""Tuned lens for GPT-2 small (124M) with tuned-lens's full recipe.

Run (needs the network for the model and FineWeb, and an accelerator):
  python -m jaxlens.train --config=configs/gpt2.py --workdir=/tmp/jaxlens/gpt2
TPU VM slice: run the same command on every worker with --config.distributed=True.
"""

from configs import hub_common


def get_config():
    c = hub_common.get_config()
    c.model.source = "gpt2"
    c.model.dtype = "float32"
    return c
