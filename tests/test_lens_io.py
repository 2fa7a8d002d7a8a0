"""Lens files across the two worlds: jaxlens exports checked inside tuned-lens itself."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models
import torch
from conftest import run_command
from tuned_lens import TunedLens as TorchTunedLens

from jaxlens import export, lens_io, train_lib
from jaxlens.checkpointing import CheckpointReadError
from jaxlens.lens import Translators, TunedLens
from jaxlens.models import load_model
from jaxlens.optim import make_optimizer
from jaxlens.step import TrainState, make_train_step

# tuned-lens 0.2.0's model_surgery knows these (not Mistral, Gemma, Qwen2 or Qwen3).
FAMILIES = ["gpt2", "gpt_neo", "gptj", "opt", "bloom", "llama", "gpt_neox"]


def _trained(model, steps=3, seed=0):
    """A lens trained a few steps on random tokens (non-zero kernels and biases)."""
    ids = np.random.default_rng(seed).integers(0, model.vocab_size, size=(4, 12))
    optimizer, schedule = make_optimizer(num_steps=steps, lr_scale=5.0)
    step = jax.jit(make_train_step(model, optimizer, schedule))
    state = TrainState.create(Translators.zeros(model.num_layers, model.d_model), optimizer)
    for _ in range(steps):
        state, _ = step(state, model.params, ids)
    return state.translators


def _torch_logits(torch_model, torch_lens, ids):
    with torch.no_grad():
        out = torch_model(torch.tensor(ids), output_hidden_states=True)
        return np.stack(
            [torch_lens(h, idx=i).numpy() for i, h in enumerate(out.hidden_states[:-1])]
        )


def _jax_logits(model, translators, ids):
    lens = TunedLens(decoder=model.decoder(), translators=translators)
    return np.asarray(lens.all_logits(model(ids).hidden_lbtd[:-1]))


@pytest.mark.parametrize("family", FAMILIES)
def test_exported_lens_loads_in_tuned_lens_with_equal_logits(family, tmp_path):
    torch_model = tiny_models.build(family, seed=5)
    model = load_model(tiny_models.save(torch_model, tmp_path / "model"))
    translators = _trained(model)
    assert float(jnp.abs(translators.kernel_ldd).max()) > 0
    lens_dir = lens_io.save_lens(tmp_path / "lens", translators, model)

    torch_lens = TorchTunedLens.from_model_and_pretrained(torch_model, lens_dir)
    ids = np.random.default_rng(1).integers(0, model.vocab_size, size=(2, 9))
    np.testing.assert_allclose(
        _jax_logits(model, translators, ids),
        _torch_logits(torch_model, torch_lens, ids),
        atol=1e-5,
        rtol=1e-5,
    )
    written = json.loads((lens_dir / "config.json").read_text())
    assert written["unembed_hash"] == TorchTunedLens.from_model(torch_model).config.unembed_hash


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_a_tuned_lens_lens_imports_with_equal_logits_and_reexports_bit_for_bit(family, tmp_path):
    torch_model = tiny_models.build(family, seed=6)
    model = load_model(tiny_models.save(torch_model, tmp_path / "model"))
    torch_lens = TorchTunedLens.from_model(torch_model)
    torch.manual_seed(0)
    with torch.no_grad():
        for translator in torch_lens:
            translator.weight.normal_(0, 0.1)
            translator.bias.normal_(0, 0.1)
    torch_lens.save(tmp_path / "theirs")

    lens = lens_io.load_lens(tmp_path / "theirs", model)
    ids = np.random.default_rng(2).integers(0, model.vocab_size, size=(2, 7))
    np.testing.assert_allclose(
        _jax_logits(model, lens.translators, ids),
        _torch_logits(torch_model, torch_lens, ids),
        atol=1e-5,
        rtol=1e-5,
    )
    lens_io.save_lens(tmp_path / "ours", lens.translators, model)
    theirs = torch.load(tmp_path / "theirs" / "params.pt")
    ours = torch.load(tmp_path / "ours" / "params.pt")
    assert list(ours) == list(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("dtype,tol", [("float16", 2e-3), ("bfloat16", 2e-2)])
def test_16_bit_exports_load_in_tuned_lens(tmp_path, dtype, tol):
    torch_model = tiny_models.build("llama", seed=7)
    model = load_model(tiny_models.save(torch_model, tmp_path / "model"))
    translators = _trained(model)
    lens_dir = lens_io.save_lens(tmp_path / "lens", translators, model, dtype=dtype)
    stored = torch.load(lens_dir / "params.pt")
    assert stored["0.weight"].dtype == getattr(torch, dtype)
    torch_lens = TorchTunedLens.from_model_and_pretrained(torch_model, lens_dir).float()
    ids = np.random.default_rng(3).integers(0, model.vocab_size, size=(2, 9))
    want = _jax_logits(model, translators, ids)
    got = _torch_logits(torch_model, torch_lens, ids)
    assert np.abs(got - want).max() <= tol * np.abs(want).max()


# A real workdir and the command line ---------------------------------------------------------


def _export(workdir, out, *extra):
    return run_command(export, f"--workdir={workdir}", f"--out={out}", *extra)


def test_the_export_command_writes_what_tuned_lens_loads(trained_workdir, tiny_lm, tmp_path):
    result = _export(trained_workdir, tmp_path / "lens")
    assert result.status == 0, result.stderr
    import transformers

    torch_model = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    torch_lens = TorchTunedLens.from_model_and_pretrained(torch_model, tmp_path / "lens")
    model = load_model(tiny_lm)
    translators = lens_io.restore_translators(trained_workdir)
    ids = np.random.default_rng(4).integers(0, model.vocab_size, size=(1, 8))
    np.testing.assert_allclose(
        _jax_logits(model, translators, ids),
        _torch_logits(torch_model, torch_lens, ids),
        atol=1e-5,
        rtol=1e-5,
    )
    config = json.loads((tmp_path / "lens" / "config.json").read_text())
    assert list(config) == [
        "base_model_name_or_path",
        "d_model",
        "num_hidden_layers",
        "bias",
        "base_model_revision",
        "unembed_hash",
        "lens_type",
    ]
    assert config["unembed_hash"] == TorchTunedLens.from_model(torch_model).config.unembed_hash


def test_export_of_a_step_that_does_not_exist(trained_workdir, tmp_path):
    with pytest.raises(CheckpointReadError, match="7"):
        lens_io.export_checkpoint(trained_workdir, tmp_path / "lens", step=7)
    assert not (tmp_path / "lens").exists()


def test_export_over_an_existing_lens_needs_overwrite(trained_workdir, tmp_path):
    out = tmp_path / "lens"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    result = _export(trained_workdir, out)
    assert result.status == 2 and "--overwrite" in result.stderr
    assert (out / "keep.txt").read_text() == "user data"
    assert _export(trained_workdir, out, "--overwrite").status == 0
    assert (out / "params.pt").is_file() and not (out / "keep.txt").exists()


def test_warm_start_from_an_exported_lens(trained_workdir, tiny_lm, text_dir, tmp_path):
    from configs import tiny

    lens_io.export_checkpoint(trained_workdir, tmp_path / "lens")
    config = tiny.get_config()
    config.model.source = str(tiny_lm)
    config.data.source = str(text_dir)
    config.num_steps = 2
    config.lr_scale = 0.0  # no movement: the run must end where it started
    config.init_lens = str(tmp_path / "lens")
    train_lib.train_and_evaluate(config, tmp_path / "warm")
    start = lens_io.restore_translators(trained_workdir)
    end = lens_io.restore_translators(tmp_path / "warm")
    np.testing.assert_array_equal(end.kernel_ldd, start.kernel_ldd)
    np.testing.assert_array_equal(end.bias_ld, start.bias_ld)


# Bad input ---------------------------------------------------------------------------------


def test_a_lens_for_another_model_is_refused_naming_both_shapes(tmp_path):
    gpt2 = load_model(tiny_models.save(tiny_models.build("gpt2"), tmp_path / "gpt2"))
    lens_io.save_lens(tmp_path / "lens", Translators.zeros(3, 32), gpt2)
    wider = tiny_models.configs()["gpt2"]
    wider.n_embd = 48
    import transformers

    other = transformers.GPT2LMHeadModel(wider)
    other_model = load_model(tiny_models.save(other, tmp_path / "wider"))
    with pytest.raises(ValueError, match=r"kernel \[3, 32, 32\].*kernel \[3, 48, 48\]"):
        lens_io.load_lens(tmp_path / "lens", other_model)


def test_an_unembed_hash_mismatch_warns_but_loads(tmp_path):
    first = load_model(tiny_models.save(tiny_models.build("gpt2", seed=1), tmp_path / "a"))
    second = load_model(tiny_models.save(tiny_models.build("gpt2", seed=2), tmp_path / "b"))
    lens_io.save_lens(tmp_path / "lens", Translators.zeros(3, 32), first)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lens = lens_io.load_lens(tmp_path / "lens", second)
    assert any("unembed_hash differs" in str(w.message) for w in caught)
    assert lens.num_layers == 3


def test_a_missing_lens_directory(tmp_path):
    model = load_model(tiny_models.save(tiny_models.build("gpt2"), tmp_path / "gpt2"))
    with pytest.raises(FileNotFoundError):
        lens_io.load_lens(tmp_path / "nowhere", model)


# The real model ---------------------------------------------------------------------------


def test_a_smollm2_lens_loads_in_tuned_lens_with_pytorch_smollm2(smollm2, torch_smollm2, tmp_path):
    from jaxlens import assets

    model = smollm2
    ids = model.tokenize(assets.shakespeare_passage())[:, :64]
    optimizer, schedule = make_optimizer(num_steps=1)
    state = TrainState.create(Translators.zeros(model.num_layers, model.d_model), optimizer)
    state, _ = jax.jit(make_train_step(model, optimizer, schedule, chunk_tokens=64))(
        state, model.params, ids
    )
    lens_dir = lens_io.save_lens(tmp_path / "lens", state.translators, model)
    torch_lens = TorchTunedLens.from_model_and_pretrained(torch_smollm2, lens_dir)
    got = _jax_logits(model, state.translators, ids[:, :32])
    want = _torch_logits(torch_smollm2, torch_lens, ids[:, :32])
    relative = np.abs(got - want).max() / np.abs(want).max()
    assert relative < 1e-3, relative


# The native families (tuned-lens 0.2.0 cannot load them; its file format is what they use) --------

LENS_FAMILIES = [
    *("qwen3", "gemma2", "gemma3_text", "olmo2", "olmo3", "phi3", "smollm3"),
    *("mixtral", "qwen3_moe", "olmoe", "gpt_oss"),
]


def _torch_lens_logits(torch_model, kernel_ldd, bias_ld, ids):
    """The translators applied in PyTorch: the model's hidden states, its own final norm,
    unembedding and (Gemma) final soft-cap, as a tuned lens decodes them."""
    norm = tiny_models.final_norm_module(torch_model)
    cap = getattr(torch_model.config, "final_logit_softcapping", None)
    with torch.no_grad():
        out = torch_model(torch.tensor(ids), output_hidden_states=True)
        layers = []
        for i, h in enumerate(out.hidden_states[:-1]):
            moved = h + h @ torch.tensor(kernel_ldd[i]) + torch.tensor(bias_ld[i])
            logits = torch_model.get_output_embeddings()(norm(moved))
            layers.append(torch.tanh(logits / cap) * cap if cap is not None else logits)
        return np.stack([x.numpy() for x in layers]), out


def _tuned_lens_layout(directory, config_json, kernel_ldd, bias_ld, dtype):
    """A lens as the community files store it: tuned-lens's config.json and a params.pt of
    torch Linear weights `[out, in]` in 16 bits."""
    import collections

    directory.mkdir()
    (directory / "config.json").write_text(config_json)
    state = collections.OrderedDict()
    for i in range(len(kernel_ldd)):
        state[f"{i}.weight"] = torch.tensor(kernel_ldd[i].T.copy()).to(dtype)
        state[f"{i}.bias"] = torch.tensor(bias_ld[i]).to(dtype)
    torch.save(state, directory / "params.pt")
    return {k: v.float().numpy() for k, v in state.items()}


@pytest.mark.parametrize("family", LENS_FAMILIES)
def test_a_native_family_trains_evaluates_exports_and_imports_lenses(family, tmp_path):
    import hashlib

    from jaxlens import eval_lib

    torch_model = tiny_models.build(family, seed=8)
    model = load_model(tiny_models.save(torch_model, tmp_path / "model"))
    translators = _trained(model, steps=2)
    assert float(jnp.abs(translators.kernel_ldd).max()) > 0

    # Evaluation: the logit lens's KL against the same statistic from PyTorch's own outputs.
    ids = np.random.default_rng(4).integers(0, model.vocab_size, size=(4, 12))
    result = eval_lib.evaluate(model, translators, ids, nats_to_bpb=1.0, batch_size=4)
    zeros = np.zeros((model.num_layers, model.d_model, model.d_model), np.float32)
    logit_lens, out = _torch_lens_logits(torch_model, zeros, zeros[:, 0], ids)
    log_p = torch.log_softmax(out.logits, -1).numpy()
    log_q = torch.log_softmax(torch.tensor(logit_lens), -1).numpy()
    kl_l = (np.exp(log_p) * (log_p - log_q)).sum(-1).mean(axis=(1, 2))
    np.testing.assert_allclose(result["logit"]["kl_nats"], kl_l, rtol=1e-4, atol=1e-5)
    assert np.isfinite(result["tuned"]["kl_nats"]).all()

    # Export: tuned-lens's format with its unembed_hash of the PyTorch lm_head weight.
    lens_dir = lens_io.save_lens(tmp_path / "lens", translators, model)
    written = json.loads((lens_dir / "config.json").read_text())
    weight = torch_model.get_output_embeddings().weight.detach().numpy()
    assert (
        written["unembed_hash"]
        == hashlib.sha256(np.array_str(weight, precision=1).encode()).hexdigest()
    )
    reloaded = lens_io.load_translators(lens_dir, model)
    np.testing.assert_array_equal(reloaded.kernel_ldd, translators.kernel_ldd)

    # Import of a community-layout lens in 16 bits: the same per-layer logits as in PyTorch.
    rng = np.random.default_rng(5)
    kernel = rng.normal(size=zeros.shape).astype(np.float32) * 0.1
    bias = rng.normal(size=zeros.shape[:2]).astype(np.float32) * 0.1
    for dtype in (torch.float16, torch.bfloat16):
        stored = _tuned_lens_layout(
            tmp_path / str(dtype), (lens_dir / "config.json").read_text(), kernel, bias, dtype
        )
        lens = lens_io.load_lens(tmp_path / str(dtype), model)
        kernel_16 = np.stack([stored[f"{i}.weight"].T for i in range(model.num_layers)])
        bias_16 = np.stack([stored[f"{i}.bias"] for i in range(model.num_layers)])
        want, _ = _torch_lens_logits(torch_model, kernel_16, bias_16, ids)
        got = np.asarray(lens.all_logits(model(ids).hidden_lbtd[:-1]))
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=str(dtype))
