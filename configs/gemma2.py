"""Tuned lens for Gemma-2-2B with tuned-lens's full recipe (gated: accept the licence, log in).

Run (needs the network for the model and FineWeb; preset: a TPU v5e-8, weights and bank
split over 2 of its 16 GiB chips, 4 data-parallel pairs):
  python -m jaxlens.train --config=configs/gemma2.py --workdir=/tmp/jaxlens/gemma2
TPU VM slice: run the same command on every worker with --config.distributed=True.
For Gemma-2-9B add --config.model.source=google/gemma-2-9b and the 16 GB preset below.
The lens decodes through Gemma-2's final logit soft-cap, as the model does. tuned-lens 0.2.0
cannot load Gemma-2, so the exported lens (tuned-lens's format) is for jaxlens only.
"""

from configs import hub_common

# The Cloud TPU slice this preset is sized for (`jaxlens plan` checks it fits there).
TOPOLOGY = "v5e-8"


def get_config():
    c = hub_common.get_config()
    c.model.source = "google/gemma-2-2b"
    c.model.dtype = "bfloat16"
    c.chunk_tokens = 1024  # a 256k vocabulary: keep [chunk, vocab] float32 logits near 1 GiB
    # Mesh presets. One 40-80 GB GPU or TPU chip: the defaults (all devices on "data").
    # Chips of 16 GB (TPU v5e) for 2B, or 40 GB for 9B: split the frozen weights and the bank,
    #   --config.mesh.model=2 --config.mesh.shard_model_params=True (4 for Gemma-2-9B on v5e).
    c.mesh.model = 2  # the v5e preset: 16 GiB chips
    c.mesh.shard_model_params = True
    c.micro_batches = 32  # 128 sequences / (4 data chips x 32) = 1 a chip a micro-batch
    return c
