"""`GET /metrics`: the broker's Prometheus metrics.

Thin on purpose: the registry (broker/metrics.py) knows what to report; this
only picks the exposition format the scraper asked for and writes it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from broker.core import Broker
from handlers.base import ApiHandler


class MetricsHandler(ApiHandler):
    """Prometheus text format, or OpenMetrics when the `Accept` header asks for it.

    Inherits ApiHandler for the request id and the no-store headers; the
    collection runs here, on the loop thread, which is where the counters it
    reads are written.
    """

    # Tornado hands each route its own keyword arguments; this route has one more than ApiHandler's.
    def initialize(self, broker: Broker, registry: CollectorRegistry) -> None:  # type: ignore[override]
        super().initialize(broker)
        self.registry = registry

    def get(self) -> None:
        encode, content_type = choose_encoder(self.request.headers.get("Accept", ""))
        self.set_header("Content-Type", content_type)
        self.finish(encode(self.registry))
