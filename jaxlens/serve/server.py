"""The explorer's HTTP side: the page's files and its JSON endpoint, on the standard library.

Routes:
  GET  /                 the page (`static/index.html`)
  GET  /static/NAME      its scripts and style sheets, shipped inside the package (no CDN)
  GET  /api/info         `Explorer.info()`: model, lenses, statistics, token limit
  POST /api/view         JSON `{"text", "lens", "statistic", "layers": [first, last]}` ->
                         `Explorer.view(...)`; bad input -> 400 `{"error": "..."}`

The server is `http.server.ThreadingHTTPServer`: nothing to install, and one process serves one
person exploring one model. The `Explorer` runs one computation at a time (the CPU has no more to
give), while the threads keep the page's files and errors answering meanwhile. Any error in a
request is answered as JSON and the server goes on serving.
"""

from __future__ import annotations

import http.server
import json

from absl import logging

from jaxlens.serve.explorer import Explorer
from jaxlens.serve.page import STATIC_FILES, static_file

MAX_REQUEST_BYTES = 1 << 20
_VIEW_FIELDS = ("text", "lens", "statistic", "layers")
# Only the page's own files may load: a page that reached for a CDN would fail visibly offline.
_CSP = "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:"


def make_server(explorer: Explorer, host: str = "127.0.0.1", port: int = 8000):
    """A `ThreadingHTTPServer` for `explorer`, bound (port 0: any free port), not yet serving.

    Returns:
      the server; `server.server_address` is where it listens, `serve_forever()` runs it.
    """
    files = {name: static_file(name) for name in STATIC_FILES}

    class Handler(_Handler):
        pass

    Handler.explorer, Handler.files = explorer, files
    server = http.server.ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


class _Handler(http.server.BaseHTTPRequestHandler):
    explorer: Explorer
    files: dict[str, bytes]
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802 (the name http.server calls)
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(200, self.files["index.html"], STATIC_FILES["index.html"])
        elif path.startswith("/static/") and path[len("/static/") :] in self.files:
            name = path[len("/static/") :]
            self._send(200, self.files[name], STATIC_FILES[name])
        elif path == "/api/info":
            self._json(200, self.explorer.info())
        else:
            self._json(404, {"error": f"No such page: {path}"})

    def do_POST(self):  # noqa: N802
        if self.path.split("?", 1)[0] != "/api/view":
            self._json(404, {"error": f"No such endpoint: {self.path}"})
            return
        try:
            request = self._request_json()
            view = self.explorer.view(
                request["text"],
                lens=request.get("lens", "logit"),
                statistic=request.get("statistic", "entropy"),
                layers=None if request.get("layers") is None else tuple(request["layers"]),
            )
        except (ValueError, TypeError) as error:
            self._json(400, {"error": str(error)})
        except Exception as error:  # a failed computation: say so, log it, keep serving
            logging.exception("The view failed")
            self._json(500, {"error": f"The computation failed: {type(error).__name__}: {error}"})
        else:
            self._json(200, view)

    def _request_json(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_REQUEST_BYTES:
            self.close_connection = True  # the body is not read; the connection cannot be reused
            raise ValueError(f"The request is {length} bytes; at most {MAX_REQUEST_BYTES} fit.")
        try:
            request = json.loads(self.rfile.read(length) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"The request is not JSON: {error}.") from error
        if not isinstance(request, dict) or "text" not in request:
            raise ValueError('Send a JSON object with a "text" field.')
        unknown = sorted(set(request) - set(_VIEW_FIELDS))
        if unknown:
            raise ValueError(f"Unknown fields {unknown}; the fields are {list(_VIEW_FIELDS)}.")
        layers = request.get("layers")
        if layers is not None and (not isinstance(layers, list) or len(layers) != 2):
            raise ValueError(f"layers must be [first, last]; got {layers!r}.")
        return request

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
        self._send(status, data, "application/json")

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Security-Policy", _CSP)
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        logging.info("%s - %s", self.address_string(), format % args)
