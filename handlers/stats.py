"""`GET /api/websocket/stats` and `GET /ws/health`: the same counters."""

from __future__ import annotations

from handlers.base import ApiHandler


class StatsHandler(ApiHandler):
    def get(self) -> None:
        self.send_json(200, self.broker.stats_snapshot())
