"""`SubjectModel`: a frozen causal language model that a lens looks into.

It wraps one of transformers' Flax causal LMs (corrected where needed, see `flax_fixes`) with its
parameters, and offers the little a lens needs: every layer's residual stream and the final
logits from one jitted forward, the model's own final norm and unembedding (`Decoder`), and the
facts L, d, V and the position limit. `apply` is pure, so training steps can call it inside their
own `jax.jit` with the parameters as an argument (never as baked-in constants).

`hidden_states` has L + 1 entries: index 0 is the embedding output, index i the output of block
i - 1, and the last one already has the final norm applied (transformers' convention, both in
PyTorch and in Flax). A lens translates entries 0 .. L-1; the last is the target's own input.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.decoder import Decoder
from jaxlens.models.families import Family, family_of


class Forward(NamedTuple):
    """What one forward pass returns.

    Attributes:
      hidden_lbtd: residual streams `[L + 1, batch, tokens, d]` (the last is final-normed).
      logits_btv: the model's own next-token logits `[batch, tokens, vocab]`.
    """

    hidden_lbtd: jax.Array
    logits_btv: jax.Array


def _at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _has(tree, path) -> bool:
    try:
        _at(tree, path)
    except (KeyError, TypeError):
        return False
    return True


class SubjectModel:
    """A frozen Flax causal LM with its parameters.

    Attributes:
      config: the transformers config.
      family: the `Family` record (norm kind, where the head lives).
      params: the Flax parameter tree (jax arrays).
      tokenizer: a transformers tokenizer, or None.
      name_or_path: the model id or path it was loaded from (goes into exported lens files).
      revision: the hub revision, when known.
    """

    def __init__(
        self,
        config,
        params,
        *,
        dtype=jnp.float32,
        tokenizer=None,
        name_or_path: str | None = None,
        revision: str | None = None,
        flax_model=None,
    ):
        self.family: Family = family_of(config)
        self.config = config
        self.dtype = dtype
        # Building it traces the whole model once; loaders pass the one they built for its shapes.
        self.flax_model = (
            flax_model if flax_model is not None else self.flax_model_for(config, dtype)
        )
        self.params = params
        self.tokenizer = tokenizer
        self.name_or_path = name_or_path or getattr(config, "_name_or_path", "") or None
        self.revision = revision
        self._jitted_apply = jax.jit(self.apply)

    @staticmethod
    def flax_model_for(config, dtype=jnp.float32):
        """The family's Flax model for `config`, without parameters; its `params_shape_tree` is
        the parameter tree as `jax.ShapeDtypeStruct`s (nothing allocated)."""
        return family_of(config).flax_class(config, dtype=dtype, _do_init=False)

    # Facts a lens needs -------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        """L, the number of blocks (= number of translators)."""
        return self.config.num_hidden_layers

    @property
    def d_model(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model accepts (None: no learned limit, e.g. ALiBi)."""
        return self.family.max_positions(self.config)

    @property
    def model_type(self) -> str:
        return self.family.name

    # The forward pass ---------------------------------------------------------------------

    def apply(self, params, input_ids_bt: jax.Array) -> Forward:
        """Pure forward pass: all hidden states and the logits. Safe inside `jax.jit`.

        Args:
          params: the parameter tree (usually `self.params`).
          input_ids_bt: int token ids `[batch, tokens]`, not validated here (see `__call__`).
        Returns:
          `Forward(hidden_lbtd [L+1, b, t, d], logits_btv [b, t, V])`.
        """
        batch, tokens = input_ids_bt.shape
        inputs = dict(
            input_ids=input_ids_bt.astype(jnp.int32),
            attention_mask=jnp.ones((batch, tokens), jnp.int32),
            output_hidden_states=True,
            return_dict=True,
        )
        if self.family.takes_position_ids:
            inputs["position_ids"] = jnp.broadcast_to(jnp.arange(tokens), (batch, tokens))
        out = self.flax_model.module.apply({"params": params}, **inputs)
        return Forward(jnp.stack(out.hidden_states), out.logits)

    def __call__(self, input_ids_bt) -> Forward:
        """Validated, jitted forward pass with the model's own parameters.

        Args:
          input_ids_bt: token ids `[batch, tokens]` (or `[tokens]`, treated as one sequence).
        """
        ids = self.check_input_ids(input_ids_bt)
        return self._jitted_apply(self.params, ids)

    def check_input_ids(self, input_ids) -> np.ndarray:
        """Returns ids as int32 `[batch, tokens]`, or raises a ValueError saying what is wrong."""
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"Expected token ids of shape [batch, tokens]; got {ids.shape}.")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"Token ids must be integers; got dtype {ids.dtype}.")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.vocab_size:
            raise ValueError(
                f"Token ids must lie in [0, {self.vocab_size}) for this model; found "
                f"{low if low < 0 else high}. Use this model's own tokenizer."
            )
        limit = self.max_positions
        if limit is not None and ids.shape[1] > limit:
            raise ValueError(
                f"Sequence of {ids.shape[1]} tokens exceeds the model's {limit} positions; "
                f"use sequences of at most {limit} tokens."
            )
        return ids.astype(np.int32)

    def tokenize(self, text: str) -> np.ndarray:
        """Token ids `[1, tokens]` of `text` with the model's tokenizer."""
        if self.tokenizer is None:
            raise ValueError("This model was loaded without a tokenizer; pass token ids instead.")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError("The text is empty after tokenization; give a non-empty prompt.")
        return np.asarray(ids, np.int32)[None]

    # The head a lens decodes with --------------------------------------------------------

    def decoder(self, params=None) -> Decoder:
        """The model's final norm and unembedding, lifted out of `params` (default: own)."""
        params = self.params if params is None else params
        family = self.family
        norm = _at(params, family.final_norm) if family.final_norm else {}
        if family.lm_head and _has(params, family.lm_head):
            head = _at(params, family.lm_head)
            unembed_vd, unembed_bias = jnp.transpose(head["kernel"]), head.get("bias")
        else:  # tied: the unembedding is the input embedding
            unembed_vd, unembed_bias = _at(params, family.embedding), None
        return Decoder(
            unembed_vd=unembed_vd,
            unembed_bias_v=unembed_bias,
            norm_scale_d=norm.get(family.norm_scale_name),
            norm_bias_d=norm.get("bias"),
            norm_kind=family.norm_kind if family.final_norm else "none",
            eps=family.epsilon(self.config),
            logit_softcap=family.logit_softcap(self.config),
        )

    def final_norm(self, h_d: jax.Array) -> jax.Array:
        """The model's final norm applied to `[..., d]` (float32 out)."""
        return self.decoder().final_norm(h_d)

    def unembed(self, h_d: jax.Array) -> jax.Array:
        """The model's unembedding (with lm_head bias and logit soft-cap if any) of `[..., d]` ->
        `[..., V]`."""
        return self.decoder().unembed(h_d)

    def __repr__(self) -> str:
        return (
            f"SubjectModel({self.name_or_path!r}, family={self.model_type}, L={self.num_layers}, "
            f"d={self.d_model}, V={self.vocab_size}, max_positions={self.max_positions})"
        )
