"""Tuned lens for OLMo-2-1B (post-norm blocks, QK-norm) with tuned-lens's full recipe.

Run (needs the network for the model and FineWeb; preset: a TPU v5e-8, 8 chips of 16 GiB):
  python -m jaxlens.train --config=configs/olmo2.py --workdir=/tmp/jaxlens/olmo2
TPU VM slice: run the same command on every worker with --config.distributed=True.
For OLMo-3 add --config.model.source=allenai/Olmo-3-1025-7B and the preset for large models
below. tuned-lens 0.2.0 cannot load OLMo-2/3, so the exported lens is for jaxlens only.
"""

from configs import hub_common

# The Cloud TPU slice this preset is sized for (`jaxlens plan` checks it fits there).
TOPOLOGY = "v5e-8"


def get_config():
    c = hub_common.get_config()
    c.model.source = "allenai/OLMo-2-0425-1B"
    c.model.dtype = "bfloat16"
    c.chunk_tokens = 2048  # a 100k vocabulary: [chunk, vocab] float32 logits near 800 MiB
    # Mesh presets. One GPU or TPU chip of 16 GB or more: the defaults (all devices on "data").
    # 7B models (OLMo-2-7B, OLMo-3-7B) on 16-40 GB chips: split the frozen weights and the
    #   bank, --config.mesh.model=4 --config.mesh.shard_model_params=True.
    return c
