"""Tuned lens for Mistral-7B (sharded safetensors) with tuned-lens's full recipe.

Run (needs the network for the model and FineWeb, and an accelerator):
  python -m jaxlens.train --config=configs/mistral.py --workdir=/tmp/jaxlens/mistral
TPU VM slice: run the same command on every worker with --config.distributed=True.
"""

from configs import hub_common


def get_config():
    c = hub_common.get_config()
    c.model.source = "mistralai/Mistral-7B-v0.1"
    c.model.dtype = "bfloat16"
    return c
