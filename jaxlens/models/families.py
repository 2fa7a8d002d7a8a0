"""The model families jaxlens can look into, and where each keeps what a lens needs.

A family is a transformers `model_type` with a Flax causal-LM class: transformers' own (corrected
in `flax_fixes` where needed), or jaxlens's native decoder (`native`, one implementation whose
per-family differences are a `DecoderSpec` built in `specs`) for the families transformers has no
Flax model for. For each we record where the final norm and the unembedding live in the Flax
parameter tree, what kind of norm it is, which epsilon it uses, and the final logit soft-cap, so
a lens can decode any layer with the model's own head.
"""

from __future__ import annotations

import dataclasses

import transformers

from jaxlens.models import flax_fixes, native, rotary, specs


@dataclasses.dataclass(frozen=True)
class Family:
    """Static facts about one model family.

    Attributes:
      name: the transformers `model_type`.
      flax_class: the (possibly corrected) Flax causal-LM class.
      final_norm: path of the final norm in the parameter tree, or None when the model has none.
      norm_kind: "layernorm", "rmsnorm" or "gemma_rmsnorm" (scales by 1 + gamma).
      norm_scale_name: parameter name of the norm's scale ("scale" for LayerNorm, "weight" else).
      embedding: path of the input embedding `[vocab, d]`, used when embeddings are tied.
      lm_head: path of the untied output projection, or None when the family always ties.
      blocks: path of the block collection, whose children "0" .. "L-1" are the blocks (in the
        parameter tree and as Flax module paths).
      eps_attr: config attribute holding the final norm's epsilon (None: the fixed value `eps`).
      eps: the epsilon when the config has no attribute for it.
      takes_position_ids: whether the Flax module accepts `position_ids` (ALiBi models do not).
      max_positions_attr: config attribute with the position limit (None: no learned limit).
      softcap_attr: config attribute of the final logit soft-cap `c * tanh(z / c)` (None: none).
    """

    name: str
    flax_class: type
    final_norm: tuple[str, ...] | None
    norm_kind: str
    norm_scale_name: str
    embedding: tuple[str, ...]
    lm_head: tuple[str, ...] | None
    blocks: tuple[str, ...]
    eps_attr: str | None
    eps: float = 1e-5
    takes_position_ids: bool = True
    max_positions_attr: str | None = "max_position_embeddings"
    softcap_attr: str | None = None

    def logit_softcap(self, config) -> float | None:
        """The final logit soft-cap c of the config, or None."""
        cap = getattr(config, self.softcap_attr, None) if self.softcap_attr else None
        return None if cap is None else float(cap)

    def epsilon(self, config) -> float:
        return float(getattr(config, self.eps_attr)) if self.eps_attr else self.eps

    def max_positions(self, config) -> int | None:
        return getattr(config, self.max_positions_attr) if self.max_positions_attr else None


def _gpt_style(name, flax_class, embedding="wte", lm_head=None, positions="n_positions"):
    return Family(
        name=name,
        flax_class=flax_class,
        final_norm=("transformer", "ln_f"),
        norm_kind="layernorm",
        norm_scale_name="scale",
        embedding=("transformer", embedding, "embedding"),
        lm_head=lm_head,
        blocks=("transformer", "h"),
        eps_attr="layer_norm_epsilon",
        max_positions_attr=positions,
    )


def _llama_style(name, flax_class, norm_kind="rmsnorm", **fields):
    return Family(
        name=name,
        flax_class=flax_class,
        final_norm=("model", "norm"),
        norm_kind=norm_kind,
        norm_scale_name="weight",
        embedding=("model", "embed_tokens", "embedding"),
        lm_head=("lm_head",),
        blocks=("model", "layers"),
        eps_attr="rms_norm_eps",
        **fields,
    )


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        _gpt_style("gpt2", transformers.FlaxGPT2LMHeadModel),
        _gpt_style(
            "gpt_neo", transformers.FlaxGPTNeoForCausalLM, positions="max_position_embeddings"
        ),
        _gpt_style("gptj", transformers.FlaxGPTJForCausalLM, lm_head=("lm_head",)),
        Family(
            name="opt",
            flax_class=transformers.FlaxOPTForCausalLM,
            final_norm=("model", "decoder", "final_layer_norm"),
            norm_kind="layernorm",
            norm_scale_name="scale",
            embedding=("model", "decoder", "embed_tokens", "embedding"),
            lm_head=None,
            blocks=("model", "decoder", "layers"),
            eps_attr=None,  # OPT's final LayerNorm uses the PyTorch default, 1e-5
        ),
        dataclasses.replace(
            _gpt_style("bloom", transformers.FlaxBloomForCausalLM, embedding="word_embeddings"),
            takes_position_ids=False,  # ALiBi: no learned positions and no position limit
            max_positions_attr=None,
        ),
        _llama_style("llama", flax_fixes.FixedFlaxLlamaForCausalLM),
        _llama_style("mistral", flax_fixes.FixedFlaxMistralForCausalLM),
        _llama_style("gemma", flax_fixes.FixedFlaxGemmaForCausalLM, norm_kind="gemma_rmsnorm"),
        Family(
            name="gpt_neox",
            flax_class=native.NativeDecoderLM,
            final_norm=("gpt_neox", "final_layer_norm"),
            norm_kind="layernorm",
            norm_scale_name="scale",
            embedding=("gpt_neox", "embed_in", "embedding"),
            lm_head=("embed_out",),
            blocks=("gpt_neox", "layers"),
            eps_attr="layer_norm_eps",
        ),
        _llama_style("qwen2", native.NativeDecoderLM),
        _llama_style("qwen3", native.NativeDecoderLM),
        *(
            _llama_style(
                name,
                native.NativeDecoderLM,
                norm_kind="gemma_rmsnorm",
                softcap_attr="final_logit_softcapping",
            )
            for name in ("gemma2", "gemma3_text")
        ),
        *(_llama_style(name, native.NativeDecoderLM) for name in ("olmo2", "olmo3", "phi3")),
        _llama_style("smollm3", native.NativeDecoderLM),
        *(
            _llama_style(name, native.NativeDecoderLM)
            for name in ("mixtral", "qwen3_moe", "olmoe", "gpt_oss")
        ),
    ]
}

SUPPORTED = tuple(FAMILIES)


def require_supported(model_type: str | None) -> None:
    """Raises a ValueError naming the supported families unless `model_type` is one."""
    if model_type not in FAMILIES:
        raise ValueError(
            f"Unsupported architecture {model_type!r}: jaxlens supports the model types "
            f"{', '.join(SUPPORTED)} (transformers' Flax causal LMs, and jaxlens's own Flax "
            "decoder for the others)."
        )


def family_of(config) -> Family:
    """The family of a transformers config, or a ValueError naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    require_supported(model_type)
    _check_supported_variant(model_type, config)
    return FAMILIES[model_type]


def _check_supported_variant(model_type: str, config) -> None:
    problems = []
    if model_type == "opt":
        if config.word_embed_proj_dim != config.hidden_size:
            problems.append("word_embed_proj_dim != hidden_size (project_in/out, as in OPT-350m)")
        if not config.do_layer_norm_before or getattr(config, "_remove_final_layer_norm", False):
            problems.append("no final layer norm (do_layer_norm_before=False, as in OPT-350m)")
    if model_type in ("llama", "mistral") and getattr(config, "mlp_bias", False):
        problems.append("mlp_bias=True (the Flax MLP has no biases)")
    if model_type in ("llama", "mistral", "gemma"):
        problems += rotary.unsupported_scaling(config)
    if model_type in specs.FAMILIES:
        problems += specs.unsupported_features(config)
    if problems:
        raise ValueError(
            f"This {model_type} variant is not supported by jaxlens: {'; '.join(problems)}."
        )
