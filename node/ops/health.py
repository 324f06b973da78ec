"""The optional HTTP endpoint: /healthz (liveness), /readyz (readiness), /metrics (Prometheus).

Written on the standard library's ThreadingHTTPServer: three fixed GET routes do
not justify a web framework dependency; prometheus-client renders /metrics.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

log = logging.getLogger("dermnode.http")


def check_writable(directory) -> None:
    """Write, fsync and remove a small file: raises OSError when the disk cannot take data."""
    path = os.path.join(directory, f".healthz-{os.getpid()}-{threading.get_ident()}")
    with open(path, "wb") as fh:
        fh.write(b"ok")
        fh.flush()
        os.fsync(fh.fileno())
    os.unlink(path)


class HealthServer:
    def __init__(
        self,
        bind: str,
        port: int,
        *,
        liveness: Callable[[], dict],
        readiness: Callable[[], dict],
        metrics: Callable[[], bytes],
    ) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/metrics":
                    body = outer.metrics()
                    self._send(200, body, "text/plain; version=0.0.4; charset=utf-8")
                elif self.path in ("/healthz", "/readyz"):
                    check = outer.liveness if self.path == "/healthz" else outer.readiness
                    try:
                        result = check()
                    except Exception as exc:  # noqa: BLE001 - any failure is "not healthy"
                        result = {"ok": False, "error": str(exc)}
                    code = 200 if result.get("ok") else 503
                    self._send(code, json.dumps(result).encode(), "application/json")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args) -> None:  # quiet: scrapes every few seconds
                log.debug("http %s", fmt % args)

        self.liveness = liveness
        self.readiness = readiness
        self.metrics = metrics
        self.server = ThreadingHTTPServer((bind, port), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="dermnode-http", daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class CachedCheck:
    """Run an expensive check (a C-ECHO) at most every ``ttl`` seconds."""

    def __init__(self, fn: Callable[[], dict], ttl: float = 10.0) -> None:
        self.fn = fn
        self.ttl = ttl
        self._at = 0.0
        self._value: dict = {}
        self._lock = threading.Lock()

    def __call__(self) -> dict:
        with self._lock:
            if time.time() - self._at > self.ttl:
                try:
                    self._value = self.fn()
                except Exception as exc:  # noqa: BLE001
                    self._value = {"ok": False, "error": str(exc)}
                self._at = time.time()
            return dict(self._value)
