"""What the benchmark measures: the subject models ("cases"), their step sizes, the implementations.

A case is one subject model and one step size (`batch` sequences of `seq_len` tokens), the same
for every implementation. The random GPT-2 cases use the real 50,257-word vocabulary, so the
unembedding (`L * 4 * d * V` FLOPs per token, the bulk of a lens step) is full size; their weights
are a transformers random initialisation, saved once as safetensors and read by both sides.
SmolLM2 is the real embedded model (the cached GGUF file), read by jaxlens's own GGUF loader and by
transformers' GGUF loader for PyTorch.

Default sizes keep the full run near 25 minutes on this project's 2-core CPU, whose float32
matmul peak varied between about 140 and 280 GFLOP/s with the load of the machine it shares.
"""

from __future__ import annotations

import dataclasses

GPT2_VOCAB = 50257
SMOLLM2_VOCAB = 49152
SMOLLM2_SOURCE = "embedded:smollm2"


@dataclasses.dataclass(frozen=True)
class Case:
    """One subject model at one step size.

    Attributes:
      name: the case's name on the command line and in the results.
      source: "gpt2-random" (a random GPT2Config model) or "embedded:smollm2".
      n_layer, n_embd, n_head: the model's shape (a random GPT-2 is built with it; for SmolLM2
        it only sizes the parity check's translators).
      vocab_size: the model's vocabulary (token ids are drawn below it).
      seq_len: tokens per sequence.
      batch: sequences per optimizer step (tokens per step = batch * seq_len), one micro-batch.
      train_steps: timed steady-state training steps, after the first step (timed apart).
      eval_steps: timed evaluation steps (0: none), after a first evaluation step timed apart
        (as training's first step is). Both sides have just run the training steps, so the
        model is warm; jaxlens's ahead-of-time compilation is timed apart.
      repeats: default repeats (fresh processes per implementation) of this case.
      bf16_repeats: in how many of the first repeats jaxlens-bf16 runs too (it is reported,
        not a target; on the larger cases one run costs about a minute).
    """

    name: str
    source: str
    n_layer: int = 0
    n_embd: int = 0
    n_head: int = 0
    vocab_size: int = GPT2_VOCAB
    seq_len: int = 512
    batch: int = 1
    train_steps: int = 2
    eval_steps: int = 1
    repeats: int = 5
    bf16_repeats: int = 0

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq_len

    def with_tokens(self, tokens: int) -> Case:
        """The same model at `tokens` per step (whole sequences of `seq_len`)."""
        batch, rest = divmod(tokens, self.seq_len)
        if rest or batch == 0:
            raise ValueError(f"{tokens} tokens per step is not a multiple of {self.seq_len}.")
        return dataclasses.replace(self, batch=batch)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"tokens_per_step": self.tokens_per_step}


CASES = {
    "gpt2-4x256": Case(
        "gpt2-4x256", "gpt2-random", n_layer=4, n_embd=256, n_head=4, seq_len=512, batch=1,
        train_steps=2, eval_steps=1, bf16_repeats=1,
    ),
    "gpt2-small": Case(
        "gpt2-small", "gpt2-random", n_layer=12, n_embd=768, n_head=12, seq_len=512, batch=1,
        train_steps=2, eval_steps=1,
    ),
    # A real model: loading it takes 7 s (jaxlens) and 17 s (transformers' GGUF reader) per
    # process, so it gets fewer repeats by default to keep the full run near 25 minutes.
    "smollm2": Case(
        "smollm2", SMOLLM2_SOURCE, n_layer=30, n_embd=576, n_head=9, vocab_size=SMOLLM2_VOCAB,
        seq_len=256, batch=1, train_steps=1, eval_steps=1, repeats=2,
    ),
}  # fmt: skip

# `--quick`: the same models, a few tokens per step, one repeat: a smoke run of every code path.
QUICK = dict(seq_len=64, batch=2, train_steps=1, eval_steps=1, repeats=1, bf16_repeats=1)
QUICK_CASES = ("gpt2-4x256",)

# Peak memory is measured on one case at several step sizes (one repeat each; whole sequences).
MEMORY_CASE = "gpt2-4x256"
MEMORY_TOKENS = (512, 1024, 2048)
MEMORY_SEQ_LEN = 512
QUICK_MEMORY_TOKENS = (128, 512)
QUICK_MEMORY_SEQ_LEN = 128


@dataclasses.dataclass(frozen=True)
class Impl:
    """One implementation under test.

    Attributes:
      name: its name in the results.
      side: "jax" (jaxlens) or "torch" (tuned-lens's loop).
      dtype: jaxlens: the model and unembedding dtype ("float32" or "bfloat16").
      autocast: tuned-lens: run the lens under `torch.autocast(bfloat16)` as its train loop does.
      reference: compared with tuned-lens float32 at 1e-4 before anything is timed.
    """

    name: str
    side: str
    dtype: str = "float32"
    autocast: bool = False
    reference: bool = False

    @property
    def bfloat16(self) -> bool:
        """Whether its matmuls run in bfloat16 (jaxlens's dtype, tuned-lens's autocast)."""
        return self.dtype == "bfloat16" or self.autocast


IMPLS = {
    "jaxlens": Impl("jaxlens", "jax", reference=True),
    "tuned-lens-f32": Impl("tuned-lens-f32", "torch", reference=True),
    "tuned-lens-shipped": Impl("tuned-lens-shipped", "torch", autocast=True),
    "jaxlens-bf16": Impl("jaxlens-bf16", "jax", dtype="bfloat16"),
}

# The ratios reported, numerator / denominator, paired by repeat.
RATIOS = (
    ("jaxlens", "tuned-lens-f32"),
    ("jaxlens", "tuned-lens-shipped"),
    ("jaxlens-bf16", "tuned-lens-shipped"),
)

# Implementations in the memory runs.
MEMORY_IMPLS = ("jaxlens", "tuned-lens-f32", "tuned-lens-shipped")


def select(names: list[str] | None, quick: bool) -> list[Case]:
    """The cases to run, shrunk to smoke-test sizes when `quick`."""
    names = names or list(QUICK_CASES if quick else CASES)
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        raise ValueError(f"Unknown case(s) {unknown}; choose from {sorted(CASES)}.")
    chosen = [CASES[n] for n in names]
    return [dataclasses.replace(c, **QUICK) for c in chosen] if quick else chosen


def memory_cases(name: str, quick: bool, tokens: list[int] | None = None) -> list[Case]:
    """The memory case at each step size."""
    if name not in CASES:
        raise ValueError(f"Unknown memory case {name!r}; choose from {sorted(CASES)}.")
    seq_len = QUICK_MEMORY_SEQ_LEN if quick else MEMORY_SEQ_LEN
    sizes = tokens or (QUICK_MEMORY_TOKENS if quick else MEMORY_TOKENS)
    base = dataclasses.replace(CASES[name], seq_len=seq_len, train_steps=1, eval_steps=0)
    return [base.with_tokens(t) for t in sizes]
