"""The native decoder, each family it builds, against PyTorch transformers, loaded torch-free."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models
import torch
import transformers
from safetensors.numpy import load_file, save_file

from jaxlens import train_lib
from jaxlens.models import load_model, specs
from jaxlens.models.convert import CheckpointMismatchError

NATIVE = specs.FAMILIES
TOL = 1e-5  # float32 against float32


def _token_ids(vocab, shape=(2, 12), seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=shape)


def _assert_matches_pytorch(torch_model, model, tol=TOL, seed=0):
    ids = _token_ids(model.vocab_size, seed=seed)
    with torch.no_grad():
        want = torch_model(torch.tensor(ids), output_hidden_states=True)
    got = model(ids)
    assert len(got.hidden_lbtd) == len(want.hidden_states) == model.num_layers + 1
    for layer, expected in enumerate(want.hidden_states):
        np.testing.assert_allclose(
            got.hidden_lbtd[layer], expected.numpy(), atol=tol, rtol=tol, err_msg=f"layer {layer}"
        )
    np.testing.assert_allclose(got.logits_btv, want.logits.numpy(), atol=tol, rtol=tol)


# (Each family's default tiny model is checked against PyTorch from a single safetensors file,
# with its final norm, unembedding and facts, in test_models.py, whose families include these.)


@pytest.mark.parametrize("family", NATIVE)
def test_sharded_safetensors_load_the_parameters_of_the_single_file(family, tmp_path):
    """Bit-identical parameters from sharded files, hence the single file's PyTorch parity."""
    torch_model = tiny_models.build(family, seed=1)
    single = load_model(tiny_models.save(torch_model, tmp_path / "single")).params
    sharded_dir = tiny_models.save(torch_model, tmp_path / "sharded", shard_size="20KB")
    assert len(list(sharded_dir.glob("model-*.safetensors"))) > 1
    sharded = load_model(sharded_dir).params
    flat_single, flat_sharded = (jax.tree_util.tree_leaves_with_path(p) for p in (single, sharded))
    assert [k for k, _ in flat_single] == [k for k, _ in flat_sharded]
    for (key, want), (_, got) in zip(flat_single, flat_sharded, strict=True):
        np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(key))


_QWEN_SWA = ["full_attention", "sliding_attention", "sliding_attention"]
# A short original context, so that the ramp between interpolated and kept frequencies falls
# inside the tiny heads' 8 frequency pairs.
_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
_GEMMA3_PATTERN = ["sliding_attention"] * 5 + ["full_attention"]


def _longrope(pairs: int) -> dict:
    """Phi-3 LongRoPE factors for `pairs` rotary frequency pairs (long != short)."""
    return {
        "type": "longrope",
        "short_factor": [1.0 + 0.5 * i for i in range(pairs)],
        "long_factor": [2.0 + 3.0 * i for i in range(pairs)],
    }


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("gpt_neox", {"use_parallel_residual": False}),
        ("gpt_neox", {"tie_word_embeddings": True, "attention_bias": False}),
        ("gpt_neox", {"hidden_act": "gelu_new", "rotary_pct": 1.0, "partial_rotary_factor": 1.0}),
        ("qwen2", {"tie_word_embeddings": False, "num_key_value_heads": 4}),
        ("qwen3", {"tie_word_embeddings": True, "attention_bias": True}),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "layer_types": _QWEN_SWA}),
        ("qwen3", {"use_sliding_window": True, "sliding_window": 3, "layer_types": _QWEN_SWA}),
        ("gemma2", {"tie_word_embeddings": False, "attention_bias": True}),
        ("gemma2", {"attn_logit_softcapping": None, "final_logit_softcapping": None}),
        # Gemma-3's own pattern: five local layers, then a global one.
        ("gemma3_text", {"num_hidden_layers": 6, "layer_types": _GEMMA3_PATTERN}),
        ("olmo2", {"attention_bias": True, "num_key_value_heads": 4}),
        ("phi3", {"sliding_window": None, "partial_rotary_factor": 1.0}),
        # (Phi-3 validates LongRoPE factors against hidden_size // heads, so head_dim matches.)
        (
            "phi3",
            {"head_dim": 8, "rope_scaling": _longrope(2), "original_max_position_embeddings": 8},
        ),
        (
            "phi3",
            {"head_dim": 8, "rope_scaling": _longrope(2), "original_max_position_embeddings": 32},
        ),
        ("smollm3", {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False}),
        # SmolLM3 with sliding layers (use_sliding_window), one of them without RoPE.
        ("smollm3", {"use_sliding_window": True, "sliding_window": 4, "layer_types": _QWEN_SWA}),
        ("olmo3", {"rope_scaling": _YARN}),
        ("qwen3", {"rope_scaling": {**_YARN, "attention_factor": 0.8, "beta_fast": 8}}),
    ],
    ids=[
        "neox-serial",
        "neox-tied-nobias",
        "neox-gelu_new-full-rotary",
        "qwen2-untied",
        "qwen3-tied-bias",
        "qwen2-sliding",
        "qwen3-sliding",
        "gemma2-untied-bias",
        "gemma2-no-softcaps",
        "gemma3-5-local-1-global",
        "olmo2-bias-mha",
        "phi3-full-rotary-no-window",
        "phi3-longrope-long",
        "phi3-longrope-short",
        "smollm3-biases-untied",
        "smollm3-sliding-nope",
        "olmo3-yarn",
        "qwen3-yarn",
    ],
)
def test_variants_match_pytorch(family, overrides, tmp_path):
    torch_model = tiny_models.build(family, seed=2, **overrides)
    model = load_model(tiny_models.save(torch_model, tmp_path))
    tied = bool(overrides.get("tie_word_embeddings", torch_model.config.tie_word_embeddings))
    assert (model.family.lm_head[0] in model.params) != tied
    _assert_matches_pytorch(torch_model, model)


def test_gemma2_soft_caps_bend_the_logits_and_the_lens_head_caps_them(tmp_path):
    """The tiny Gemma-2's raw logits exceed the cap, so the cap matters to the parity above; the
    lens's head (`Decoder`) caps as the model does."""
    torch_model = tiny_models.build("gemma2", seed=1)
    model = load_model(tiny_models.save(torch_model, tmp_path))
    cap = torch_model.config.final_logit_softcapping
    ids = _token_ids(model.vocab_size)
    with torch.no_grad():
        out = torch_model(torch.tensor(ids), output_hidden_states=True)
        raw = torch_model.lm_head(out.hidden_states[-1]).numpy()
    assert np.abs(raw).max() > 1.5 * cap
    decoder = model.decoder()
    assert decoder.logit_softcap == cap
    got = decoder.unembed(np.asarray(out.hidden_states[-1]))
    np.testing.assert_allclose(got, out.logits.numpy(), atol=TOL, rtol=TOL)


# 16-bit checkpoints -------------------------------------------------------------------------

# Loaded into float32 the rounded weights are exact, so parity stays at TOL. Computing in
# bfloat16 (8 mantissa bits) rounds every activation: logits then differ from the float32
# reference by about 1% of their range (measured 0.8-1.6% here). Gemma-2's soft-cap (c = 1 in the
# tiny config) squeezes the range the error is measured against: 3.0% measured.
BF16_RELATIVE_TOL = {"gemma2": 5e-2}


@pytest.mark.parametrize(
    "family,checkpoint_dtype",
    [
        *((f, d) for f in ("gpt_neox", "qwen2", "qwen3") for d in ("float16", "bfloat16")),
        ("gemma2", "bfloat16"),
        ("olmo2", "float16"),
        ("phi3", "bfloat16"),
    ],
)
def test_16_bit_checkpoints_load(family, checkpoint_dtype, tmp_path):
    torch_model = tiny_models.build(family, seed=4).to(getattr(torch, checkpoint_dtype))
    directory = tiny_models.save(torch_model, tmp_path)
    stored = load_file(directory / "model.safetensors")
    assert {str(a.dtype) for a in stored.values()} == {checkpoint_dtype}
    # The same rounded weights computing in float32 (reloaded: `.float()` on the 16-bit model
    # would keep its rotary frequencies rounded to 16 bits).
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    _assert_matches_pytorch(reference, load_model(directory))

    model_bf16 = load_model(directory, dtype=jnp.bfloat16)
    ids = _token_ids(model_bf16.vocab_size)
    got = np.asarray(model_bf16(ids).logits_btv, np.float32)
    with torch.no_grad():
        want = reference(torch.tensor(ids)).logits.numpy()
    relative = np.abs(got - want).max() / np.abs(want).max()
    assert relative < BF16_RELATIVE_TOL.get(family, 3e-2), relative


# Checkpoints that do not fit --------------------------------------------------------------


def _edit_checkpoint(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


_TENSOR_OF = {
    "gpt_neox": "gpt_neox.layers.1.attention.dense.weight",
    "qwen2": "model.layers.1.self_attn.o_proj.weight",
    "qwen3": "model.layers.1.self_attn.o_proj.weight",
    "gemma2": "model.layers.1.post_feedforward_layernorm.weight",
    "olmo3": "model.layers.1.self_attn.q_norm.weight",
    "phi3": "model.layers.1.self_attn.qkv_proj.weight",
}


@pytest.mark.parametrize("family", list(_TENSOR_OF))
@pytest.mark.parametrize("problem", ["missing", "unexpected", "wrong shape"])
def test_a_checkpoint_that_does_not_fit_is_refused_naming_the_tensor(family, problem, tmp_path):
    directory = tiny_models.save(tiny_models.build(family), tmp_path)
    name = _TENSOR_OF[family]
    prefix = name.rsplit(".", 2)[0]
    if problem == "missing":
        _edit_checkpoint(directory, lambda t: t.pop(name))
    elif problem == "unexpected":
        name = f"{prefix}.extra.weight"
        _edit_checkpoint(directory, lambda t: t.update({name: np.zeros((2, 2), np.float32)}))
    else:
        _edit_checkpoint(directory, lambda t: t.update({name: t[name][..., :-1].copy()}))
    with pytest.raises(CheckpointMismatchError, match=f"{problem} tensors: .*{name}"):
        load_model(directory)


def test_pytorch_buffers_in_old_neox_checkpoints_are_ignored(tmp_path):
    torch_model = tiny_models.build("gpt_neox", seed=5)
    directory = tiny_models.save(torch_model, tmp_path)
    buffers = {
        "gpt_neox.layers.0.attention.bias": np.tril(np.ones((1, 1, 64, 64), bool)),
        "gpt_neox.layers.0.attention.masked_bias": np.array(-1e9, np.float32),
        "gpt_neox.layers.0.attention.rotary_emb.inv_freq": np.ones(2, np.float32),
    }
    _edit_checkpoint(directory, lambda t: t.update(buffers))
    _assert_matches_pytorch(torch_model, load_model(directory))


@pytest.mark.parametrize(
    "family,overrides,message",
    [
        ("qwen2", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling .*dyn"),
        ("olmo2", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling .*dynamic"),
        ("gemma2", {"hidden_activation": "mish"}, "hidden_activation 'mish'"),
        ("gemma3_text", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ("qwen3", {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
        ("olmo3", {"sliding_window": None}, "sliding_window is not set"),
        ("gpt_neox", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
        ("gpt_neox", {"hidden_act": "mish"}, "hidden_act 'mish'"),
        # transformers' Flax Llama family is checked the same way, at load and not at trace time.
        ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling .*dyn"),
        # Mixture-of-experts configs, by the same rule.
        ("qwen3_moe", {"num_experts_per_tok": 9}, "num_experts_per_tok=9 with 8 experts"),
        ("qwen3_moe", {"decoder_sparse_step": 0}, "decoder_sparse_step=0"),
        ("mixtral", {"num_experts_per_tok": 0}, "num_experts_per_tok=0"),
        ("olmoe", {"clip_qkv": 8.0}, "clip_qkv=8.0"),
        ("olmoe", {"head_dim": 16}, "head_dim=16"),
        (
            "mixtral",
            {"quantization_config": {"quant_method": "gptq"}},
            "quantization_config \\(quant_method 'gptq'\\): load it in transformers",
        ),
    ],
)
def test_unsupported_variants_are_refused(family, overrides, message, tmp_path):
    directory = tiny_models.save(tiny_models.build(family), tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config.update(overrides)
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"{family} variant is not supported.*{message}"):
        load_model(directory)


# Training and evaluation ------------------------------------------------------------------


def test_a_tuned_lens_trains_and_evaluates_on_tiny_neox(tokenizer, text_dir, tmp_path):
    from conftest import save_tiny_lm

    from configs import tiny

    config = tiny.get_config()
    config.model.source = str(save_tiny_lm(tmp_path / "neox", "gpt_neox", tokenizer))
    config.data.source = str(text_dir)
    config.num_steps = 3
    result = train_lib.train_and_evaluate(config, tmp_path / "run")
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[-1]["loss_nats_mean"] < records[0]["loss_nats_mean"]
    for lens in ("logit", "tuned"):
        assert len(result[lens]["kl_nats"]) == 3 and np.isfinite(result[lens]["kl_nats"]).all()
    assert np.mean(result["tuned"]["kl_nats"]) < np.mean(result["logit"]["kl_nats"])


_SHARDED_FORWARD = """
import sys
import jax
import numpy as np
from jaxlens.models import load_model
from jaxlens.sharding import make_mesh, model_param_shardings, put

mesh = make_mesh(1, 4)
for directory in sys.argv[1:]:
    model = load_model(directory)
    ids = np.random.default_rng(0).integers(0, model.vocab_size, size=(2, 12))
    shardings = model_param_shardings(model.params, mesh, shard=True)
    split = [s for s in jax.tree.leaves(shardings) if "model" in s.spec]
    assert len(split) >= 2 * model.num_layers, len(split)
    params = put(model.params, shardings)
    sharded = jax.jit(model.apply)(params, ids)
    whole = model.apply(model.params, ids)
    np.testing.assert_allclose(sharded.hidden_lbtd, whole.hidden_lbtd, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(sharded.logits_btv, whole.logits_btv, atol=1e-5, rtol=1e-5)
    print("ok", model.model_type, len(split))
"""


_MODEL_AXIS_FAMILIES = ("gpt_neox", "qwen3", "gemma2")


def test_weights_split_over_the_model_axis_give_the_same_forward(tmp_path):
    """Four simulated devices, every weight matrix split over "model" (for models too large for
    one chip): the same hidden states and logits as unsplit, for NeoX, Qwen3 and Gemma-2 (one
    process: the device count is fixed when jax starts)."""
    import os
    import subprocess
    import sys

    directories = [
        str(tiny_models.save(tiny_models.build(family, seed=2), tmp_path / family))
        for family in _MODEL_AXIS_FAMILIES
    ]
    out = subprocess.run(
        [sys.executable, "-c", _SHARDED_FORWARD, *directories],
        env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4"),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert [line.split()[0] for line in out.stdout.splitlines()] == ["ok"] * len(directories)
