"""Tuned lens for SmolLM2-1.7B (Llama family, tied embeddings) with tuned-lens's full recipe.

Run (needs the network for the model and FineWeb; preset: a TPU v5e-8, 8 chips of 16 GiB):
  python -m jaxlens.train --config=configs/llama.py --workdir=/tmp/jaxlens/llama
TPU VM slice: run the same command on every worker with --config.distributed=True.
"""

from configs import hub_common

# The Cloud TPU slice this preset is sized for (`jaxlens plan` checks it fits there).
TOPOLOGY = "v5e-8"


def get_config():
    c = hub_common.get_config()
    c.model.source = "HuggingFaceTB/SmolLM2-1.7B"
    c.model.dtype = "bfloat16"
    return c
