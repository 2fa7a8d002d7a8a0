"""Tuned lens for gpt-oss-20b (32 experts, top-4; attention sinks, alternating sliding windows).

Run (needs the network for the model and FineWeb, and accelerators holding ~42 GB of bfloat16
weights once the MXFP4 experts are unpacked; the preset is a TPU v5p-8, weights split over 2 of
its 4 chips; or two 40+ GB GPUs, or one 80 GB one with
--config.mesh.model=1 --config.mesh.shard_model_params=False):
  python -m jaxlens.train --config=configs/gpt_oss.py --workdir=/tmp/jaxlens/gpt_oss
For gpt-oss-120b add --config.model.source=openai/gpt-oss-120b and --config.mesh.model=8.
TPU VM slice: run the same command on every worker with --config.distributed=True. tuned-lens
0.2.0 cannot load GPT-OSS, so the exported lens is for jaxlens (and tuned-lens's file format) only.
"""

from configs import hub_common

# The Cloud TPU slice this preset is sized for (`jaxlens plan` checks it fits there).
TOPOLOGY = "v5p-8"


def get_config():
    c = hub_common.get_config()
    c.model.source = "openai/gpt-oss-20b"
    c.model.dtype = "bfloat16"
    c.mesh.model = 2  # 21B parameters: ~21 GB of weights per device over 2
    c.mesh.shard_model_params = True  # each weight split over "model" (experts' [E, d, f] too)
    c.chunk_tokens = 1024  # a 201k vocabulary: keep [chunk, vocab] logits near 0.8 GiB
    c.micro_batches = 32  # 128 sequences / (2 data chips x 32) = 2 a chip a micro-batch
    return c
