"""Tuned lens for Mixtral-8x7B-v0.1 (8 experts, top-2 routing) with tuned-lens's full recipe.

Run (needs the network for the model and FineWeb, and accelerators holding ~94 GB of bfloat16
weights; the preset is a TPU v5p-8, 4 chips of 95 GiB):
  python -m jaxlens.train --config=configs/mixtral.py --workdir=/tmp/jaxlens/mixtral
The preset splits the frozen weights (experts included) over a 4-chip "model" axis (~23 GB a
chip); on 8 GPUs of 40+ GB add --config.mesh.model=8. TPU VM slice: run the same command on
every worker with
--config.distributed=True. For Mixtral-8x22B add --config.model.source=mistralai/Mixtral-8x22B-v0.1
and --config.mesh.model=16 or more. tuned-lens 0.2.0 cannot load Mixtral, so the exported lens is
for jaxlens (and tuned-lens's file format) only.
"""

from configs import hub_common

# The Cloud TPU slice this preset is sized for (`jaxlens plan` checks it fits there).
TOPOLOGY = "v5p-8"


def get_config():
    c = hub_common.get_config()
    c.model.source = "mistralai/Mixtral-8x7B-v0.1"
    c.model.dtype = "bfloat16"
    c.mesh.model = 4  # 46.7B parameters: ~23 GB of weights per chip over a v5p-8's 4 chips
    c.mesh.shard_model_params = True  # each weight split over "model" (experts' [E, d, f] too)
    c.micro_batches = 32  # 2^13 tokens per micro-batch: 33 hidden states of d=4096 stay ~2 GB
    return c
