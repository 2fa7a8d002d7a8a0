"""Tuned lens for Phi-3-mini-4k (fused projections, sliding window) with tuned-lens's recipe.

Run (needs the network for the model and FineWeb; preset: a TPU v6e-8, 8 chips of 32 GiB):
  python -m jaxlens.train --config=configs/phi3.py --workdir=/tmp/jaxlens/phi3
TPU VM slice: run the same command on every worker with --config.distributed=True.
Phi-3.5-mini and Phi-4-mini use the same architecture (LongRoPE and partial rotary are
reproduced): --config.model.source=microsoft/Phi-3.5-mini-instruct. tuned-lens 0.2.0 cannot load
Phi-3, so the exported lens is for jaxlens only.
"""

from configs import hub_common

# The Cloud TPU slice this preset is sized for (`jaxlens plan` checks it fits there).
TOPOLOGY = "v6e-8"


def get_config():
    c = hub_common.get_config()
    c.model.source = "microsoft/Phi-3-mini-4k-instruct"
    c.model.dtype = "bfloat16"
    c.chunk_tokens = 4096  # a 32k vocabulary: [chunk, vocab] float32 logits near 512 MiB
    # Mesh presets. One 40-80 GB GPU or TPU chip: the defaults (all devices on "data").
    # 16 GB chips (a 3.8B model in bfloat16 is 7.6 GB, the bank 32 x 3072^2 float32 1.2 GB plus
    #   its optimizer state): --config.mesh.model=2 --config.mesh.shard_model_params=True.
    return c
