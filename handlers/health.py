"""Liveness and readiness probes for operators and orchestrators.

They are `ApiHandler`s for what every response carries (`X-Request-ID`,
`Cache-Control: no-store`, CORS, JSON errors). Liveness reads nothing of the
broker; readiness reads only its `ready` flag.
"""

from __future__ import annotations

from handlers.base import ApiHandler


class HealthzHandler(ApiHandler):
    """`GET /healthz`: 200 while the process and its event loop answer.

    Answering at all proves the loop is alive; nothing else is checked, so a
    load balancer never takes a healthy process out over a dependency.
    """

    def get(self) -> None:
        self.send_json(200, {"status": "ok"})


class ReadyzHandler(ApiHandler):
    """`GET /readyz`: 200 when ready to serve, 503 while starting or draining."""

    def get(self) -> None:
        if self.broker.ready:
            self.send_json(200, {"status": "ready"})
        else:
            self.send_json(503, {"status": "unavailable"})
