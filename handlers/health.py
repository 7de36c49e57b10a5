"""Liveness and readiness probes for operators and orchestrators.

They are `ApiHandler`s for what every response carries (`X-Request-ID`,
`Cache-Control: no-store`, JSON errors), but need no broker.
"""

from __future__ import annotations

from typing import Any

from handlers.base import ApiHandler


class HealthzHandler(ApiHandler):
    """`GET /healthz`: 200 while the process and its event loop answer.

    Answering at all proves the loop is alive; nothing else is checked, so a
    load balancer never takes a healthy process out over a dependency.
    """

    def initialize(self) -> None:  # type: ignore[override]
        """Takes nothing: a liveness probe depends on nothing."""

    def get(self) -> None:
        self.send_json(200, {"status": "ok"})


class ReadyzHandler(ApiHandler):
    """`GET /readyz`: 200 when ready to serve, 503 while starting or draining."""

    def initialize(self, state: Any) -> None:  # type: ignore[override]
        self.state = state

    def get(self) -> None:
        if self.state.ready:
            self.send_json(200, {"status": "ready"})
        else:
            self.send_json(503, {"status": "unavailable"})
