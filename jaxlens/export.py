"""Exports a training checkpoint as a tuned-lens lens directory (torch not needed).

  python -m jaxlens.export --workdir=workdirs/demo --out=lenses/smollm2 [--step=N]
      [--dtype=float32|float16|bfloat16] [--format=pt|safetensors] [--overwrite]

The result loads in PyTorch with `tuned_lens.TunedLens.from_model_and_pretrained(model, out)`.
Only parses flags; the job is `lens_io.export_checkpoint`.
"""

from absl import flags

from jaxlens import cli

FLAGS = cli.command_flags()
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Training workdir to export from.", flag_values=FLAGS
)
_OUT = flags.DEFINE_string("out", None, "Lens directory to write.", flag_values=FLAGS)
_STEP = flags.DEFINE_integer(
    "step", None, "Checkpoint step (default: the latest).", lower_bound=0, flag_values=FLAGS
)
_DTYPE = flags.DEFINE_enum(
    "dtype", "float32", ["float32", "float16", "bfloat16"], "Stored dtype.", flag_values=FLAGS
)
_FORMAT = flags.DEFINE_enum(
    "format", "pt", ["pt", "safetensors"], "params.pt or .safetensors.", flag_values=FLAGS
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace an existing lens directory.", flag_values=FLAGS
)
flags.mark_flags_as_required(["workdir", "out"], flag_values=FLAGS)


def job(values) -> None:
    del values
    from jaxlens import lens_io

    out = lens_io.export_checkpoint(
        _WORKDIR.value,
        _OUT.value,
        step=_STEP.value,
        dtype=_DTYPE.value,
        file_format=_FORMAT.value,
        overwrite=_OVERWRITE.value,
    )
    print(f"Wrote {out}")


main = cli.main_of(FLAGS, job)

if __name__ == "__main__":
    main()
