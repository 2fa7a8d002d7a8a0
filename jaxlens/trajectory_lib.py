"""Prediction trajectories: what a lens predicts at every layer and position of one prompt.

`PredictionTrajectory.from_lens` runs the model once on a prompt and decodes every layer's residual
stream with a lens, keeping the log-probabilities `[L + 1, T, V]` (rows 0..L-1 from the lens, row L
the model's own output, as tuned-lens does). Its methods turn them into per-layer, per-position
statistics (`TrajectoryStatistic`, values `[L + 1, T]`): entropy, next-token cross-entropy, KL from
the model's output, rank of the target, maximum probability, log-probability differences, and
comparisons with a second trajectory. Statistics are computed in float64 numpy on the host. Two of
the comparisons differ from tuned-lens 0.2.0 on purpose: its `js_divergence` is the symmetrised KL
(unbounded) and its `total_variation` is max|p - q|; here they are the true Jensen-Shannon
divergence (≤ ln 2) and ½Σ|p - q| (≤ 1). `plotting` draws the statistics, and
`python -m jaxlens.trajectory` is the command line.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.lens import LogitLens, TunedLens
from jaxlens.models import SubjectModel

STATISTICS = ("entropy", "cross_entropy", "forward_kl", "rank", "max_probability")


@dataclasses.dataclass(frozen=True)
class TrajectoryStatistic:
    """One number per layer and position, ready to plot.

    Attributes:
      name: what it is, e.g. "entropy" (the plot's title).
      values_lt: `[L + 1, T]` float64; NaN where undefined (no target at the last position).
      units: for the colour bar, e.g. "nats".
      labels: `[L + 1, T]` cell texts to show instead of the top-1 tokens, or None.
      min, max: the colour scale's ends (None: the values' own range).
      log_scale: colour on a logarithmic scale (ranks span 0 .. V - 1).
    """

    name: str
    values_lt: np.ndarray
    units: str = ""
    labels: np.ndarray | None = None
    min: float | None = None
    max: float | None = None
    log_scale: bool = False


@functools.partial(jax.jit, static_argnums=0)
def _lens_logits(apply, lens, params, ids_bt):
    # One compiled call: the model forward, every layer's lens logits, the model's own logits.
    out = apply(params, ids_bt)
    lens_ltv = lens.all_logits(out.hidden_lbtd[:-1, 0])
    return jnp.concatenate([lens_ltv, out.logits_btv.astype(lens_ltv.dtype)])


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _weighted_log_ratio(p, log_a, log_b):
    """Σ_v p (log a - log b), with 0 · log 0 taken as 0 (so -inf log-probabilities are fine)."""
    return np.where(p > 0, p * (log_a - log_b), 0.0).sum(-1)


@dataclasses.dataclass(frozen=True, eq=False)
class PredictionTrajectory:
    """A lens's next-token predictions at every layer and position of one sequence.

    Attributes:
      log_probs_ltv: `[L + 1, T, V]` float32; row l < L is layer l's lens, row L the model output.
      input_ids_t: `[T]` the input token ids.
      targets_t: `[T]` the token each position should predict (default: the next input token);
        -1 where there is none (the last position).
      tokens: the T input tokens as text (token ids as text when there is no tokenizer).
      layer_names: L + 1 row names: "0" (the embeddings) .. "L-1", then "output".
      tokenizer: decodes predicted token ids for labels; None shows ids.
    """

    log_probs_ltv: np.ndarray
    input_ids_t: np.ndarray
    targets_t: np.ndarray
    tokens: list[str]
    layer_names: list[str]
    tokenizer: object = dataclasses.field(default=None, repr=False)

    def __post_init__(self):
        rows, num_tokens, _ = self.log_probs_ltv.shape
        shapes = (self.input_ids_t.shape, self.targets_t.shape, (len(self.tokens),))
        if any(shape != (num_tokens,) for shape in shapes) or len(self.layer_names) != rows:
            raise ValueError(
                f"Inconsistent trajectory: log_probs_ltv {self.log_probs_ltv.shape} needs "
                f"input_ids_t, targets_t and tokens of length {num_tokens} and {rows} layer "
                f"names; got {shapes} and {len(self.layer_names)}."
            )

    @classmethod
    def from_lens(
        cls, lens: LogitLens, model: SubjectModel, prompt_or_ids, *, targets=None
    ) -> PredictionTrajectory:
        """Runs `model` on one prompt and decodes every layer with `lens`.

        Args:
          lens: a `LogitLens` or `TunedLens` made for `model`.
          model: the subject model.
          prompt_or_ids: text (tokenized with the model's tokenizer) or token ids `[T]`/`[1, T]`.
          targets: `[T]` token ids to score against (-1: none); default the next input tokens.
        Returns:
          the trajectory (`[L + 1, T, V]` log-probabilities on the host).
        """
        if isinstance(prompt_or_ids, str):
            ids_bt = model.tokenize(prompt_or_ids) if prompt_or_ids else np.zeros((1, 0), int)
        else:
            ids_bt = np.asarray(prompt_or_ids)
        if ids_bt.size == 0:
            raise ValueError("The prompt has no tokens; give a non-empty prompt.")
        ids_bt = model.check_input_ids(ids_bt)
        if ids_bt.shape[0] != 1:
            raise ValueError(f"Expected one sequence of token ids; got {ids_bt.shape[0]}.")
        _check_lens_fits(lens, model)
        ids_t = ids_bt[0]
        if targets is None:
            targets_t = np.append(ids_t[1:], -1)
        else:
            targets_t = _per_position(targets, len(ids_t), model.vocab_size, "targets")
        logits_ltv = np.asarray(_lens_logits(model.apply, lens, model.params, ids_bt))
        num_layers = logits_ltv.shape[0] - 1
        return cls(
            log_probs_ltv=_log_softmax(logits_ltv).astype(np.float32),
            input_ids_t=ids_t,
            targets_t=targets_t,
            tokens=_decode(model.tokenizer, ids_t).tolist(),
            layer_names=[str(layer) for layer in range(num_layers)] + ["output"],
            tokenizer=model.tokenizer,
        )

    # Statistics of one trajectory -------------------------------------------------------------

    def entropy(self) -> TrajectoryStatistic:
        """Entropy of each prediction, -Σ p log p, in nats."""
        log_p = self.log_probs64()
        return TrajectoryStatistic("entropy", -_weighted_log_ratio(np.exp(log_p), log_p, 0), "nats")

    def cross_entropy(self) -> TrajectoryStatistic:
        """-log p(target) in nats (NaN where there is no target)."""
        return TrajectoryStatistic("cross-entropy", -self._log_prob_of(self.targets_t), "nats")

    def forward_kl(self) -> TrajectoryStatistic:
        """KL(model output || prediction) in nats; 0 on the output row."""
        log_p = self.log_probs64()
        log_out = log_p[-1:]
        values = _weighted_log_ratio(np.exp(log_out), log_out, log_p)
        return TrajectoryStatistic("KL(output || layer)", values, "nats", min=0.0)

    def rank(self) -> TrajectoryStatistic:
        """How many tokens are more probable than the target (0: it is the top prediction)."""
        # Compared as stored (float32), so the target never ranks below itself by rounding.
        target_lt = _pick(self.log_probs_ltv, self.targets_t)
        above = (self.log_probs_ltv > target_lt[..., None]).sum(-1)
        values = np.where(self.targets_t < 0, np.nan, above.astype(np.float64))
        return TrajectoryStatistic(
            "rank of the target", values, "rank", min=0.0, max=self.vocab_size - 1, log_scale=True
        )

    def max_probability(self) -> TrajectoryStatistic:
        """The top prediction's probability."""
        values = np.exp(self.log_probs64().max(-1))
        return TrajectoryStatistic("max probability", values, "probability", min=0.0, max=1.0)

    def log_prob_diff(self, target_ids, anti_target_ids) -> TrajectoryStatistic:
        """log p(target) - log p(anti-target) in nats.

        Args:
          target_ids, anti_target_ids: one token id each, or `[T]` ids per position (-1: none).
        """
        num_tokens, vocab = self.log_probs_ltv.shape[1:]
        target = _per_position(target_ids, num_tokens, vocab, "target_ids")
        anti = _per_position(anti_target_ids, num_tokens, vocab, "anti_target_ids")
        values = self._log_prob_of(target) - self._log_prob_of(anti)
        return TrajectoryStatistic("log p(target) - log p(anti-target)", values, "nats")

    def top_k(self, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """The k most probable tokens, best first: ids and probabilities `[L + 1, T, k]`."""
        if not 1 <= k <= self.vocab_size:
            raise ValueError(f"k must be in [1, {self.vocab_size}]; got {k}.")
        ids = np.argpartition(-self.log_probs_ltv, k - 1, axis=-1)[..., :k]
        log_p = np.take_along_axis(self.log_probs64(), ids, -1)
        order = np.argsort(-log_p, axis=-1, kind="stable")
        return np.take_along_axis(ids, order, -1), np.exp(np.take_along_axis(log_p, order, -1))

    def token_strings(self, ids) -> np.ndarray:
        """Token ids of any shape decoded one by one (ids as text without a tokenizer)."""
        return _decode(self.tokenizer, ids)

    # Comparisons with another trajectory of the same tokens -----------------------------------

    def kl_divergence(self, other: PredictionTrajectory) -> TrajectoryStatistic:
        """KL(self || other) in nats, labelled with the token whose probability moved most."""
        log_p, log_q, p, q = self._pair(other)
        values = _weighted_log_ratio(p, log_p, log_q)
        return TrajectoryStatistic("KL(self || other)", values, "nats", self._moved(p, q), min=0.0)

    def js_divergence(self, other: PredictionTrajectory) -> TrajectoryStatistic:
        """Jensen-Shannon divergence ½KL(p || m) + ½KL(q || m), m = (p + q)/2; in [0, ln 2]."""
        log_p, log_q, p, q = self._pair(other)
        log_m = np.logaddexp(log_p, log_q) - math.log(2)
        values = 0.5 * (_weighted_log_ratio(p, log_p, log_m) + _weighted_log_ratio(q, log_q, log_m))
        return TrajectoryStatistic(
            "JS(self, other)", values, "nats", self._moved(p, q), min=0.0, max=math.log(2)
        )

    def total_variation(self, other: PredictionTrajectory) -> TrajectoryStatistic:
        """Total variation distance ½Σ|p - q|, in [0, 1]."""
        _, _, p, q = self._pair(other)
        values = 0.5 * np.abs(p - q).sum(-1)
        return TrajectoryStatistic(
            "TV(self, other)", values, "probability", self._moved(p, q), min=0.0, max=1.0
        )

    # Helpers ------------------------------------------------------------------------------------

    def log_probs64(self) -> np.ndarray:
        """`[L + 1, T, V]` float64 log-probabilities, renormalised.

        Rounding to float32 leaves Σp off 1 by ~1e-8: enough to push a Jensen-Shannon
        divergence of disjoint distributions past ln 2. Statistics use these instead.
        """
        return _log_softmax(self.log_probs_ltv)

    @property
    def vocab_size(self) -> int:
        return self.log_probs_ltv.shape[-1]

    def _log_prob_of(self, ids_t: np.ndarray) -> np.ndarray:
        """log p(ids_t[t]) at every layer `[L + 1, T]`, NaN where ids_t is -1."""
        return np.where(ids_t < 0, np.nan, _pick(self.log_probs64(), ids_t))

    def _pair(self, other: PredictionTrajectory):
        if self.log_probs_ltv.shape != other.log_probs_ltv.shape or not np.array_equal(
            self.input_ids_t, other.input_ids_t
        ):
            raise ValueError(
                "Compare trajectories of the same tokens and model: got log-probabilities "
                f"{self.log_probs_ltv.shape} vs {other.log_probs_ltv.shape}."
            )
        log_p, log_q = self.log_probs64(), other.log_probs64()
        return log_p, log_q, np.exp(log_p), np.exp(log_q)

    def _moved(self, p, q) -> np.ndarray:
        return self.token_strings(np.abs(p - q).argmax(-1))


def _pick(values_ltv: np.ndarray, ids_t: np.ndarray) -> np.ndarray:
    """`values_ltv[l, t, ids_t[t]]` for every l and t, `[L + 1, T]` (id -1 picks id 0)."""
    index = np.broadcast_to(np.maximum(ids_t, 0)[None, :, None], values_ltv.shape[:2] + (1,))
    return np.take_along_axis(values_ltv, index, -1)[..., 0]


def _per_position(ids, num_tokens: int, vocab_size: int, what: str) -> np.ndarray:
    """One id, or `[T]` ids, as int64 `[T]` checked to lie in [-1, V)."""
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{what} must be integer token ids; got dtype {ids.dtype}.")
    if ids.ndim == 0:
        ids = np.full(num_tokens, ids)
    if ids.shape != (num_tokens,):
        raise ValueError(f"{what} must be one id or {num_tokens} ids; got shape {ids.shape}.")
    bad = ids[(ids < -1) | (ids >= vocab_size)]
    if bad.size:
        raise ValueError(f"{what} must lie in [0, {vocab_size}) (or -1 for none); found {bad[0]}.")
    return ids.astype(np.int64)


def _decode(tokenizer, ids) -> np.ndarray:
    ids = np.asarray(ids)
    unique, inverse = np.unique(ids, return_inverse=True)  # decode each distinct id once
    texts = [str(i) if tokenizer is None else tokenizer.decode([int(i)]) for i in unique]
    return np.array(texts, dtype=object)[inverse].reshape(ids.shape)


def _check_lens_fits(lens: LogitLens, model: SubjectModel) -> None:
    layers = lens.num_layers if isinstance(lens, TunedLens) else model.num_layers
    found = (layers, lens.decoder.d_model, lens.decoder.vocab_size)
    if found != (model.num_layers, model.d_model, model.vocab_size):
        raise ValueError(
            f"The lens (layers, width, vocabulary = {found}) was not made for {model!r}; "
            "use a lens for this model."
        )
