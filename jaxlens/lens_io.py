"""Lenses in and out of jaxlens: Orbax checkpoints -> tuned-lens directories, and back.

`export_checkpoint` reads a training workdir (its `config.json`, `checkpoints/run_metadata.json`
and an Orbax step) and writes a tuned-lens directory (`config.json` + `params.pt`) that
`tuned_lens.TunedLens.from_model_and_pretrained` loads unchanged. No model and no torch are needed
for that: the model's facts and its `unembed_hash` were recorded when training started.
`load_lens` reads any tuned-lens directory (or a lens on the Hugging Face hub, found by name by
`hub_lenses`) into a jaxlens `TunedLens` for a given model, checking that the two belong
together. The file format itself lives in `torch_format`.
"""

from __future__ import annotations

import json
import pathlib
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxlens import torch_format
from jaxlens.checkpointing import METADATA_FILENAME, Checkpointer
from jaxlens.hub_ids import is_hub_id
from jaxlens.hub_lenses import download_lens
from jaxlens.lens import Translators, TunedLens
from jaxlens.models import SubjectModel


def model_unembed_hash(model: SubjectModel) -> str:
    """tuned-lens's fingerprint of the model's unembedding (to spot a lens for another model)."""
    return torch_format.unembed_hash(np.asarray(model.decoder().unembed_vd, np.float32))


# Workdir -> translators ------------------------------------------------------------------


def read_run(workdir) -> tuple[ml_collections.ConfigDict, dict]:
    """The training config and run metadata a workdir was written with."""
    workdir = pathlib.Path(workdir)
    config_file = workdir / "config.json"
    metadata_file = workdir / "checkpoints" / METADATA_FILENAME
    for path in (config_file, metadata_file):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: {workdir} is not a jaxlens training workdir "
                "(python -m jaxlens.train --workdir=...)."
            )
    config = ml_collections.ConfigDict(json.loads(config_file.read_text()))
    return config, json.loads(metadata_file.read_text())


def restore_translators(workdir, step: int | None = None) -> Translators:
    """The translators of a workdir's checkpoint (latest, or `step`) on this host's first device.

    Works whatever mesh and optimizer the run used: only the "translators" item is read, and
    restored unsharded.
    """
    _, metadata = read_run(workdir)
    num_layers, d_model = metadata["num_layers"], metadata["d_model"]
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
        jax.eval_shape(lambda: Translators.zeros(num_layers, d_model, bias=metadata["bias"])),
    )
    with Checkpointer(pathlib.Path(workdir) / "checkpoints") as checkpointer:
        arrays, _, _ = checkpointer.restore({"translators": abstract}, step)
    return arrays["translators"]


# Export ------------------------------------------------------------------------------------


def save_lens(
    out_dir,
    translators: Translators,
    model: SubjectModel,
    *,
    dtype: str = "float32",
    file_format: str = "pt",
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes `translators` as a tuned-lens directory for `model`."""
    config = torch_format.lens_config(
        base_model_name_or_path=model.name_or_path,
        revision=model.revision,
        num_layers=translators.num_layers,
        d_model=translators.d_model,
        bias=translators.bias_ld is not None,
        unembed_hash=model_unembed_hash(model),
    )
    return _write(out_dir, translators, config, dtype, file_format, overwrite)


def export_checkpoint(
    workdir,
    out_dir,
    *,
    step: int | None = None,
    dtype: str = "float32",
    file_format: str = "pt",
    overwrite: bool = False,
) -> pathlib.Path:
    """Exports a workdir's checkpoint (latest, or `step`) as a tuned-lens directory."""
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and not overwrite:  # before any work: nothing to lose, nothing to wait for
        raise FileExistsError(f"{out_dir} exists; pass --overwrite to replace it.")
    _, metadata = read_run(workdir)
    translators = restore_translators(workdir, step)
    config = torch_format.lens_config(
        base_model_name_or_path=metadata["model"],
        revision=metadata.get("revision"),
        num_layers=metadata["num_layers"],
        d_model=metadata["d_model"],
        bias=metadata["bias"],
        unembed_hash=metadata.get("unembed_hash"),
    )
    return _write(out_dir, translators, config, dtype, file_format, overwrite)


def _write(out_dir, translators, config, dtype, file_format, overwrite):
    bias = None if translators.bias_ld is None else np.asarray(translators.bias_ld, np.float32)
    return torch_format.write_lens_dir(
        out_dir,
        np.asarray(translators.kernel_ldd, np.float32),
        bias,
        config=config,
        dtype=dtype,
        file_format=file_format,
        overwrite=overwrite,
    )


# Import ------------------------------------------------------------------------------------


def resolve_lens_dir(source, *, revision: str | None = None) -> pathlib.Path:
    """A local lens directory, or a hub lens id fetched (or found in the hub cache) by
    `hub_lenses.download_lens`: tuned-lens's Space, then a community repository."""
    path = pathlib.Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    if not is_hub_id(text):
        raise FileNotFoundError(f"No lens directory at {path}.")
    try:
        return download_lens(text, revision=revision)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{text!r} is not a local lens directory. {error}") from error


def load_translators(source, model: SubjectModel, *, revision: str | None = None) -> Translators:
    """Translators from a tuned-lens directory, lens id or jaxlens workdir, checked to fit.

    `revision` picks the hub revision of a lens id (ignored for local paths).
    """
    path = pathlib.Path(source).expanduser()
    if (path / "checkpoints").is_dir() and not (path / "params.pt").exists():
        bank = restore_translators(path)
        _check_fits(path, bank.num_layers, bank.d_model, model)
        return bank
    lens_file = torch_format.read_lens_dir(resolve_lens_dir(source, revision=revision))
    num_layers, d_model = lens_file.kernel_ldd.shape[0], lens_file.kernel_ldd.shape[-1]
    _check_fits(source, num_layers, d_model, model)
    stored = lens_file.config.get("unembed_hash")
    if stored and stored != model_unembed_hash(model):
        warnings.warn(
            f"The lens at {source} was made for a model with another unembedding "
            f"({lens_file.config.get('base_model_name_or_path')!r}; unembed_hash differs). "
            "Its predictions may be meaningless for this model.",
            stacklevel=2,
        )
    bias = None if lens_file.bias_ld is None else jnp.asarray(lens_file.bias_ld)
    return Translators(kernel_ldd=jnp.asarray(lens_file.kernel_ldd), bias_ld=bias)


def load_lens(source, model: SubjectModel, *, revision: str | None = None) -> TunedLens:
    """A tuned lens for `model` from a tuned-lens directory, hub lens id or jaxlens workdir.

    A hub lens id is looked up as tuned-lens does (its Space `lens/<id>/`, or
    `TUNED_LENS_REPO_ID`/`TUNED_LENS_REPO_TYPE`), then as a repository holding `config.json` +
    `params.pt` (see `hub_lenses`); `revision` picks the hub revision.
    """
    translators = load_translators(source, model, revision=revision)
    return TunedLens(decoder=model.decoder(), translators=translators)


def _check_fits(source, num_layers: int, d_model: int, model: SubjectModel) -> None:
    if (num_layers, d_model) != (model.num_layers, model.d_model):
        raise ValueError(
            f"The lens at {source} has {num_layers} translators of width {d_model} "
            f"(kernel [{num_layers}, {d_model}, {d_model}]), but the model {model.name_or_path!r} "
            f"has {model.num_layers} layers of width {model.d_model} (needs kernel "
            f"[{model.num_layers}, {model.d_model}, {model.d_model}]). Use a lens made for "
            "this model."
        )
