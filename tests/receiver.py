"""A frontend's events receiver for tests: a real HTTP server on loopback that takes POSTed lifecycle
events (events.py), checks their signature, and can be taken down and brought back on its port."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer

from helpers import free_port

SIGNATURE_HEADER = "X-Datalab-Signature"


class EventReceiver:
    """`events` holds each event taken (in arrival order) whose signature was right; `refusing`
    answers 503 to the next that many POSTs; `stop` and `start` take it down and back."""

    def __init__(self, key: str, port: int | None = None):
        self.key = key
        self.port = port or free_port()
        self.events: list[dict] = []
        self.bad_signatures = 0
        self.refusing = 0
        self._server: ThreadingHTTPServer | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def signed_right(self, body: bytes, given: str) -> bool:
        expected = "sha256=" + hmac.new(self.key.encode(), body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, given)

    def _take(self, body: bytes, given: str) -> int:
        with self._lock:
            if self.refusing > 0:
                self.refusing -= 1
                return 503
            if not self.signed_right(body, given):
                self.bad_signatures += 1
                return 401
            self.events.append(json.loads(body))
            return 204

    def start(self) -> EventReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                self.send_response(receiver._take(body, self.headers.get(SIGNATURE_HEADER, "")))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def of_type(self, kind: str) -> list[dict]:
        with self._lock:
            return [e for e in self.events if e["type"] == kind]
