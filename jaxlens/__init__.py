"""jaxlens: tuned lenses for JAX/Flax language models, compatible with tuned-lens files.

The public API, imported on first use so that `import jaxlens` (and `import jaxlens.lens`) stays
light: the lens classes need neither transformers nor Orbax.

    model = jaxlens.load_model("embedded:smollm2")       # or a HF directory, .gguf, hub id
    lens = jaxlens.load_lens("workdirs/demo", model)     # a workdir or a tuned-lens directory
    trajectory = jaxlens.PredictionTrajectory.from_lens(lens, model, "To be, or not to be")
    jaxlens.save_lens("lenses/smollm2", lens.translators, model)   # tuned-lens's format
"""

from __future__ import annotations

import importlib

from jaxlens import hardware

# Before any JAX backend starts: a machine with libtpu but no TPU (for `jaxlens plan`) keeps
# JAX from loading libtpu in every process.
hardware.keep_libtpu_off_tpu_less_hosts()

# public name -> the module that owns it
_API = {
    "Decoder": "jaxlens.decoder",
    "LogitLens": "jaxlens.lens",
    "TunedLens": "jaxlens.lens",
    "Translators": "jaxlens.lens",
    "SubjectModel": "jaxlens.models",
    "load_model": "jaxlens.models",
    "load_lens": "jaxlens.lens_io",
    "load_translators": "jaxlens.lens_io",
    "list_hub_lenses": "jaxlens.hub_lenses",
    "save_lens": "jaxlens.lens_io",
    "export_checkpoint": "jaxlens.lens_io",
    "PredictionTrajectory": "jaxlens.trajectory_lib",
    "train_and_evaluate": "jaxlens.train_lib",
    "evaluate_lens": "jaxlens.eval_lib",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'jaxlens' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
