"""Base config: every field of a jaxlens training run, defaulted to tuned-lens's recipe.

Run (the full recipe: 250 steps x 2^18 tokens; wants an accelerator):
  python -m jaxlens.train --config=configs/base.py --workdir=/tmp/jaxlens/base \
      --config.model.source=gpt2

Other config files import this one and override a few fields; any field can also be overridden
on the command line, e.g. `--config.num_steps=100`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.source = "embedded:smollm2"  # HF dir, .gguf file, hub id, or "embedded:smollm2"
    c.model.revision = ""  # hub revision ("" = default branch)
    c.model.dtype = "float32"  # model and unembedding dtype: float32 or bfloat16

    c.data = ml_collections.ConfigDict()
    c.data.source = "shakespeare"  # .txt file/dir/glob, .jsonl/.parquet, or a hub dataset name
    c.data.text_field = "text"  # the document field of jsonl/parquet/hub data
    c.data.split = "train"  # hub dataset split
    c.data.hub_config = ""  # hub dataset configuration name ("" = none), e.g. "sample-10BT"
    c.data.max_documents = 0  # 0 = all (hub data: how many streamed documents to take)
    c.data.seq_len = 2048  # tokens per sequence (tuned-lens: 2048, capped by the model)
    c.data.heldout_sequences = 16  # sequences set aside for evaluation, never trained on
    c.data.allow_repeat = False  # allow more than one pass over the training split

    c.seed = 42  # data shuffling seed

    c.num_steps = 250  # optimizer steps (tuned-lens: 250)
    c.tokens_per_step = 2**18  # tokens per optimizer step (tuned-lens: 2^18)
    c.micro_batches = 1  # gradient-accumulation micro-batches per step (inside one jit)
    c.chunk_tokens = 2048  # tokens per loss chunk: [chunk, vocab] is the largest lens array
    # Both lenses decode an evaluation chunk in one [2 * chunk, vocab] matmul, and the CPU backend
    # packs the unembedding once per matmul: taller ones are faster (SmolLM2: 36.1 tok/s at 256
    # tokens, 37.7 at 512 and at 1024).
    c.eval_chunk_tokens = 512  # tokens per evaluation chunk

    c.loss = "kl"  # "kl": KL(model output || lens), or "ce": next-token cross-entropy
    c.token_shift = -1  # -1 = the loss's default (kl: 0, ce: 1)

    c.optimizer = "sgd"  # "sgd" (Nesterov) or "adam" (AMSGrad, with real warmup)
    c.lr_scale = 1.0  # lr = lr_scale * (1 - momentum) for SGD (undoes momentum's 1/(1-m) gain)
    c.momentum = 0.9  # SGD momentum / Adam beta1
    c.weight_decay = 1e-3  # coupled decay: pulls translators towards the identity
    c.clip_norm = 1.0  # global gradient-norm clip (0 = off)
    c.warmup_steps = -1  # -1 = default (sgd 0, adam min(1000, num_steps // 5)); then linear decay

    c.bias = True  # translators have a bias
    c.bias_only = False  # train only the biases
    c.init_lens = ""  # warm start: a tuned-lens directory or jaxlens workdir seeds the lens

    c.init = ml_collections.ConfigDict()
    c.init.method = "zeros"  # "zeros": tuned-lens's start; "least_squares": closed-form fit first
    c.init.tokens = 16384  # least_squares: training tokens the fit reads (the stream's first)
    c.init.ridge = 1e-3  # least_squares: ridge strength, relative to the mean eigenvalue of X^T X

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # devices on the data axis (-1 = all that remain)
    c.mesh.model = 1  # devices on the model axis (shards the translator bank's output dim)
    c.mesh.shard_model_params = False  # also split the frozen model's weights over "model"
    c.distributed = False  # call jax.distributed.initialize() (multi-host TPU VM / GPU cluster)
    # Only where the cluster is not detected (TPU VMs and SLURM are):
    c.coordinator_address = ""  # host:port of process 0
    c.num_processes = 0  # number of processes (0 = detect)
    c.process_id = -1  # this process's index (-1 = detect)

    c.checkpoint_every = 50  # steps between Orbax checkpoints (the last step is always saved)
    c.keep_checkpoints = 3  # how many checkpoints to keep
    c.log_every = 10  # steps between metric fetches (metrics.jsonl, progress line, NaN check)
    c.tensorboard = False  # also write TensorBoard scalars to workdir/tensorboard (tensorboardX)

    c.eval_batch_size = 4  # held-out sequences per evaluation batch
    return c
