"""Liveness and readiness probes for operators and orchestrators."""

from __future__ import annotations

from typing import Any

import tornado.web


class HealthzHandler(tornado.web.RequestHandler):
    """`GET /healthz`: 200 while the process and its event loop answer.

    Answering at all proves the loop is alive; nothing else is checked, so a
    load balancer never takes a healthy process out over a dependency.
    """

    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(b'{"status":"ok"}')


class ReadyzHandler(tornado.web.RequestHandler):
    """`GET /readyz`: 200 when ready to serve, 503 while starting or draining."""

    def initialize(self, state: Any) -> None:
        self.state = state

    def get(self) -> None:
        ready = self.state.ready
        self.set_status(200 if ready else 503)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(b'{"status":"ready"}' if ready else b'{"status":"unavailable"}')
