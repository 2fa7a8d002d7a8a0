"""A lens directory's `config.json`: its seven keys, and the `unembed_hash` one of them holds.

tuned-lens writes exactly `LENS_CONFIG_KEYS`, in that order, and reads a config by name, so
readers ignore unknown keys (older tuned-lens files carry a misspelt `unemebd_hash`). There is no
version field; `lens_type` is always `LENS_TYPE`. This module is the one place jaxlens spells the
schema out: every config jaxlens writes is built (`lens_config`) or checked (`complete_config`)
here.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np

from jaxlens.torch_format.errors import LensFileError

LENS_CONFIG_KEYS = (
    "base_model_name_or_path",
    "d_model",
    "num_hidden_layers",
    "bias",
    "base_model_revision",
    "unembed_hash",
    "lens_type",
)
LENS_TYPE = "linear_tuned_lens"  # the only lens type tuned-lens 0.2.0 has

# numpy's default print options: the hash must not depend on a caller's np.set_printoptions.
_DEFAULT_PRINT = dict(
    edgeitems=3,
    threshold=1000,
    linewidth=75,
    suppress=False,
    nanstr="nan",
    infstr="inf",
    sign="-",
    floatmode="maxprec",
    legacy=False,
)


def unembed_hash(unembed_vd: np.ndarray) -> str:
    """tuned-lens's fingerprint of a model's unembedding, to tell lenses of other models apart.

    Args:
        unembed_vd: `[vocab, d_model]` unembedding matrix (torch `lm_head.weight` layout), any
            float dtype; it is hashed as float32, as tuned-lens does.

    Returns:
        The hex sha256 of `numpy.array_str(U, precision=1)`. numpy summarises arrays of more than
        1000 elements, so only the corner values enter the hash: cheap for big vocabularies and
        blind to small perturbations, which is what tuned-lens wants from it.
    """
    u_vd = np.asarray(unembed_vd, dtype=np.float32)
    if u_vd.ndim != 2:
        raise ValueError(f"unembed_vd must be [vocab, d_model]; got shape {u_vd.shape}.")
    with np.printoptions(**_DEFAULT_PRINT):
        text = np.array_str(u_vd, precision=1)
    return hashlib.sha256(text.encode()).hexdigest()


def lens_config(
    *,
    base_model_name_or_path: str | None,
    revision: str | None,
    num_layers: int,
    d_model: int,
    bias: bool,
    unembed_hash: str | None,
) -> dict:
    """The `config.json` of a lens, as tuned-lens writes it: all seven keys, in order.

    Args:
        base_model_name_or_path: the model id or path the lens is for; None (a model not loaded
            by name) is written as "", as tuned-lens writes such a model's.
        revision: the model's hub revision, or None.
        num_layers: number of translators (the model's block count).
        d_model: the model's width.
        bias: whether the translators have biases.
        unembed_hash: `unembed_hash` of the model's unembedding, or None when unknown.

    Returns:
        The seven `LENS_CONFIG_KEYS` in order, `lens_type` being `LENS_TYPE`.
    """
    return {
        "base_model_name_or_path": base_model_name_or_path or "",
        "d_model": int(d_model),
        "num_hidden_layers": int(num_layers),
        "bias": bool(bias),
        "base_model_revision": revision,
        "unembed_hash": unembed_hash,
        "lens_type": LENS_TYPE,
    }


def complete_config(config: dict, num_layers: int, d_model: int, bias: bool) -> dict:
    """The config to write with a lens's arrays, from a caller's partial one.

    Args:
        config: `base_model_name_or_path` and optionally the other `LENS_CONFIG_KEYS`;
            `d_model`, `num_hidden_layers` and `bias` must agree with the arrays if given.
        num_layers, d_model, bias: what the arrays say (kernel `[L, d, d]`, bias or not).

    Returns:
        All seven `LENS_CONFIG_KEYS` in order, the arrays' facts and defaults filled in.

    Raises:
        ValueError: unknown keys, no model name, or a fact the arrays contradict.
    """
    unknown = set(config) - set(LENS_CONFIG_KEYS)
    if unknown:
        raise ValueError(
            f"config has keys {sorted(unknown)}; a lens config has only these: "
            f"{', '.join(LENS_CONFIG_KEYS)}."
        )
    if "base_model_name_or_path" not in config:
        raise ValueError("config needs base_model_name_or_path (the model id the lens is for).")
    facts = {"d_model": d_model, "num_hidden_layers": num_layers, "bias": bias}
    for key, value in facts.items():
        if key in config and (config[key] != value or type(config[key]) is not type(value)):
            raise ValueError(
                f"config[{key!r}] = {config[key]!r}, but the arrays say {value!r} (kernel "
                f"[{num_layers}, {d_model}, {d_model}], bias {'given' if bias else 'None'})."
            )
    if config.get("lens_type", LENS_TYPE) != LENS_TYPE:
        raise ValueError(f"lens_type must be {LENS_TYPE!r}; got {config['lens_type']!r}.")
    defaults = {"base_model_revision": None, "unembed_hash": None, "lens_type": LENS_TYPE}
    merged = {**defaults, **facts, **config}
    return {key: merged[key] for key in LENS_CONFIG_KEYS}


def read_config(path: pathlib.Path) -> dict:
    """The seven `LENS_CONFIG_KEYS` of a `config.json`, in order, checked as jaxlens needs them.

    Unknown keys are dropped; a missing `bias`, `base_model_revision` or `unembed_hash` takes
    tuned-lens's default; the misspelt `unemebd_hash` of older files stands in for `unembed_hash`.

    Raises:
        LensFileError: not a JSON object, or not a tuned-lens config jaxlens can read.
    """
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LensFileError(f"{path} is not valid JSON ({error}).") from None
    if not isinstance(raw, dict):
        raise LensFileError(f"{path} holds a {type(raw).__name__}, not a JSON object.")
    if "unembed_hash" not in raw and "unemebd_hash" in raw:  # older tuned-lens misspelt it
        raw["unembed_hash"] = raw["unemebd_hash"]
    missing = [
        k for k in ("base_model_name_or_path", "d_model", "num_hidden_layers") if k not in raw
    ]
    if missing:
        raise LensFileError(f"{path} lacks {', '.join(missing)}; it is not a tuned-lens config.")
    defaults = {"bias": True, "base_model_revision": None, "unembed_hash": None}
    config = {key: raw.get(key, defaults.get(key, LENS_TYPE)) for key in LENS_CONFIG_KEYS}
    for key in ("d_model", "num_hidden_layers"):
        if not _is_positive_int(config[key]):
            raise LensFileError(f"{path}: {key} = {config[key]!r}; expected a positive integer.")
    if not isinstance(config["bias"], bool):
        raise LensFileError(f"{path}: bias = {config['bias']!r}; expected true or false.")
    if config["lens_type"] != LENS_TYPE:
        raise LensFileError(
            f"{path}: lens_type = {config['lens_type']!r}; jaxlens reads {LENS_TYPE!r} lenses."
        )
    return config


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
