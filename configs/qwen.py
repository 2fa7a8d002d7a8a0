"""Tuned lens for Qwen3-0.6B (q/k norms, tied embeddings) with tuned-lens's full recipe.

Run (needs the network for the model and FineWeb; preset: a TPU v5e-8, 8 chips of 16 GiB):
  python -m jaxlens.train --config=configs/qwen.py --workdir=/tmp/jaxlens/qwen
TPU VM slice: run the same command on every worker with --config.distributed=True.
For Qwen2.5 add --config.model.source=Qwen/Qwen2.5-0.5B. tuned-lens 0.2.0 cannot load Qwen
models, so the exported lens is for jaxlens only.
"""

from configs import hub_common

# The Cloud TPU slice this preset is sized for (`jaxlens plan` checks it fits there).
TOPOLOGY = "v5e-8"


def get_config():
    c = hub_common.get_config()
    c.model.source = "Qwen/Qwen3-0.6B"
    c.model.dtype = "bfloat16"
    c.chunk_tokens = 2048  # a 152k vocabulary: keep [chunk, vocab] logits near 1 GiB
    return c
