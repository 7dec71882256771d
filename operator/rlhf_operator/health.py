"""Liveness, readiness and metrics over HTTP, served from a thread so a busy event loop cannot hide it.

``/healthz``: the event loop ticked recently (a wedged loop fails it and the kubelet restarts us).
``/readyz``: this replica leads and kopf has opened its watch-streams for every watched resource in
every watched namespace, and the watch caches hold each stream's initial listing (reported by
:func:`.cache.tap_watch_streams`; a standby replica is live but not ready; a starting leader is not
ready until the streams it acts on exist, or a rollout would retire the old replica while nothing
watches).
``/metrics``: Prometheus exposition.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST

from .metrics import Metrics

LOOP_STALL_SECONDS = 60.0


class Health:
    def __init__(self) -> None:
        self.heartbeat = time.monotonic()
        self.leading = False
        self.watching = False
        self.streams_expected = 1
        self.streams: set[str] = set()

    def beat(self) -> None:
        self.heartbeat = time.monotonic()

    @property
    def live(self) -> bool:
        return time.monotonic() - self.heartbeat < LOOP_STALL_SECONDS

    @property
    def ready(self) -> bool:
        return self.live and self.leading and self.watching and len(self.streams) >= self.streams_expected


def serve(health: Health, metrics: Metrics, host: str, port: int) -> ThreadingHTTPServer:
    """Start the probe and metrics server in a daemon thread; returns it (``server_port`` is the bound port)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path == "/metrics":
                self._reply(200, metrics.exposition(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok = health.live
                self._reply(200 if ok else 503, b"ok\n" if ok else b"event loop stalled\n")
            elif path == "/readyz":
                ok = health.ready
                why = b"ok\n" if ok else (b"standby: not the leader\n" if not health.leading else b"starting\n")
                self._reply(200 if ok else 503, why)
            else:
                self._reply(404, b"not found\n")

        def _reply(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # probes every few seconds: keep logs quiet
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server
