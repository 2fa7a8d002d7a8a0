"""Exports a training checkpoint as a tuned-lens lens directory (torch not needed).

  python -m jaxlens.export --workdir=workdirs/demo --out=lenses/smollm2 [--step=N]
      [--dtype=float32|float16|bfloat16] [--format=pt|safetensors] [--overwrite]

The result loads in PyTorch with `tuned_lens.TunedLens.from_model_and_pretrained(model, out)`.
"""

from absl import app, flags

from jaxlens import lens_io

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir to export from.")
_OUT = flags.DEFINE_string("out", None, "Lens directory to write.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "float16", "bfloat16"], "Stored dtype.")
_FORMAT = flags.DEFINE_enum("format", "pt", ["pt", "safetensors"], "params.pt or .safetensors.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing lens directory.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
    del argv
    out = lens_io.export_checkpoint(
        _WORKDIR.value,
        _OUT.value,
        step=_STEP.value,
        dtype=_DTYPE.value,
        file_format=_FORMAT.value,
        overwrite=_OVERWRITE.value,
    )
    print(f"Wrote {out}")


def run():
    """Console-script entry point (`jaxlens-export`)."""
    app.run(main)


if __name__ == "__main__":
    run()
