"""tuned-lens's side: its training loop and evaluation loop, as tuned-lens 0.2.0 runs them.

The lens, the optimizer and the schedule are tuned-lens's own objects (`TunedLens.from_model`,
`ingredients.Optimizer().create_optim / create_scheduler`, defaults: SGD Nesterov, lr 0.1, weight
decay 1e-3, linear decay). The loop bodies reproduce `scripts/train_loop.py`'s `Train.execute`
and `scripts/eval_loop.py`'s `Eval` operation for operation, because those methods also load
datasets and write files:

  train: frozen forward under `no_grad`; target `final_logits.float().log_softmax(-1)`; then, one
    layer at a time under `torch.autocast(device, bfloat16)`, the lens logits, the KL loss, the
    loss fetched to the host (`.item()`, as it logs it) and one `backward()` per layer; after the
    micro-batches of the step, `clip_grad_norm_(1.0)`, `opt.step()`, `zero_grad`,
    `scheduler.step()`.
  eval: forward; final log-probabilities; for each layer, logit lens then tuned lens:
    log-probabilities, next-token cross-entropy, entropy, KL; the baseline; means per batch.

"tuned-lens-f32" is the same loop with the autocast disabled (the only change); evaluation
autocasts only on CUDA, so on a CPU it is float32 as shipped.

Importing this module imports torch, transformers and tuned-lens; the time is `IMPORT_S`.
"""

from __future__ import annotations

import os
import time

_began = time.perf_counter()

import numpy as np  # noqa: E402
import torch as th  # noqa: E402
import transformers  # noqa: E402
from tuned_lens import TunedLens  # noqa: E402
from tuned_lens.nn.lenses import LogitLens  # noqa: E402
from tuned_lens.scripts import ingredients  # noqa: E402
from tuned_lens.utils import maybe_all_reduce, pytree_map, shift_labels, shift_preds  # noqa: E402

from bench import flops  # noqa: E402
from bench.cases import SMOLLM2_SOURCE  # noqa: E402
from bench.memory import RssSampler  # noqa: E402

IMPORT_S = time.perf_counter() - _began
DEVICE = th.device("cpu")


def load_model(source: str):
    """The frozen model, loaded as tuned-lens's `ingredients.Model.load` does."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        source, device_map={"": DEVICE}, low_cpu_mem_usage=True, torch_dtype="auto"
    )
    model.eval()
    model.requires_grad_(False)
    return model


def set_translators(lens: TunedLens, kernel_ldd: np.ndarray, bias_ld: np.ndarray) -> None:
    """Loads a jaxlens bank (`h @ kernel`) into tuned-lens's Linear layers (`[out, in]`)."""
    with th.no_grad():
        for translator, kernel_dd, bias_d in zip(lens, kernel_ldd, bias_ld, strict=True):
            translator.weight.copy_(th.from_numpy(np.ascontiguousarray(kernel_dd.T)))
            translator.bias.copy_(th.from_numpy(bias_d))


class Trainer:
    """tuned-lens's training state: lens, optimizer, schedule (as `Train.setup` makes them)."""

    def __init__(self, model, num_steps: int, autocast: bool):
        self.model = model
        self.lens = TunedLens.from_model(model).to(DEVICE)
        options = ingredients.Optimizer()
        params = [p for p in self.lens.parameters() if p.requires_grad]
        self.opt = options.create_optim(params)
        self.scheduler = options.create_scheduler(self.opt, num_steps)
        self.autocast = autocast

    def step(self, micro_batches: list[th.Tensor]) -> list[float]:
        """One optimizer step over `micro_batches` (gradient accumulation); per-layer KL."""
        grad_acc_steps = len(micro_batches)
        losses = [0.0] * self.lens.config.num_hidden_layers
        for input_ids in micro_batches:
            for i, value in enumerate(self._accumulate(input_ids, grad_acc_steps)):
                losses[i] += value / grad_acc_steps
        th.nn.utils.clip_grad_norm_(self.lens.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=False)
        self.scheduler.step()
        return losses

    def _accumulate(self, input_ids: th.Tensor, grad_acc_steps: int) -> list[float]:
        # Train.execute's batch body, loss KL, token shift 0.
        with th.no_grad():
            output = self.model(input_ids=input_ids, output_hidden_states=True)
        final_logits = output.logits
        hidden_states = output.hidden_states[:-1]
        shift = 0
        labels = shift_labels(final_logits.float().log_softmax(dim=-1), shift)
        losses = []
        for i, h in enumerate(hidden_states):
            with th.autocast(DEVICE.type, dtype=th.bfloat16, enabled=self.autocast):
                logits = shift_preds(self.lens(h, idx=i), shift)
                loss = th.sum(labels.exp() * (labels - logits.log_softmax(-1)), dim=-1).mean()
                losses.append(maybe_all_reduce(loss.detach()).item())
                scaled_loss = loss / grad_acc_steps
            scaled_loss.backward()
        return losses


@th.no_grad()
def evaluate(model, lenses: dict, input_ids: th.Tensor, token_shift: int = 1) -> dict:
    """One batch of tuned-lens's evaluation loop; per-layer means in nats."""
    output = model(input_ids=input_ids, output_hidden_states=True)
    hidden_states = output.hidden_states[:-1]
    final_lps = output.logits.log_softmax(dim=-1)
    final_probs = final_lps.exp()
    assert not th.isnan(output.logits).any(), "Logits are NaN"
    labels = shift_labels(input_ids, token_shift)
    out = {name: {"ce": {}, "entropy": {}, "kl": {}} for name in lenses}
    for j, h in enumerate(hidden_states):
        for name, lens in lenses.items():
            lens_lps = lens(h, idx=j).log_softmax(dim=-1)
            lens_probs = lens_lps.exp()
            out[name]["ce"][j] = th.nn.functional.cross_entropy(
                shift_preds(lens_lps, token_shift).flatten(0, 1), labels.flatten(), reduction="none"
            )
            out[name]["entropy"][j] = th.sum(-lens_probs * lens_lps, dim=-1)
            out[name]["kl"][j] = th.sum(final_probs * (final_lps - lens_lps), dim=-1)
    out["baseline"] = {
        "ce": th.nn.functional.cross_entropy(
            shift_preds(final_lps, token_shift).flatten(0, 1), labels.flatten(), reduction="none"
        ),
        "entropy": th.sum(-final_probs * final_lps, dim=-1),
    }
    return pytree_map(th.mean, out)


def _micro_batches(ids_bt: np.ndarray, rows: int) -> list[th.Tensor]:
    """tuned-lens's dataloader batches: `rows` sequences each (`--per_gpu_batch_size`)."""
    ids = th.from_numpy(ids_bt.astype(np.int64))
    return list(ids.split(rows))


def throughput(spec: dict) -> dict:
    """Times the first and the steady-state training steps, then evaluation steps."""
    case, impl = spec["case"], spec["impl"]
    began = time.perf_counter()
    model = load_model(spec["model"])
    result = {"import_s": IMPORT_S, "load_s": time.perf_counter() - began, "compile_s": 0.0}
    result["facts"] = flops.model_facts(model.config, case["seq_len"])
    trainer = Trainer(model, spec["num_steps"], impl["autocast"])
    rows = spec.get("tl_batch") or case["batch"]
    steps = [_micro_batches(ids, rows) for ids in np.load(spec["batches"])]
    with RssSampler() as rss:
        began = time.perf_counter()
        losses = trainer.step(steps[0])
        result["first_step_s"] = time.perf_counter() - began
        began = time.perf_counter()
        for i in range(1, case["train_steps"] + 1):
            losses = trainer.step(steps[i % len(steps)])
        result["train_loop_s"] = time.perf_counter() - began
    result["train_rss"] = rss.to_dict()
    result["train_loss_l"] = losses
    if case["eval_steps"] and not impl["autocast"]:
        result.update(_time_eval(model, trainer.lens, steps, case["eval_steps"]))
    return result


def train_snapshots(spec: dict) -> dict:
    """tuned-lens's loop from zero translators over `spec["batches"]` `[steps, batch, seq_len]`,
    one optimizer step per batch; the cumulative training wall time after every step, and the
    translators (in jaxlens's `h @ kernel` layout) at the steps in `spec["snapshots"]`, saved to
    `spec["snapshot_file"]`. Copying a snapshot out is not counted as training time."""
    began = time.perf_counter()
    model = load_model(spec["model"])
    result = {"import_s": IMPORT_S, "load_s": time.perf_counter() - began}
    batches = np.load(spec["batches"])
    trainer = Trainer(model, len(batches), spec["autocast"])
    wall, elapsed, saved, losses = [], 0.0, {}, []
    for step, ids_bt in enumerate(batches, start=1):
        began = time.perf_counter()
        losses.append(trainer.step(_micro_batches(ids_bt, len(ids_bt))))
        elapsed += time.perf_counter() - began
        wall.append(elapsed)
        if step in spec["snapshots"]:
            with th.no_grad():
                saved[f"kernel_ldd_{step}"] = np.stack([t.weight.T.numpy() for t in trainer.lens])
                saved[f"bias_ld_{step}"] = np.stack([t.bias.numpy() for t in trainer.lens])
    np.savez(spec["snapshot_file"], **saved)
    result.update(wall_s_by_step=wall, train_loss_sl=losses)
    return result


def _time_eval(model, lens, steps, count: int) -> dict:
    lenses = {"logit": LogitLens.from_model(model).to(DEVICE), "tuned": lens}
    for each in lenses.values():
        each.eval()
    out = {"eval_compile_s": 0.0}
    with RssSampler() as rss:
        began = time.perf_counter()  # timed apart, as on jaxlens's side
        evaluate(model, lenses, th.cat(steps[0]))
        out["eval_first_step_s"] = time.perf_counter() - began
        began = time.perf_counter()
        for i in range(count):
            evaluate(model, lenses, th.cat(steps[i % len(steps)]))
        out["eval_loop_s"] = time.perf_counter() - began
    out["eval_rss"] = rss.to_dict()
    return out


def parity(spec: dict) -> dict:
    """As `jax_side.parity`: evaluation from the given translators, then two training steps."""
    impl = spec["impl"]
    model = load_model(spec["model"])
    bank = np.load(spec["translators"])
    trainer = Trainer(model, spec["num_steps"], impl["autocast"])
    set_translators(trainer.lens, bank["kernel_ldd"], bank["bias_ld"])
    batches = np.load(spec["batches"])
    lenses = {"logit": LogitLens.from_model(model), "tuned": trainer.lens}
    means = evaluate(model, lenses, th.from_numpy(batches[0].astype(np.int64)))
    result = {"eval": _eval_tree(means), "facts": flops.model_facts(model.config, 0)}
    rows = spec.get("tl_batch") or len(batches[0])
    result["train_loss_sl"] = [trainer.step(_micro_batches(ids, rows)) for ids in batches]
    return result


def _eval_tree(means: dict) -> dict:
    tree = {
        lens: {m: [float(means[lens][m][j]) for j in sorted(means[lens][m])] for m in means[lens]}
        for lens in ("logit", "tuned")
    }
    tree["baseline"] = {m: float(v) for m, v in means["baseline"].items()}
    return tree


def save_model(case: dict, directory: str, seed: int) -> None:
    """Saves the case's model as a float32 safetensors directory for `load_model`.

    A random GPT-2 of the case's shape, or SmolLM2 read once from the cached GGUF file by
    transformers' GGUF loader (reading the GGUF takes 17 s, the saved copy under a second).
    """
    if case["source"] == SMOLLM2_SOURCE:
        from jaxlens import assets  # standard library only: finds the cached GGUF file

        path = assets.smollm2_gguf_path()
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, torch_dtype=th.float32
        )
    else:
        config = transformers.GPT2Config(
            vocab_size=case["vocab_size"],
            n_embd=case["n_embd"],
            n_layer=case["n_layer"],
            n_head=case["n_head"],
        )
        th.manual_seed(seed)
        model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(directory, safe_serialization=True)


def environment() -> dict:
    """What this side's speed depends on."""
    return {
        "torch_num_threads": th.get_num_threads(),
        "torch_num_interop_threads": th.get_num_interop_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", ""),
        "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS", ""),
        "mkldnn": th.backends.mkldnn.is_available(),
        "cpu_capability": th.backends.cpu.get_cpu_capability(),
    }
