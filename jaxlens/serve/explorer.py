"""What the explorer page shows, computed from text: the views that its JSON endpoint returns.

`Explorer` holds a model, its logit lens and (optionally) a tuned lens, and answers
`view(text, lens=..., statistic=..., layers=...)` with a JSON-ready dict: the heat map's values
(layers by positions, the model's output as the last row), the top token of every cell and the
top-k tokens with their probabilities for hovering. `lens` is "logit", "tuned" or "difference"
(the tuned lens's statistic minus the logit lens's). Every cell comes from `cells.lens_cells`,
one compiled program per bucket of sequence lengths (powers of two from `SMALLEST_BUCKET` up to
the token limit), so a new text of a known bucket costs one call and no compilation. The cells of
the last few texts are kept, so switching the statistic, lens or layer range of a text already
seen costs no model call. Bad input raises ValueError with a message meant for the page.
"""

from __future__ import annotations

import collections
import math
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.lens import TunedLens
from jaxlens.models import SubjectModel
from jaxlens.serve.cells import Cells, lens_cells
from jaxlens.trajectory_lib import STATISTICS

LENSES = ("logit", "tuned", "difference")
DEFAULT_TEXT = "To be, or not to be, that is the question:"  # the page's first text
SMALLEST_BUCKET = 16
# statistic -> (title, units, fixed colour range or None, logarithmic colours)
_SHOWN = {
    "entropy": ("entropy", "nats", None, False),
    "cross_entropy": ("cross-entropy of the next token", "nats", None, False),
    "forward_kl": ("KL(output || layer)", "nats", None, False),
    "rank": ("rank of the next token", "rank", None, True),
    "max_probability": ("top probability", "probability", (0.0, 1.0), False),
}
assert tuple(_SHOWN) == STATISTICS


def bucket_length(num_tokens: int, limit: int) -> int:
    """The padded length a text of `num_tokens` runs at: the next power of two, at least
    `SMALLEST_BUCKET`, at most `limit` (texts longer than `limit` are refused before this)."""
    return min(max(SMALLEST_BUCKET, 1 << max(num_tokens - 1, 0).bit_length()), limit)


class Explorer:
    """The explorer's computation for one model and its lenses.

    Args:
      model: the subject model (with a tokenizer).
      tuned_lens: a `TunedLens` for the model, or None (then only the logit lens is offered).
      top_k: top tokens per cell shown on hover.
      max_tokens: the longest text accepted, in tokens (also capped by the model's positions).
      unembed_dtype: dtype of the unembedding matmul (float32 accumulation either way);
        bfloat16 is about 1.7x as fast on CPUs with bfloat16 matrix units.
      cache_size: how many (text, lens) results to keep.
    """

    def __init__(
        self,
        model: SubjectModel,
        tuned_lens: TunedLens | None = None,
        *,
        top_k: int = 5,
        max_tokens: int = 1024,
        unembed_dtype=jnp.float32,
        cache_size: int = 32,
    ):
        if model.tokenizer is None:
            raise ValueError("The explorer needs a model with a tokenizer.")
        if not 1 <= top_k <= model.vocab_size:
            raise ValueError(f"top_k must be in [1, {model.vocab_size}]; got {top_k}.")
        self.model = model
        self.top_k = top_k
        positions = model.max_positions
        self.token_limit = max_tokens if positions is None else min(max_tokens, positions)
        self.limit_reason = (
            f"the model's {positions} positions"
            if positions is not None and positions <= max_tokens
            else f"--max_tokens={max_tokens}"
        )
        decoder = model.decoder()
        decoder = decoder.replace(unembed_vd=decoder.unembed_vd.astype(unembed_dtype))
        bias = tuned_lens is None or tuned_lens.translators.bias_ld is not None
        # Zero translators are the logit lens; with the tuned lens's structure, one program serves
        # both lenses.
        self._lenses = {"logit": TunedLens.untrained(decoder, model.num_layers, bias=bias)}
        if tuned_lens is not None:
            self._lenses["tuned"] = TunedLens(decoder=decoder, translators=tuned_lens.translators)
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._cache_size = cache_size
        self._strings: dict[int, str] = {}
        self._lock = threading.Lock()  # one computation at a time; the cache is shared

    @property
    def lenses(self) -> tuple[str, ...]:
        """The lens choices on offer: the logit lens, and the tuned lens and difference if any."""
        return LENSES if "tuned" in self._lenses else ("logit",)

    def info(self) -> dict:
        """What the page needs before the first view: the model, the choices, the limits."""
        return {
            "model": self.model.name_or_path or "model",
            "num_layers": self.model.num_layers,
            "lenses": list(self.lenses),
            "statistics": [
                {"name": s, "title": _SHOWN[s][0], "units": _SHOWN[s][1]} for s in _SHOWN
            ],
            "token_limit": self.token_limit,
            "top_k": self.top_k,
            "default_text": DEFAULT_TEXT,
        }

    def view(
        self,
        text: str,
        *,
        lens: str = "logit",
        statistic: str = "entropy",
        layers: tuple[int, int] | None = None,
    ) -> dict:
        """The heat map of `text`: one statistic of one lens over a range of layers.

        Args:
          text: the text to look at (tokenized without special tokens).
          lens: one of `lenses`.
          statistic: one of `trajectory_lib.STATISTICS`.
          layers: `(first, last)` layers to show, inclusive (default: all); the output row is
            always shown.
        Returns:
          a JSON-ready dict; rows are `layer_names` (the chosen layers, then "output"), columns
          the text's tokens; NaN values (no next token at the last position) are None.
        """
        start = time.perf_counter()
        first, last = self._check_choices(lens, statistic, layers)
        ids_t = self._token_ids(text)
        rows = list(range(first, last + 1)) + [self.model.num_layers]
        shown = ["tuned", "logit"] if lens == "difference" else [lens]
        cells = {kind: self._cells(ids_t, kind) for kind in shown}
        values = _statistic(cells[shown[0]], statistic)[rows]
        if lens == "difference":
            values = values - _statistic(cells["logit"], statistic)[rows]
        title, units, fixed, log_scale = _SHOWN[statistic]
        top_k = {
            kind: {
                "ids": c.top_ids_ltk[rows].tolist(),
                "probs": np.round(c.top_probs_ltk[rows], 4).tolist(),
            }
            for kind, c in cells.items()
        }
        used = np.unique(np.concatenate([c.top_ids_ltk[rows].ravel() for c in cells.values()]))
        return {
            "model": self.model.name_or_path or "model",
            "lens": lens,
            "statistic": statistic,
            "title": ("tuned − logit: " if lens == "difference" else "") + title,
            "units": units,
            "scale": _scale(values, fixed, log_scale, diverging=lens == "difference"),
            "tokens": [self._string(i) for i in ids_t],
            "layer_names": [str(r) for r in rows[:-1]] + ["output"],
            "values": _json_values(values),
            "top_tokens": [
                [self._string(i) for i in row] for row in cells[shown[0]].top_ids_ltk[rows, :, 0]
            ],
            "top_k": top_k,
            "strings": {str(i): self._string(i) for i in used.tolist()},
            "num_tokens": len(ids_t),
            "bucket": bucket_length(len(ids_t), self.token_limit),
            "elapsed_ms": round(1000 * (time.perf_counter() - start), 1),
        }

    # Input checks -----------------------------------------------------------------------------

    def _check_choices(self, lens, statistic, layers) -> tuple[int, int]:
        if lens not in self.lenses:
            extra = "" if "tuned" in self._lenses else " (no tuned lens loaded: start with --lens)"
            raise ValueError(f"Unknown lens {lens!r}; choose one of {list(self.lenses)}{extra}.")
        if statistic not in _SHOWN:
            raise ValueError(f"Unknown statistic {statistic!r}; choose one of {list(_SHOWN)}.")
        top = self.model.num_layers - 1
        first, last = (0, top) if layers is None else layers
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (first, last)) or not (
            0 <= first <= last <= top
        ):
            raise ValueError(
                f"layers must be two whole numbers 0 <= first <= last <= {top}; got {layers}."
            )
        return first, last

    def _token_ids(self, text) -> np.ndarray:
        if not isinstance(text, str) or not text.strip():
            raise ValueError("The text is empty; type some text to look at.")
        ids_t = self.model.tokenize(text)[0]
        if len(ids_t) > self.token_limit:
            raise ValueError(
                f"The text is {len(ids_t)} tokens long; at most {self.token_limit} fit "
                f"({self.limit_reason}). Shorten the text."
            )
        return ids_t

    # Cells and strings ------------------------------------------------------------------------

    def _cells(self, ids_t: np.ndarray, kind: str) -> Cells:
        """The cells of the real tokens (host numpy), from the cache or one compiled call."""
        key = (ids_t.tobytes(), kind)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            num_tokens = len(ids_t)
            padded_bt = np.zeros((1, bucket_length(num_tokens, self.token_limit)), np.int32)
            padded_bt[0, :num_tokens] = ids_t  # causal: the padding after them changes nothing
            out = lens_cells(
                self.model.apply, self.model.params, self._lenses[kind], padded_bt, k=self.top_k
            )
            host = Cells(*(np.asarray(a)[:, :num_tokens] for a in jax.device_get(out)))
            # The last position has no next token: no cross-entropy, no rank.
            ce, rank = host.cross_entropy_lt.astype(np.float64), host.rank_lt.astype(np.float64)
            ce[:, -1] = rank[:, -1] = np.nan
            host = host._replace(cross_entropy_lt=ce, rank_lt=rank)
            self._cache[key] = host
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return host

    def _string(self, token_id) -> str:
        token_id = int(token_id)
        if token_id not in self._strings:
            self._strings[token_id] = self.model.tokenizer.decode([token_id])
        return self._strings[token_id]


def _statistic(cells: Cells, statistic: str) -> np.ndarray:
    return np.asarray(getattr(cells, f"{statistic}_lt"), np.float64)


def _scale(values: np.ndarray, fixed, log_scale: bool, *, diverging: bool) -> dict:
    finite = values[np.isfinite(values)]
    if diverging:
        reach = float(np.abs(finite).max()) if finite.size else 1.0
        low, high = -(reach or 1.0), reach or 1.0
    elif fixed is not None:
        low, high = fixed
    else:
        low = float(finite.min()) if finite.size else 0.0
        high = float(finite.max()) if finite.size else 1.0
    return {"min": low, "max": high, "log": log_scale and not diverging, "diverging": diverging}


def _json_values(values: np.ndarray) -> list:
    rounded = np.round(values, 4)
    return [[None if math.isnan(x) else x for x in row] for row in rounded.tolist()]
