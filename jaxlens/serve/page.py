"""The explorer page's files, shipped inside the package, and the same heat map for a notebook.

`static/` holds the page (index.html, app.js, style.css) and the heat map itself (heatmap.js,
heatmap.css), plain files with no build step. The server sends them as they are; `view_html`
inlines the heat map's script and style with one view's data, so a notebook output cell draws
exactly what the page draws, offline.
"""

from __future__ import annotations

import importlib.resources
import json
import uuid

STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "heatmap.js": "text/javascript; charset=utf-8",
    "heatmap.css": "text/css; charset=utf-8",
}


def static_file(name: str) -> bytes:
    """One of the page's files, read from the installed package."""
    if name not in STATIC_FILES:
        raise ValueError(f"{name!r} is not one of the page's files: {sorted(STATIC_FILES)}.")
    return (importlib.resources.files("jaxlens.serve") / "static" / name).read_bytes()


def view_html(view: dict) -> str:
    """One view (`Explorer.view(...)`) as self-contained HTML: the heat map with hover, for a
    notebook output cell (`IPython.display.HTML(view_html(view))`)."""
    element = f"jaxlens-{uuid.uuid4().hex[:12]}"
    # "</" inside the data would end the script element early.
    data = json.dumps(view, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    style = static_file("heatmap.css").decode()
    script = static_file("heatmap.js").decode()
    return (
        f'<div id="{element}"></div>\n<style>{style}</style>\n<script>{script}\n'
        f'jaxlensHeatmap.render(document.getElementById("{element}"), {data});\n</script>'
    )
