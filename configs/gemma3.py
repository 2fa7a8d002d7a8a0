"""Tuned lens for Gemma-3-1B (text-only causal LM) with tuned-lens's full recipe (gated).

Run (needs the network for the model and FineWeb; preset: a TPU v5e-8, 8 chips of 16 GiB):
  python -m jaxlens.train --config=configs/gemma3.py --workdir=/tmp/jaxlens/gemma3
TPU VM slice: run the same command on every worker with --config.distributed=True.
Only text-only checkpoints (`Gemma3ForCausalLM`, model_type gemma3_text) load; the multimodal
4B-27B ones are refused. tuned-lens 0.2.0 cannot load Gemma-3, so the exported lens (tuned-lens's
format) is for jaxlens only.
"""

from configs import hub_common

# The Cloud TPU slice this preset is sized for (`jaxlens plan` checks it fits there).
TOPOLOGY = "v5e-8"


def get_config():
    c = hub_common.get_config()
    c.model.source = "google/gemma-3-1b-pt"
    c.model.dtype = "bfloat16"
    c.chunk_tokens = 1024  # a 262k vocabulary: keep [chunk, vocab] float32 logits near 1 GiB
    # Mesh presets. One GPU or TPU chip of 16 GB or more: the defaults (all devices on "data").
    # Smaller chips: --config.mesh.model=2 --config.mesh.shard_model_params=True.
    return c
