"""Tuned lens for GPT-2 small (124M) with tuned-lens's full recipe.

Run (needs the network for the model and FineWeb; preset: a TPU v5e-8, 8 chips of 16 GiB):
  python -m jaxlens.train --config=configs/gpt2.py --workdir=/tmp/jaxlens/gpt2
TPU VM slice: run the same command on every worker with --config.distributed=True.
"""

from configs import hub_common

# The Cloud TPU slice this preset is sized for (`jaxlens plan` checks it fits there).
TOPOLOGY = "v5e-8"


def get_config():
    c = hub_common.get_config()
    c.model.source = "gpt2"
    c.model.dtype = "float32"
    c.data.seq_len = 1024  # GPT-2's 1,024 positions: 256 sequences per step
    c.micro_batches = 32  # 256 sequences / (8 data chips x 32) = 1 a chip a micro-batch
    return c
