"""The routed-expert block against transformers' PyTorch sparse MoE blocks (same weights).

Each block is loaded through the checkpoint converter (per-expert tensors stacked), so the
stacking is checked with the routing; both grouped matmuls (CPU blocks, `ragged_dot`) are run.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import (
    Qwen3MoeDecoderLayer,
    Qwen3MoeSparseMoeBlock,
)

from jaxlens.models import convert, mlp, moe
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
    else:
        config = transformers.OlmoeConfig(**common, intermediate_size=24, num_experts=EXPERTS)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


_BLOCKS = {
    "mixtral": MixtralSparseMoeBlock,
    "qwen3_moe": Qwen3MoeSparseMoeBlock,
    "olmoe": OlmoeSparseMoeBlock,
}


def _torch_block(config, seed=0):
    torch.manual_seed(seed)
    block = _BLOCKS[config.model_type](config).eval()
    with torch.no_grad():
        for param in block.parameters():
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
]


@pytest.mark.parametrize("dispatch", ["blocked", "ragged_dot"])
@pytest.mark.parametrize(
    "family,overrides", CASES, ids=[f"{f}-{'-'.join(map(str, o.values()))}" for f, o in CASES]
)
def test_block_matches_pytorch(family, overrides, dispatch):
    config = _config(family, **overrides)
    block = _torch_block(config)
    x_btd = np.random.default_rng(0).normal(size=(3, 11, D)).astype(np.float32)
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
    got = jax.jit(moe.routed_mlp, static_argnums=(6, 7))(
        f32[0], experts_nk.astype(np.int32), *f32[1:], jax.nn.silu, "blocked"
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
