"""The routed-expert block against transformers' PyTorch sparse MoE blocks (same weights), and the
MoE families as whole models: routing in the tiny models, refusals, 16-bit checkpoints.

Each block is loaded through the checkpoint converter (per-expert tensors stacked), so the
stacking is checked with the routing; both grouped matmuls (CPU blocks, `ragged_dot`) are run.
The whole models' hidden states and logits are compared with PyTorch in test_native_models.py,
with every other native family (from single and sharded safetensors, and on a 4-device model
axis), and their lenses trained, evaluated, exported and imported in test_lens_io.py.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models
import torch
import transformers
from safetensors.numpy import load_file, save_file
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import (
    Qwen3MoeDecoderLayer,
    Qwen3MoeSparseMoeBlock,
)

from jaxlens.models import convert, convert_experts, load_model, mlp, moe
from jaxlens.models.convert import CheckpointMismatchError

TOL = 1e-5  # float32 against float32
D, EXPERTS, TOP_K = 32, 6, 2


def _config(family, **overrides):
    common = dict(hidden_size=D, num_experts_per_tok=TOP_K, hidden_act="silu")
    if family == "mixtral":
        config = transformers.MixtralConfig(
            **common, intermediate_size=24, num_local_experts=EXPERTS
        )
    elif family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            **common, moe_intermediate_size=24, intermediate_size=40, num_experts=EXPERTS
        )
    elif family == "olmoe":
        config = transformers.OlmoeConfig(**common, intermediate_size=24, num_experts=EXPERTS)
    else:
        config = transformers.GptOssConfig(
            **common, intermediate_size=24, num_local_experts=EXPERTS
        )
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


_BLOCKS = {
    "mixtral": MixtralSparseMoeBlock,
    "qwen3_moe": Qwen3MoeSparseMoeBlock,
    "olmoe": OlmoeSparseMoeBlock,
    "gpt_oss": GptOssMLP,
}


def _torch_block(config, seed=0):
    torch.manual_seed(seed)
    block = _BLOCKS[config.model_type](config).eval()
    with torch.no_grad():
        for param in block.parameters():
            if config.model_type == "gpt_oss":  # GptOssExperts' parameters start uninitialised
                param.normal_(0.0, 0.3)
            else:
                param.add_(torch.randn_like(param) * 0.2)  # routers decisive, experts distinct
    return block


def _jax_block(config, state_dict, dispatch):
    spec = moe.moe_spec(config)
    module = moe.RoutedExperts(spec, D, mlp.activation(spec.activation), dispatch=dispatch)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 1, D))))
    params = convert.params_from_torch_names(state_dict, shapes["params"], "model")
    return module, params


def _state_dict(block):
    return {name: value.numpy() for name, value in block.state_dict().items()}


CASES = [
    ("mixtral", {}),
    ("mixtral", {"hidden_act": "gelu_pytorch_tanh"}),
    ("qwen3_moe", {"norm_topk_prob": True}),
    ("qwen3_moe", {"norm_topk_prob": False}),
    ("olmoe", {"norm_topk_prob": False}),
    ("olmoe", {"norm_topk_prob": True}),
    ("gpt_oss", {}),
]


@pytest.mark.parametrize("dispatch", ["blocked", "ragged_dot"])
@pytest.mark.parametrize(
    "family,overrides", CASES, ids=[f"{f}-{'-'.join(map(str, o.values()))}" for f, o in CASES]
)
def test_block_matches_pytorch(family, overrides, dispatch):
    config = _config(family, **overrides)
    block = _torch_block(config)
    x_btd = np.random.default_rng(0).normal(size=(3, 11, D)).astype(np.float32)
    if family == "gpt_oss":  # large enough that the clamps at +-7 bind
        x_btd *= 3
        gate_up = x_btd.reshape(-1, D) @ block.experts.gate_up_proj[0].detach().numpy()
        assert (gate_up[:, 0::2] > 7).any() and (np.abs(gate_up[:, 1::2]) > 7).any()
    with torch.no_grad():
        want, router_logits = block(torch.tensor(x_btd))
        chosen = torch.topk(router_logits, TOP_K, dim=-1).indices.numpy()
    # Routing that could hide a mistake is excluded: every expert is used, and tokens differ.
    assert set(chosen.ravel()) == set(range(EXPERTS))
    assert len({tuple(sorted(row)) for row in chosen}) > EXPERTS
    module, params = _jax_block(config, _state_dict(block), dispatch)
    got = jax.jit(module.apply)({"params": params}, x_btd)
    np.testing.assert_allclose(got, want.numpy(), atol=TOL, rtol=TOL)


def test_normalising_the_top_k_changes_the_output():
    """The flag is read (Qwen3-MoE and OLMoE differ from Mixtral only in it)."""
    x_btd = np.random.default_rng(1).normal(size=(1, 8, D)).astype(np.float32)
    outputs = []
    for normalise in (False, True):
        config = _config("olmoe", norm_topk_prob=normalise)
        module, params = _jax_block(config, _state_dict(_torch_block(config)), "blocked")
        outputs.append(np.asarray(jax.jit(module.apply)({"params": params}, x_btd)))
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-2


def test_block_rows_cover_any_routing():
    """All tokens on one expert (the worst padding) and on none of most: still exact."""
    rng = np.random.default_rng(2)
    x_nd = rng.normal(size=(40, 8))
    gate, up, down = (rng.normal(size=s) for s in [(5, 8, 6), (5, 8, 6), (5, 6, 8)])
    experts_nk = np.stack([np.full(40, 3), np.arange(40) % 2], axis=1)
    weights_nk = rng.uniform(size=(40, 2))
    want = np.zeros((40, 8))  # float64 numpy, one (token, expert) pair at a time
    for n, j in np.ndindex(40, 2):
        e = experts_nk[n, j]
        gated = x_nd[n] @ gate[e]
        hidden = gated / (1 + np.exp(-gated)) * (x_nd[n] @ up[e])
        want[n] += weights_nk[n, j] * (hidden @ down[e])
    f32 = [np.float32(a) for a in (x_nd, weights_nk, gate, up, down)]
    bank = dict(zip(("gate", "up", "down"), f32[2:], strict=True))
    expert = moe.gated_expert(jax.nn.silu, ("gate", "up", "down"))
    got = jax.jit(moe.routed_mlp, static_argnums=(4, 5))(
        f32[0], experts_nk.astype(np.int32), f32[1], bank, expert, "blocked"
    )
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    "step,mlp_only", [(1, []), (2, []), (1, [0, 2]), (2, [1]), (3, [])], ids=str
)
def test_qwen3_moe_dense_layers_as_pytorch_chooses_them(step, mlp_only):
    config = _config("qwen3_moe", decoder_sparse_step=step, mlp_only_layers=mlp_only)
    config.num_hidden_layers = 4
    want = [
        isinstance(Qwen3MoeDecoderLayer(config, i).mlp, Qwen3MoeSparseMoeBlock) for i in range(4)
    ]
    assert list(moe.sparse_layers(config)) == want


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"num_experts_per_tok": 7}, "num_experts_per_tok=7 with 6 experts"),
        ({"decoder_sparse_step": 0}, "decoder_sparse_step=0"),
    ],
)
def test_unsupported_routing_is_named(overrides, message):
    assert message in "; ".join(moe.unsupported_features(_config("qwen3_moe", **overrides)))


# The per-expert tensors that do not fit ------------------------------------------------


def _refused(edit):
    config = _config("mixtral")
    tensors = _state_dict(_torch_block(config))
    edit(tensors)
    with pytest.raises(CheckpointMismatchError) as error:
        _jax_block(config, tensors, "blocked")
    return str(error.value)


def test_a_missing_expert_is_named():
    message = _refused(lambda t: t.pop("experts.2.w3.weight"))
    assert "missing tensors: experts.2.w3.weight" in message


def test_an_extra_expert_is_named():
    message = _refused(lambda t: t.update({"experts.6.w1.weight": t["experts.0.w1.weight"]}))
    assert "unexpected tensors: experts.6.w1.weight" in message


def test_a_misshaped_expert_is_named():
    message = _refused(lambda t: t.update({"experts.4.w2.weight": t["experts.4.w2.weight"].T}))
    assert "wrong shape tensors: experts.4.w2.weight: checkpoint (24, 32)" in message


# Whole models: routing, refusals, a lens --------------------------------------------------

FAMILIES = ("mixtral", "qwen3_moe", "olmoe", "gpt_oss")


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_models_route_tokens_to_different_experts(family):
    """The tiny models' parity (test_native_models.py, same seed and ids) exercises routing:
    in every sparse layer tokens choose different experts, and most experts are chosen."""
    torch_model = tiny_models.build(family, seed=1)
    ids = np.random.default_rng(0).integers(0, torch_model.config.vocab_size, size=(2, 12))
    with torch.no_grad():
        router_logits = torch_model(torch.tensor(ids), output_router_logits=True).router_logits
    spec = moe.moe_spec(torch_model.config)
    sparse = [i for i, routes in enumerate(moe.sparse_layers(torch_model.config)) if routes]
    assert len(router_logits) == len(sparse) > 0
    for logits in router_logits:
        chosen = torch.topk(logits, spec.top_k, dim=-1).indices.numpy()
        assert len({tuple(sorted(row)) for row in chosen}) >= 3
        assert len(set(chosen.ravel())) > spec.num_experts // 2


def test_qwen3_moe_dense_layers_load_as_dense_mlps(tmp_path):
    model = load_model(tiny_models.save(tiny_models.build("qwen3_moe"), tmp_path))
    layers = model.params["model"]["layers"]
    assert set(layers["0"]["mlp"]) == {"gate", "experts"} == set(layers["2"]["mlp"])
    assert set(layers["1"]["mlp"]) == {"gate_proj", "up_proj", "down_proj"}  # mlp_only_layers


_EXPERT = "model.layers.1.block_sparse_moe.experts"


@pytest.mark.parametrize(
    "problem,name,edit",
    [
        ("missing", f"{_EXPERT}.2.w2.weight", lambda t, n: t.pop(n)),
        (
            "unexpected",
            f"{_EXPERT}.4.w1.weight",
            lambda t, n: t.update({n: t[f"{_EXPERT}.0.w1.weight"]}),
        ),
        ("wrong shape", f"{_EXPERT}.3.w3.weight", lambda t, n: t.update({n: t[n][:-1].copy()})),
    ],
    ids=["missing", "unexpected", "wrong shape"],
)
def test_a_checkpoint_whose_experts_do_not_fit_is_refused_naming_them(
    problem, name, edit, tmp_path
):
    directory = tiny_models.save(tiny_models.build("mixtral"), tmp_path)
    tensors = load_file(directory / "model.safetensors")
    edit(tensors, name)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match=f"{problem} tensors: .*{re.escape(name)}"):
        load_model(directory)


@pytest.mark.parametrize("checkpoint_dtype", ["float16", "bfloat16"])
def test_16_bit_expert_checkpoints_load(checkpoint_dtype, tmp_path):
    """Stacked from 16-bit tensors, the experts compute in float32 as PyTorch's reload does."""
    torch_model = tiny_models.build("olmoe", seed=4).to(getattr(torch, checkpoint_dtype))
    directory = tiny_models.save(torch_model, tmp_path)
    assert {str(a.dtype) for a in load_file(directory / "model.safetensors").values()} == {
        checkpoint_dtype
    }
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids = np.random.default_rng(0).integers(0, reference.config.vocab_size, size=(2, 12))
    with torch.no_grad():
        want = reference(torch.tensor(ids), output_hidden_states=True)
    got = load_model(directory)(ids)
    np.testing.assert_allclose(got.hidden_lbtd, np.stack(want.hidden_states), atol=TOL, rtol=TOL)
    np.testing.assert_allclose(got.logits_btv, want.logits.numpy(), atol=TOL, rtol=TOL)
    if checkpoint_dtype != "float16":
        return  # (computing in bfloat16 once is enough)
    # Computing in bfloat16 rounds every activation, and may flip a token's routing where its
    # best experts nearly tie: measured against float32, jaxlens's bfloat16 forward must stay
    # within test_native_models.py's 3% or PyTorch's own bfloat16 forward's error, if larger
    # (OLMoE from float16 here: PyTorch 6.4%, jaxlens 3.6%).
    torch_bf16 = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.bfloat16, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        logits_torch_bf16 = torch_bf16(torch.tensor(ids)).logits.float().numpy()
    logits_bf16 = np.asarray(load_model(directory, dtype=jnp.bfloat16)(ids).logits_btv, np.float32)
    scale = np.abs(want.logits.numpy()).max()
    relative = np.abs(logits_bf16 - want.logits.numpy()).max() / scale
    torch_relative = np.abs(logits_torch_bf16 - want.logits.numpy()).max() / scale
    assert relative < max(3e-2, torch_relative), (relative, torch_relative)


# GPT-OSS's MXFP4-packed experts ---------------------------------------------------------------


def _random_mxfp4(rng, experts, out_features, in_features, exponents=(118, 123)):
    """Random packed bytes and scales (2^-9 .. 2^-5 by default: weights below 0.2)."""
    blocks = rng.integers(
        0, 256, size=(experts, out_features, in_features // 32, 16), dtype=np.uint8
    )
    scales = rng.integers(
        *exponents, size=(experts, out_features, in_features // 32), dtype=np.uint8
    )
    return blocks, scales


def test_mxfp4_unpacks_as_transformers_does():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = _random_mxfp4(np.random.default_rng(0), 3, 8, 64, exponents=(100, 150))
    got = convert_experts.unpack_mxfp4(
        {"m.experts.down_proj_blocks": blocks, "m.experts.down_proj_scales": scales}
    )
    want = convert_moe_packed_tensors(
        torch.tensor(blocks), torch.tensor(scales), dtype=torch.float32
    )
    assert list(got) == ["m.experts.down_proj"]
    np.testing.assert_array_equal(got["m.experts.down_proj"], want.numpy())


def test_an_mxfp4_gpt_oss_checkpoint_loads_with_pytorch_parity(tmp_path):
    """GPT-OSS as published: experts packed in MXFP4, `quantization_config` in config.json. The
    reference is the PyTorch model holding the same experts unpacked by transformers."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    torch_model = tiny_models.build("gpt_oss", seed=3, intermediate_size=32)  # MXFP4: 32 | f
    directory = tiny_models.save(torch_model, tmp_path)
    tensors = load_file(directory / "model.safetensors")
    rng = np.random.default_rng(1)
    config = torch_model.config
    d, f, e = config.hidden_size, config.intermediate_size, config.num_local_experts
    for i, layer in enumerate(torch_model.model.layers):
        for proj, out_features, in_features in (("gate_up_proj", 2 * f, d), ("down_proj", d, f)):
            blocks, scales = _random_mxfp4(rng, e, out_features, in_features)
            name = f"model.layers.{i}.mlp.experts.{proj}"
            del tensors[name]
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
            unpacked = convert_moe_packed_tensors(
                torch.tensor(blocks), torch.tensor(scales), dtype=torch.float32
            )
            with torch.no_grad():
                getattr(layer.mlp.experts, proj).copy_(unpacked)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config_json = json.loads((directory / "config.json").read_text())
    config_json["quantization_config"] = {"quant_method": "mxfp4"}
    (directory / "config.json").write_text(json.dumps(config_json))

    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(2, 12))
    with torch.no_grad():
        want = torch_model(torch.tensor(ids), output_hidden_states=True)
    got = load_model(directory)(ids)
    np.testing.assert_allclose(got.hidden_lbtd, np.stack(want.hidden_states), atol=TOL, rtol=TOL)
    np.testing.assert_allclose(got.logits_btv, want.logits.numpy(), atol=TOL, rtol=TOL)
