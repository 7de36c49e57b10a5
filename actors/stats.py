"""Process-wide counters, read by the stats endpoints and /metrics.

Plain integers mutated only on the dispatcher thread, so they need no
locks; actors bump them as things happen instead of being polled.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from actors.messages import Frame


class LatencyHistogram:
    """Publish-to-write latency: cumulative-ready bucket counts, cheap to observe.

    Observed once per message per connection on the hot path, so it is a
    bisect and two additions; /metrics turns it into a Prometheus histogram.
    """

    BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BOUNDS) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.BOUNDS, seconds)] += 1
        self.total += seconds


#: Every limit that refuses a handshake or a publish, as /metrics names it
#: (`broker_limit_refusals{limit=...}`); `BrokerStats.refused` takes no other name.
LIMITS = (
    "max_connections",
    "max_connections_per_session",
    "max_connections_per_user",
    "max_sessions",
    "max_body_size",
    "max_batch_events",
    "fd_budget",
)


class BrokerStats:
    __slots__ = (
        "active_connections",
        "compacted_messages",
        "connected_sessions",
        "rate_limited_messages",
        "refusals",
        "sessions_with_buffer",
        "slow_consumer_disconnects",
        "throttled_events",
        "total_buffered_messages",
        "total_events_received",
        "total_messages_sent",
        "write_latency",
    )

    def __init__(self) -> None:
        self.active_connections = 0
        self.total_buffered_messages = 0
        self.sessions_with_buffer = 0
        self.total_messages_sent = 0
        self.total_events_received = 0
        self.throttled_events = 0
        self.slow_consumer_disconnects = 0
        #: session ids with at least one connection
        self.connected_sessions: set[str] = set()
        #: queued task_progress dropped from slow clients' queues (a newer one superseded it)
        self.compacted_messages = 0
        #: client messages dropped for going over max_client_rate
        self.rate_limited_messages = 0
        #: handshakes and publishes refused by a limit, by the limit's name
        self.refusals: dict[str, int] = {}
        #: from the session making a message to its connection handing it to the socket
        self.write_latency = LatencyHistogram()

    def buffered_changed(self, before: int, after: int) -> None:
        """A session's history went from `before` to `after` messages."""
        self.total_buffered_messages += after - before
        if before == 0 and after > 0:
            self.sessions_with_buffer += 1
        elif before > 0 and after == 0:
            self.sessions_with_buffer -= 1

    def wrote(self, frames: list[Frame], now: float) -> None:
        """A connection handed these frames to its transport at monotonic time `now`."""
        self.total_messages_sent += len(frames)
        observe = self.write_latency.observe
        for frame in frames:
            if frame.born:
                observe(now - frame.born)

    def refused(self, limit: str) -> None:
        """Count one refusal by `limit` (one of LIMITS: a name /metrics does not export is a bug)."""
        if limit not in LIMITS:
            raise ValueError(f"{limit!r} is not a limit /metrics exports")
        self.refusals[limit] = self.refusals.get(limit, 0) + 1
