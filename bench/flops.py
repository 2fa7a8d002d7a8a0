"""The FLOP count of a lens step, shared by both implementations.

Only matrix multiplies are counted (2 FLOPs per multiply-add); softmaxes, norms and the optimizer
are elementwise and left out. Per token, with L blocks, width d, vocabulary V, W the matmul weights
of one block and s the sequence length:

  frozen model forward   2 * L * W                      (non-embedding weights: attention + MLP)
                         + 4 * L * d_attn * (s + 1) / 2  (scores and values, causal: on average
                                                          (s + 1) / 2 keys per query)
  target logits          2 * d * V                       (the model's own output distribution)
  per lensed layer       2 * d * d                       (translator forward)
  training, each layer   + 2 * d * V                     (lens logits)
                         + 2 * d * V                     (their gradient w.r.t. the normalised
                                                          input; the unembedding is frozen)
                         + 2 * d * d                     (translator weight gradient)
  evaluation, each layer + 2 * 2 * d * V                 (logit lens and tuned lens logits)

The model's own logits are counted once (as the target): jaxlens recomputes them from the last
hidden state and lets XLA drop the model's lm_head, tuned-lens uses the model's output; both do it
once. Neither side differentiates the frozen model or the hidden states.
"""

from __future__ import annotations


def model_facts(config, seq_len: int) -> dict:
    """The numbers the count needs, from a transformers GPT2Config or LlamaConfig."""
    d = config.hidden_size
    heads = config.num_attention_heads
    if config.model_type == "gpt2":
        ff = config.n_inner or 4 * d
        d_attn = d
        block = d * 3 * d + d * d + 2 * d * ff  # c_attn, c_proj, c_fc, mlp c_proj
    elif config.model_type == "llama":
        head_dim = getattr(config, "head_dim", None) or d // heads
        d_attn = heads * head_dim
        kv = config.num_key_value_heads * head_dim
        block = d * d_attn + 2 * d * kv + d_attn * d + 3 * d * config.intermediate_size
    else:
        raise ValueError(f"No FLOP count for model type {config.model_type!r}.")
    return {
        "num_layers": config.num_hidden_layers,
        "d_model": d,
        "vocab_size": config.vocab_size,
        "block_matmul_weights": block,
        "d_attn": d_attn,
        "seq_len": seq_len,
    }


def _forward_and_target(facts: dict) -> float:
    layers, d, vocab = facts["num_layers"], facts["d_model"], facts["vocab_size"]
    attention = 4 * layers * facts["d_attn"] * (facts["seq_len"] + 1) / 2
    return 2 * layers * facts["block_matmul_weights"] + attention + 2 * d * vocab


def train_flops_per_token(facts: dict) -> float:
    """Matmul FLOPs of one training step, per token."""
    layers, d, vocab = facts["num_layers"], facts["d_model"], facts["vocab_size"]
    per_layer = 2 * d * d + 2 * d * vocab + 2 * d * vocab + 2 * d * d
    return _forward_and_target(facts) + layers * per_layer


def eval_flops_per_token(facts: dict) -> float:
    """Matmul FLOPs of one evaluation step (logit and tuned lens, no gradients), per token."""
    layers, d, vocab = facts["num_layers"], facts["d_model"], facts["vocab_size"]
    per_layer = 2 * d * d + 2 * 2 * d * vocab
    return _forward_and_target(facts) + layers * per_layer
