"""The lens's matmul rule (`jaxlens.precision`) as the TPU compiler sees it: the training loss's
gradient (translators, unembedding, the custom backward pass) compiled for a v5e:2x2 topology
on this CPU with libtpu, a bfloat16 model's unembedding and float32 translators."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlens.decoder import Decoder
from jaxlens.lens import Translators
from jaxlens.losses import layer_losses

L, B, T, D, V = 2, 4, 16, 64, 256


@pytest.fixture(scope="module")
def lowered():
    topology = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
    mesh = Mesh(np.array(topology.devices).reshape(4, 1), ("data", "model"))

    def abstract(shape, dtype, spec=None):
        sharding = NamedSharding(mesh, P() if spec is None else spec)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    translators = Translators(
        kernel_ldd=abstract((L, D, D), jnp.float32), bias_ld=abstract((L, D), jnp.float32)
    )
    decoder = Decoder(
        unembed_vd=abstract((V, D), jnp.bfloat16),
        unembed_bias_v=None,
        norm_scale_d=abstract((D,), jnp.bfloat16),
        norm_bias_d=None,
        norm_kind="rmsnorm",
        eps=1e-6,
    )

    def loss_and_grads(translators, decoder, h_lbtd, h_final_btd, ids_bt):
        def total(translators):
            return layer_losses(
                decoder, translators, h_lbtd, h_final_btd, ids_bt, chunk_tokens=32
            ).sum()

        return jax.value_and_grad(total)(translators)

    return jax.jit(loss_and_grads).lower(
        translators,
        decoder,
        abstract((L, B, T, D), jnp.bfloat16, P(None, "data")),
        abstract((B, T, D), jnp.bfloat16, P("data")),
        abstract((B, T), jnp.int32, P("data")),
    )


def test_every_lens_matmul_asks_for_full_precision_with_float32_results(lowered):
    dots = [line for line in lowered.as_text().splitlines() if "stablehlo.dot_general" in line]
    assert len(dots) >= 5  # translator forward/backward, unembedding, target moments, backward
    for dot in dots:
        assert "precision = [HIGHEST, HIGHEST]" in dot, dot
        assert re.search(r"-> tensor<[0-9x]+xf32>", dot), dot
        if f"tensor<{V}x{D}xbf16>" in dot:  # the bfloat16 unembedding meets bfloat16 vectors
            operands = re.search(r": \((.*)\) ->", dot).group(1)
            assert operands.count("xbf16>") == 2, dot
    assert any(f"tensor<{V}x{D}xbf16>" in dot for dot in dots)


def test_the_compiled_tpu_program_keeps_the_precision(lowered):
    ops = [
        line
        for line in lowered.compile().as_text().splitlines()
        if re.search(r"\b(dot|convolution)\(", line)
    ]
    assert len(ops) >= 5
    for op in ops:
        assert "operand_precision={highest,highest}" in op, op
