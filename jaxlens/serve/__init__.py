"""The lens explorer: a local web page showing what every layer of a model predicts for a text.

`python -m jaxlens.serve` (or `jaxlens-serve`, `make serve`) starts it. Its parts, one idea each:
`cells` computes every (layer, position) cell of a heat map in one jitted call, `explorer` turns
text and choices into JSON-ready views (sequence-length buckets, a cache of recent texts),
`server` answers HTTP with the page's files and a JSON endpoint, `page` puts the same view into a
notebook cell, `command` is the entry point. `static/` holds the page: plain HTML, CSS and
JavaScript shipped with the package, no build step and nothing fetched from elsewhere.
"""
