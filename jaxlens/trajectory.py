"""Draws a prompt's prediction trajectory through a lens as a heat map (PNG or offline HTML).

  python -m jaxlens.trajectory --lens=DIR|WORKDIR|logit --prompt="..." --out=fig.png|fig.html
      [--model=embedded:smollm2] [--statistic=entropy] [--layers_every=N]

Only parses flags; the statistics are `trajectory_lib.PredictionTrajectory`'s, the pictures
`plotting`'s.
"""

import pathlib

from absl import flags

from jaxlens import cli
from jaxlens.trajectory_lib import STATISTICS

FLAGS = cli.command_flags()
_MODEL = flags.DEFINE_string(
    "model", "embedded:smollm2", "Model directory, .gguf file or hub id.", flag_values=FLAGS
)
_LENS = flags.DEFINE_string(
    "lens", None, "Tuned-lens directory, jaxlens workdir, or 'logit'.", flag_values=FLAGS
)
_PROMPT = flags.DEFINE_string("prompt", None, "The text to look at.", flag_values=FLAGS)
_STATISTIC = flags.DEFINE_enum(
    "statistic", "entropy", STATISTICS, "What the colours show.", flag_values=FLAGS
)
_OUT = flags.DEFINE_string(
    "out", None, "Picture to write: .png (matplotlib) or .html (plotly).", flag_values=FLAGS
)
_LAYERS_EVERY = flags.DEFINE_integer(
    "layers_every", 1, "Draw every Nth layer and the output.", lower_bound=1, flag_values=FLAGS
)
flags.mark_flags_as_required(["lens", "prompt", "out"], flag_values=FLAGS)


def job(values) -> None:
    del values
    out = pathlib.Path(_OUT.value)
    if out.suffix not in (".png", ".html"):  # before the model loads: costs no waiting
        raise ValueError(f"--out={out} must end in .png (matplotlib) or .html (plotly).")
    if not _PROMPT.value.strip():
        raise ValueError("--prompt is empty; give the text to look at.")
    from jaxlens import lens_io, plotting
    from jaxlens.lens import LogitLens
    from jaxlens.models import load_model
    from jaxlens.trajectory_lib import PredictionTrajectory

    model = load_model(_MODEL.value)
    if _LENS.value == "logit":
        lens = LogitLens(model.decoder())
    else:
        lens = lens_io.load_lens(_LENS.value, model)
    trajectory = PredictionTrajectory.from_lens(lens, model, _PROMPT.value)
    statistic = getattr(trajectory, _STATISTIC.value)()
    kind = "logit lens" if _LENS.value == "logit" else "tuned lens"
    title = f"{statistic.name}: {kind} on {model.name_or_path or _MODEL.value}"
    draw = plotting.heatmap_png if out.suffix == ".png" else plotting.heatmap_html
    draw(statistic, trajectory, out, layers_every=_LAYERS_EVERY.value, title=title)
    print(f"Wrote {out}")


main = cli.main_of(FLAGS, job)

if __name__ == "__main__":
    main()
