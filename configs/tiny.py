"""A tiny run for tests and smoke checks: a few steps of short sequences.

Run (with any small local model directory that has a tokenizer):
  python -m jaxlens.train --config=configs/tiny.py --workdir=/tmp/jaxlens/tiny \
      --config.model.source=/path/to/tiny-model
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model.source = ""  # set to a small model directory
    c.data.source = "shakespeare"
    c.data.seq_len = 32
    c.data.heldout_sequences = 8
    c.num_steps = 6
    c.tokens_per_step = 128
    c.chunk_tokens = 64
    c.checkpoint_every = 2
    c.log_every = 1
    c.eval_batch_size = 4
    return c
