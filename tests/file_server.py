"""A real HTTP server on 127.0.0.1 serving files the test made, with scripted faults."""

from __future__ import annotations

import collections
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FileServer:
    """Serves ``files`` (url path -> bytes) with Range support.

    Faults, consumed in order per path: ``"503"`` answers 503; ``"cut"`` sends the full
    Content-Length but closes the connection after half of the body; ``"stall"`` sends half of the
    body and then nothing until ``release`` is set (or 60 s pass).

    ``token``: every request must carry ``Authorization: Bearer <token>`` (else 401), as a gated hub
    repository does; ``redirects`` (url path -> URL) answer 302, as the hub sends its large files to a CDN,
    with the ``X-Linked-Etag`` (the file's sha256) that ``linked`` gives for the path, as the hub states it;
    ``commit``: every answer names it in ``X-Repo-Commit``, as the hub names the commit a revision resolved to.
    """

    def __init__(
        self,
        files: dict[str, bytes],
        token: str | None = None,
        redirects: dict[str, str] | None = None,
        linked: dict[str, str] | None = None,
        commit: str | None = None,
    ):
        self.files = dict(files)
        self.token, self.redirects, self.linked = token, dict(redirects or {}), dict(linked or {})
        self.commit = commit
        self.faults: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.authorizations: list[str | None] = []  # each request's Authorization header
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def end_headers(self):
                if server.commit is not None:
                    self.send_header("X-Repo-Commit", server.commit)
                super().end_headers()

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                server.authorizations.append(self.headers.get("Authorization"))
                if server.token is not None and self.headers.get("Authorization") != f"Bearer {server.token}":
                    self.send_error(401)
                    return
                if self.path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[self.path])
                    if self.path in server.linked:
                        self.send_header("X-Linked-Etag", f'"{server.linked[self.path]}"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                fault = server.faults[self.path].popleft() if server.faults[self.path] else None
                if fault == "503":
                    self.send_error(503)
                    return
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match:
                    start = int(match.group(1))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                payload = body[start:]
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if fault in ("cut", "stall"):
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    if fault == "stall":
                        server.release.wait(60)
                    self.close_connection = True
                    return
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def gets(self, path: str) -> list[str | None]:
        return [rng for p, rng in self.requests if p == path]
