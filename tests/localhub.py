"""A local HTTP server that speaks the Hub's file API (``/{datasets/|}REPO/resolve/REVISION/FILE``)
for ``huggingface_hub`` downloads, pointed at with ``HF_ENDPOINT``. It serves files from a dict
keyed by (repo type, repo, revision, path), answers HEAD with the headers the client checks (commit,
ETag, size) and GET with the bytes (ranges too), and logs every request so a test can tell a
download from a cache hit."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

Files = dict[tuple[str, str, str, str], bytes]


def _handler(files: Files, log: list[tuple[str, str]]) -> type[BaseHTTPRequestHandler]:
    class Hub(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _find(self) -> tuple[str, bytes] | None:
            path = unquote(self.path.split("?")[0]).lstrip("/")
            kind = "model"
            for prefix, k in (("datasets/", "dataset"), ("spaces/", "space")):
                if path.startswith(prefix):
                    path, kind = path[len(prefix):], k
            parts = path.split("/")
            if len(parts) < 5 or parts[2] != "resolve":
                return None
            repo, revision, file = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            data = files.get((kind, repo, revision, file))
            return (revision, data) if data is not None else None

        def _headers(self, revision: str, data: bytes, code: int = 200, length: int | None = None) -> None:
            self.send_response(code)
            self.send_header("X-Repo-Commit", revision)
            self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
            self.send_header("Content-Length", str(len(data) if length is None else length))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()

        def do_HEAD(self) -> None:
            log.append(("HEAD", self.path))
            found = self._find()
            if found is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self._headers(*found)

        def do_GET(self) -> None:
            log.append(("GET", self.path))
            found = self._find()
            if found is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            revision, data = found
            start = 0
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes="):
                start = int(rng[6:].split("-")[0] or 0)
            body = data[start:]
            self._headers(revision, data, 206 if start else 200, len(body))
            self.wfile.write(body)

    return Hub


@contextmanager
def serve(files: Files) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """(endpoint URL, request log) while the server runs."""
    log: list[tuple[str, str]] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(files, log))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", log
    finally:
        server.shutdown()
        server.server_close()


def hub_env(endpoint: str, home: str, offline: bool = False) -> dict[str, str]:
    """Environment for a subprocess that talks to ``endpoint`` with its own empty HF cache."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "PATCHER_DATA"}
    env |= {"HF_ENDPOINT": endpoint, "HF_HOME": home, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1",
            "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1", "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "10"}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env
