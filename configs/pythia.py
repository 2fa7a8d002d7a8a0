"""Tuned lens for Pythia-410M-deduped (GPT-NeoX family) with tuned-lens's full recipe.

Run (needs the network for the model and FineWeb; preset: a TPU v5e-8, 8 chips of 16 GiB):
  python -m jaxlens.train --config=configs/pythia.py --workdir=/tmp/jaxlens/pythia
TPU VM slice: run the same command on every worker with --config.distributed=True.
tuned-lens publishes lenses for the Pythia suite; `jaxlens.lens_io.load_lens` reads them to compare.
"""

from configs import hub_common

# The Cloud TPU slice this preset is sized for (`jaxlens plan` checks it fits there).
TOPOLOGY = "v5e-8"


def get_config():
    c = hub_common.get_config()
    c.model.source = "EleutherAI/pythia-410m-deduped"
    c.model.dtype = "float32"  # 410M parameters fit any accelerator in float32
    return c
