"""The forward pass run by hand, one block module at a time, for GPT-2 and the native decoder.

An independent reference for `jaxlens.analysis.interventions`: no interception, the embedding,
each block's own Flax module (applied to its slice of the parameter tree), the final norm and the
unembedding called in turn, with a plain Python function changing a block's output in between.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from transformers.models.gpt2.modeling_flax_gpt2 import FlaxGPT2Block

from jaxlens.models import attention, native, rotary
from jaxlens.models.subject import Forward


def _gpt2_blocks(model, params, ids_bt):
    config, p = model.config, params["transformer"]
    tokens = ids_bt.shape[1]
    h_btd = p["wte"]["embedding"][ids_bt] + p["wpe"]["embedding"][jnp.arange(tokens)][None]
    mask_bt = jnp.ones(ids_bt.shape, jnp.int32)

    def run(layer, h_btd):
        block = FlaxGPT2Block(config)
        return block.apply({"params": p["h"][str(layer)]}, h_btd, mask_bt)[0]

    return h_btd, run


def _native_blocks(model, params, ids_bt):
    spec, p = model.flax_model.spec, params[model.flax_model.spec.base_name]
    tokens = ids_bt.shape[1]
    h_btd = p[spec.embed_name]["embedding"][ids_bt]
    assert not spec.embed_scale  # (Gemma's sqrt(d) is not reproduced here)
    positions_bt = jnp.broadcast_to(jnp.arange(tokens), ids_bt.shape)
    mask_bt = jnp.ones(ids_bt.shape, jnp.int32)

    def run(layer, h_btd):
        layer_spec = spec.layers[layer]
        mask_bts = attention.causal_mask(mask_bt, layer_spec.sliding_window)
        tables = None
        if layer_spec.rope is not None:
            tables = rotary.rotary_tables(positions_bt, layer_spec.rope, tokens)
        block = native.Block(spec, layer_spec)
        return block.apply({"params": p["layers"][str(layer)]}, h_btd, mask_bts, tables)

    return h_btd, run


def forward(model, params, ids_bt, edits=None) -> Forward:
    """`model.apply(params, ids_bt)` block by block (jitted as a whole); `edits[l](h_in_btd,
    h_out_btd)` gives block l's new output."""
    edits = edits or {}
    start = _gpt2_blocks if model.model_type == "gpt2" else _native_blocks

    def run_all(params, ids_bt):
        h_btd, run = start(model, params, ids_bt)
        hidden = [h_btd]
        for layer in range(model.num_layers):
            out_btd = run(layer, h_btd)
            h_btd = edits[layer](h_btd, out_btd) if layer in edits else out_btd
            hidden.append(h_btd)
        decoder = model.decoder(params)
        hidden[-1] = decoder.final_norm(h_btd)
        return Forward(jnp.stack(hidden), decoder.unembed(hidden[-1]))

    return jax.jit(run_all)(params, jnp.asarray(ids_bt))
