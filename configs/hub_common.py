"""Shared settings of the hub configs: web text streamed from the hub, accelerator-sized steps.

Not a run config itself; `gpt2.py`, `pythia.py`, `llama.py`, `mistral.py`, `gemma.py`, `qwen.py`,
`gemma2.py`, `gemma3.py`, `olmo2.py` and `phi3.py` build on it.
"""

from configs import base


def get_config():
    c = base.get_config()
    # FineWeb's 10B-token sample, streamed; 250 steps x 2^18 tokens need ~66M tokens of text.
    c.data.source = "HuggingFaceFW/fineweb"
    c.data.hub_config = "sample-10BT"
    c.data.max_documents = 120_000
    c.data.heldout_sequences = 64
    c.model.dtype = "bfloat16"  # model and unembedding in bfloat16, translators float32
    # 128 sequences of 2,048 tokens per step. On 8 data chips (v5e-8, v6e-8) 16 micro-batches make
    # one sequence a chip a micro-batch. micro_batches x data chips must divide 128: on 32 data
    # chips (v5e-32, v4-64) add --config.micro_batches=4, on 64 --config.micro_batches=2.
    c.micro_batches = 16
    c.chunk_tokens = 4096
    c.eval_batch_size = 8
    # Mesh presets. One GPU or one TPU host: the defaults (all devices on "data"); each config
    # names the slice it is sized for in TOPOLOGY.
    # TPU VM slice (same command on every worker): add --config.distributed=True.
    # A model too wide for one chip's bank: --config.mesh.model=2 (or more).
    return c
