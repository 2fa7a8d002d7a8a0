"""Tuned lens for Mistral-7B (sharded safetensors) with tuned-lens's full recipe.

Run (needs the network for the model and FineWeb; preset: a TPU v6e-8, weights and bank
split over 2 chips of the 8, 4 data-parallel pairs):
  python -m jaxlens.train --config=configs/mistral.py --workdir=/tmp/jaxlens/mistral
TPU VM slice: run the same command on every worker with --config.distributed=True.
"""

from configs import hub_common

# The Cloud TPU slice this preset is sized for (`jaxlens plan` checks it fits there).
TOPOLOGY = "v6e-8"


def get_config():
    c = hub_common.get_config()
    c.model.source = "mistralai/Mistral-7B-v0.1"
    c.model.dtype = "bfloat16"
    c.mesh.model = 2  # 7.2B parameters: 7.2 GB of bfloat16 weights and half the bank a chip
    c.mesh.shard_model_params = True
    c.micro_batches = 32  # 128 sequences / (4 data chips x 32) = 1 a chip a micro-batch
    return c
