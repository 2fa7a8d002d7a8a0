"""Pictures of prediction trajectories and of lens evaluations.

`heatmap_png` draws a `TrajectoryStatistic` as a layer x position grid with matplotlib, the input
embeddings (layer 0) at the bottom and the model's output on top, as tuned-lens's plots do, and
writes each cell's most probable token into it. `heatmap_html` draws the same with plotly, with
the top-k tokens and their probabilities on hover, as one HTML file that works offline (plotly.js
is embedded, about 5 MB). `metric_curves_png` draws an evaluation's per-layer curves, tuned lens
against logit lens. matplotlib and plotly are imported only when a function needs them. The
heatmap PNG's layout is fixed in pixels at `DPI`, so its size is known in advance:
`heatmap_size_px(T, rows) = (LEFT + CELL_W·T + RIGHT, TOP + CELL_H·rows + BOTTOM)`.
"""

from __future__ import annotations

import html
import warnings

import numpy as np

DPI = 100
CELL_W, CELL_H = 64, 24  # pixels per token column and per layer row: room for 8 characters
LEFT, RIGHT, TOP, BOTTOM = 90, 110, 40, 50  # margins: layer names, colour bar, title, tokens
_CBAR_GAP, _CBAR_W = 16, 14
_PANELS = (
    ("kl_nats", "KL(model || lens) [nats]"),
    ("ce_bpb", "next-token cross-entropy [bits/byte]"),
    ("entropy_bpb", "entropy of the prediction [bits/byte]"),
)


def heatmap_size_px(num_tokens: int, num_rows: int) -> tuple[int, int]:
    """`(width, height)` in pixels of `heatmap_png`'s picture of T tokens and `num_rows` rows."""
    return LEFT + CELL_W * num_tokens + RIGHT, TOP + CELL_H * num_rows + BOTTOM


def kept_rows(num_rows: int, every: int) -> list[int]:
    """Every `every`-th layer from layer 0, and always the last row (the model's output)."""
    if every < 1:
        raise ValueError(f"layers_every must be at least 1; got {every}.")
    return list(range(0, num_rows - 1, every)) + [num_rows - 1]


def display_token(text: str, max_len: int = 8) -> str:
    """A token as a cell shows it: spaces as ␣, newlines and other controls escaped, trimmed."""
    shown = text.replace(" ", "␣")
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in shown)
    if len(shown) > max_len:
        shown = shown[: max_len - 1] + "…"
    return shown or "∅"  # a token that decodes to nothing (a partial UTF-8 byte, say)


def heatmap_png(
    statistic,
    trajectory,
    path,
    *,
    top_tokens: bool = True,
    layers_every: int = 1,
    figsize: tuple[float, float] | None = None,
    title: str | None = None,
    cmap: str = "RdBu_r",
):
    """Saves a layer x token heatmap of `statistic` as a PNG.

    Args:
      statistic: a `TrajectoryStatistic` of `trajectory` (values `[L + 1, T]`).
      trajectory: the `PredictionTrajectory` it came from (tokens, layer names, top tokens).
      path: the PNG to write.
      top_tokens: write each cell's label (`statistic.labels`, else the top-1 token) into it.
      layers_every: draw layers 0, N, 2N, ... and the output row.
      figsize: inches (at `DPI`); default `heatmap_size_px(T, rows) / DPI`.
      title: default the statistic's name.
      cmap: a matplotlib colour map; undefined (NaN) cells are grey.
    Returns:
      the matplotlib Figure (cell texts in `fig.axes[0].texts`, at (position, row index)).
    """
    colors, figure = _matplotlib()
    rows = kept_rows(statistic.values_lt.shape[0], layers_every)
    values = np.ma.masked_invalid(statistic.values_lt[rows])
    num_rows, num_tokens = values.shape
    width, height = heatmap_size_px(num_tokens, num_rows)
    if figsize is not None:
        width, height = figsize[0] * DPI, figsize[1] * DPI
    # Axes placed in pixels (not tight_layout), so the picture's size never depends on its text.
    fig = figure.Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    grid_w, grid_h = width - LEFT - RIGHT, height - TOP - BOTTOM
    ax = fig.add_axes((LEFT / width, BOTTOM / height, grid_w / width, grid_h / height))
    cax = fig.add_axes(
        ((LEFT + grid_w + _CBAR_GAP) / width, BOTTOM / height, _CBAR_W / width, grid_h / height)
    )
    colormap = _colormap(cmap).with_extremes(bad="0.85")
    low, high = _colour_range(statistic)
    if statistic.log_scale:
        norm = colors.SymLogNorm(linthresh=1.0, vmin=low, vmax=high, base=10)
    else:
        norm = colors.Normalize(vmin=low, vmax=high)
    image = ax.imshow(
        values, origin="lower", aspect="auto", cmap=colormap, norm=norm, interpolation="nearest"
    )
    fig.colorbar(image, cax=cax, label=statistic.units)
    if top_tokens:
        rgb = colormap(norm(values))[..., :3]
        dark = rgb @ np.array([0.2126, 0.7152, 0.0722]) < 0.45  # white text on dark cells
        for (row, pos), label in np.ndenumerate(_cell_labels(statistic, trajectory, rows)):
            ax.text(
                pos,
                row,
                label,
                ha="center",
                va="center",
                fontsize=7.5,
                color="white" if dark[row, pos] else "black",
                parse_math=False,  # a token with two "$" must not turn into mathtext
            )
    ax.set_xticks(range(num_tokens), [_escape_dollars(display_token(t)) for t in trajectory.tokens])
    ax.set_yticks(range(num_rows), [trajectory.layer_names[r] for r in rows])
    ax.tick_params(labelsize=8)
    ax.set_xlabel("input token", fontsize=9)
    ax.set_ylabel("layer", fontsize=9)
    ax.set_title(title or statistic.name, fontsize=10)
    with warnings.catch_warnings():
        # A token in a script the font lacks (CJK, say) is drawn as a box; that is all we can do.
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(path, dpi=DPI)
    return fig


def heatmap_html(
    statistic,
    trajectory,
    path,
    *,
    top_tokens: bool = True,
    layers_every: int = 1,
    top_k: int = 5,
    title: str | None = None,
    colorscale: str = "RdBu_r",
):
    """Saves the heatmap as interactive, self-contained HTML (plotly.js embedded).

    Args: as `heatmap_png`, and `top_k`: how many tokens (with probabilities) a hover shows.
    Returns:
      the plotly Figure (cell texts in `fig.data[0].text`, `[rows, T]`, HTML-escaped).
    """
    go = _plotly()
    rows = kept_rows(statistic.values_lt.shape[0], layers_every)
    values = statistic.values_lt[rows]
    num_rows, num_tokens = values.shape
    ids, probs = trajectory.top_k(top_k)
    candidates = trajectory.token_strings(ids[rows])
    hover = np.empty(values.shape, dtype=object)
    for (row, pos), value in np.ndenumerate(values):
        name, token = trajectory.layer_names[rows[row]], trajectory.tokens[pos]
        lines = [
            f"layer {name}, position {pos} ({_html(token)})",
            f"{statistic.name}: {value:.4g} {statistic.units}",
            "",
        ] + [
            f"{p:6.1%}  {_html(t)}"
            for t, p in zip(candidates[row, pos], probs[rows[row], pos], strict=True)
        ]
        hover[row, pos] = "<br>".join(lines)
    z, low, high, units = values, *_colour_range(statistic), statistic.units
    if statistic.log_scale:  # plotly has no logarithmic colour scale: colour log10(1 + value)
        z, low, high = np.log10(1 + values), np.log10(1 + low), np.log10(1 + high)
        units = f"log10(1 + {units})"
    labels = _cell_labels(statistic, trajectory, rows) if top_tokens else None
    heatmap = go.Heatmap(
        z=z,
        x=list(range(num_tokens)),
        y=list(range(num_rows)),
        text=None if labels is None else np.vectorize(html.escape)(labels),
        texttemplate="%{text}" if top_tokens else None,
        textfont={"size": 10},
        customdata=hover,
        hovertemplate="%{customdata}<extra></extra>",
        colorscale=colorscale,
        zmin=low,
        zmax=high,
        xgap=1,
        ygap=1,
        colorbar={"title": {"text": units, "side": "right"}},
    )
    fig = go.Figure(heatmap)
    fig.update_layout(
        title={"text": html.escape(title or statistic.name), "x": 0.5},
        width=160 + 72 * num_tokens,
        height=140 + 26 * num_rows,
        hoverlabel={"font_family": "monospace"},
        xaxis={
            "title": {"text": "input token"},
            "tickvals": list(range(num_tokens)),
            "ticktext": [html.escape(display_token(t)) for t in trajectory.tokens],
        },
        yaxis={
            "title": {"text": "layer"},
            "tickvals": list(range(num_rows)),
            "ticktext": [trajectory.layer_names[r] for r in rows],
        },
    )
    fig.write_html(path, include_plotlyjs=True, full_html=True)
    return fig


def metric_curves_png(eval_result: dict, path):
    """Saves per-layer curves of the tuned and logit lens: KL, cross-entropy, entropy.

    Args:
      eval_result: the dict `jaxlens.evaluate.evaluate` returns (`"logit"` and `"tuned"` with
        `kl_nats`, `ce_bpb`, `entropy_bpb` lists of length L; `"baseline"`, the model's own
        `ce_bpb` and `entropy_bpb`, drawn as horizontal lines when present).
      path: the PNG to write.
    Returns:
      the matplotlib Figure (one axes per metric, in the order above).
    """
    missing = [
        f"{lens}/{key}"
        for lens in ("logit", "tuned")
        for key, _ in _PANELS
        if key not in eval_result.get(lens, {})
    ]
    if missing:
        raise ValueError(
            f"eval_result lacks {missing}; pass the dict that jaxlens.evaluate.evaluate returns."
        )
    _, figure = _matplotlib()
    fig = figure.Figure(figsize=(15, 3.8), dpi=120)
    shift = eval_result.get("token_shift", 1)
    for ax, (key, label) in zip(fig.subplots(1, len(_PANELS)), _PANELS, strict=True):
        if key == "ce_bpb" and shift != 1:  # `evaluate --token_shift`: not the next token
            label = f"cross-entropy to token i{shift:+d} [bits/byte]"
        for lens, style in (("logit", "o--"), ("tuned", "o-")):
            ax.plot(eval_result[lens][key], style, label=f"{lens} lens", markersize=3)
        baseline = eval_result.get("baseline", {}).get(key)
        if baseline is not None:
            ax.axhline(baseline, color="gray", lw=1, label="model output")
        ax.set_xlabel("layer")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return fig


def _cell_labels(statistic, trajectory, rows) -> np.ndarray:
    if statistic.labels is not None:
        raw = np.asarray(statistic.labels, dtype=object)[rows]
    else:
        top_ids = trajectory.top_k(1)[0][rows, :, 0]
        raw = trajectory.token_strings(top_ids)
    return np.vectorize(display_token, otypes=[object])(raw)


def _colour_range(statistic) -> tuple[float, float]:
    finite = statistic.values_lt[np.isfinite(statistic.values_lt)]
    low = statistic.min if statistic.min is not None else (finite.min() if finite.size else 0.0)
    high = statistic.max if statistic.max is not None else (finite.max() if finite.size else 1.0)
    return float(low), float(max(high, low + 1e-9))  # a constant statistic still gets a scale


def _escape_dollars(text: str) -> str:
    return text.replace("$", r"\$")  # tick labels would read "$...$" as mathtext


def _html(text: str) -> str:
    return html.escape(display_token(text, max_len=24))


def _matplotlib():
    try:
        from matplotlib import colors, figure
    except ImportError as error:
        raise ImportError("PNG pictures need matplotlib: pip install matplotlib") from error
    return colors, figure


def _colormap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def _plotly():
    try:
        import plotly.graph_objects as go
    except ImportError as error:
        raise ImportError("HTML pictures need plotly: pip install plotly") from error
    return go
