"""Hugging Face hub stand-ins for offline tests: a cache laid out as huggingface_hub 0.36 writes
it, and a hub endpoint on 127.0.0.1 that answers as the real one does.

The cache (`write_cached_repo`): `<cache>/<repo_type>s--<owner>--<name>/` with `blobs/<etag>`
(the files' contents), `snapshots/<commit>/<path>` (relative symlinks to the blobs) and
`refs/<revision>` (the commit hash, no newline): what `hf_hub_download` leaves behind, and what it
reads back with `HF_HUB_OFFLINE=1`.

The endpoint (`FakeHub`, for `HF_ENDPOINT`): `HEAD`/`GET` of `/[spaces/]owner/name/resolve/
<revision>/<path>` and `GET /api/<type>s/owner/name/tree/<revision>`, with the status codes and
`X-Error-Code` headers by which huggingface_hub tells a gated repository (403 `GatedRepo`) from
a missing one (401 `RepoNotFound`) or a missing file (404 `EntryNotFound`).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import pathlib
import re
import threading

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_cached_repo(cache, repo_id, repo_type, files: dict, revision="main") -> pathlib.Path:
    """Lays `files` ({path in repo: bytes}) into the cache as a downloaded snapshot."""
    repo = pathlib.Path(cache) / "--".join([f"{repo_type}s", *repo_id.split("/")])
    snapshot = repo / "snapshots" / COMMIT
    for name, data in files.items():
        etag = hashlib.sha256(data).hexdigest()  # an LFS file's etag is its sha256
        blob = repo / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():  # a second revision of the same commit shares the snapshot
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(COMMIT)
    return snapshot


class FakeHub:
    """A hub endpoint serving `repos` {(repo_type, repo_id): {"gated": bool, "files": {...}}}."""

    def __init__(self, repos: dict):
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):  # noqa: N802
                hub._answer(self, with_body=False)

            def do_GET(self):  # noqa: N802
                hub._answer(self, with_body=True)

            def log_message(self, *args):
                pass

        self.repos = repos
        self.requests: list[str] = []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _answer(self, handler, *, with_body):
        path = handler.path.split("?", 1)[0]
        self.requests.append(f"{handler.command} {path}")
        tree = re.fullmatch(r"/api/(model|space)s/([^/]+/[^/]+)/tree/([^/]+)", path)
        resolve = re.fullmatch(r"/(spaces/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if tree:
            repo_type, repo_id, filename = tree[1], tree[2], None
        elif resolve:
            repo_type, repo_id, filename = (
                ("space" if resolve[1] else "model"),
                resolve[2],
                resolve[4],
            )
        else:
            return self._send(handler, 404, {}, b"", with_body)
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            return self._send(handler, 401, {"X-Error-Code": "RepoNotFound"}, b"", with_body)
        if repo.get("gated"):
            message = f"Access to model {repo_id} is restricted. You must have access to it."
            headers = {"X-Error-Code": "GatedRepo", "X-Error-Message": message}
            return self._send(handler, 403, headers, b"", with_body)
        if tree:
            listing = [
                {
                    "type": "file",
                    "path": name,
                    "size": len(data),
                    "oid": hashlib.sha1(data).hexdigest(),
                }
                for name, data in repo["files"].items()
            ]
            return self._send(handler, 200, {}, json.dumps(listing).encode(), with_body)
        data = repo["files"].get(filename)
        if data is None:
            headers = {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}
            return self._send(handler, 404, headers, b"", with_body)
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
        return self._send(handler, 200, headers, data, with_body)

    @staticmethod
    def _send(handler, status, headers, body, with_body):
        handler.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            handler.send_header(key, value)
        handler.end_headers()
        if with_body:
            handler.wfile.write(body)
