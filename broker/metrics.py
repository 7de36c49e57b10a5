"""Prometheus metrics for one Broker, read from its own counters at scrape time.

The broker already counts what operators ask about (`actors.stats.BrokerStats`,
bumped by the actors as things happen). Keeping a second set of prometheus
counters in step would mean a call on the hot path of every delivery and two
numbers that can disagree, so instead a custom collector turns the existing
counters into metric families when `/metrics` is scraped: nothing happens
between scrapes.

Each Broker gets its own `CollectorRegistry` (never the process-global
default one), so several brokers in one process (tests) do not collide.

Thread-safety: `collect()` reads plain integers that only the dispatcher
thread writes, so it must run on that thread too; the `/metrics` handler
does (Tornado handlers and actors share the IOLoop thread).

Publish-to-write latency comes from the same counters: each Frame carries
the moment its session made it (`Frame.born`), and a connection observes it
into `BrokerStats.write_latency` when it hands the frame to its transport.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from actors.connection import ConnectionActor
from actors.inbox import Inbox
from actors.mirror import MirrorSessionActor
from actors.runtime import Dispatcher, current_dispatcher
from actors.session import SessionActor
from actors.stats import LIMITS, LatencyHistogram

if TYPE_CHECKING:
    from broker.cluster.node import ClusterNode
    from broker.core import Broker
    from broker.descriptors import DescriptorBudget

__all__ = ["BrokerCollector", "broker_registry"]

#: Label values of `broker_actors{kind=...}`.
#: A mirror is a Redis node's session actor: it counts as one.
_KINDS: dict[type[Any], str] = {
    SessionActor: "session",
    MirrorSessionActor: "session",
    ConnectionActor: "connection",
}


class BrokerCollector:
    """Turns a Broker's counters and its actors' mailboxes into metric families.

    `dispatcher` is the one the broker's actors run on; when None, the one
    installed at the first scrape is used (the daemon installs it before
    anything can be scraped).
    """

    def __init__(self, broker: Broker, dispatcher: Dispatcher | None = None) -> None:
        self.broker = broker
        self.dispatcher = dispatcher

    def collect(self) -> Iterator[Metric]:
        """Called by the registry on every scrape, on the dispatcher thread."""
        broker = self.broker
        s = broker.stats
        yield _gauge(
            "broker_connections", "Open WebSocket connections (connection actors alive).", s.active_connections
        )
        yield _gauge("broker_sessions", "Sessions held in memory (session actors alive).", len(broker.directory))
        yield _gauge(
            "broker_connected_sessions", "Sessions with at least one open connection.", len(s.connected_sessions)
        )
        yield _counter(
            "broker_events_received",
            "Events accepted from publishers (duplicates by event_id excluded).",
            s.total_events_received,
        )
        yield _counter(
            "broker_messages_delivered",
            "Messages written to WebSocket clients: live events, replayed history and control messages.",
            s.total_messages_sent,
        )
        yield _counter(
            "broker_events_throttled",
            "task_progress events never delivered because the throttle superseded or discarded them.",
            s.throttled_events,
        )
        dropped = CounterMetricFamily(
            "broker_events_dropped", "Events accepted but never delivered, by reason.", labels=["reason"]
        )
        dropped.add_metric(["throttled"], s.throttled_events)
        dropped.add_metric(["compacted"], s.compacted_messages)
        yield dropped
        yield _counter(
            "broker_client_messages_rate_limited",
            "Client messages dropped for going over max_client_rate.",
            s.rate_limited_messages,
        )
        refusals = CounterMetricFamily(
            "broker_limit_refusals", "Handshakes and publishes refused by a limit, by limit.", labels=["limit"]
        )
        for limit in LIMITS:
            refusals.add_metric([limit], s.refusals.get(limit, 0))
        yield refusals
        yield _latency(s.write_latency)
        if broker.descriptors is not None:
            yield from _descriptor_metrics(broker.descriptors)
        if broker.gc_pauses is not None:
            pauses = broker.gc_pauses.by_generation
            for generation, histogram in enumerate(pauses):
                yield _histogram(
                    f"broker_gc_pause_gen{generation}_seconds",
                    f"Garbage-collection pauses of generation {generation} (the loop stalls meanwhile).",
                    histogram,
                )
        yield _counter(
            "broker_slow_consumer_disconnects",
            "Connections closed with 4008 slow_consumer (unsent output over max_queue_bytes).",
            s.slow_consumer_disconnects,
        )
        yield _gauge(
            "broker_buffered_messages",
            "Messages held in session histories (for replay and recovery).",
            s.total_buffered_messages,
        )
        yield _gauge("broker_sessions_with_buffer", "Sessions holding at least one message.", s.sessions_with_buffer)
        yield from self._actor_metrics()
        if broker.cluster is not None:
            yield from _cluster_metrics(broker.cluster)
        yield _gauge("broker_ready", "1 while /readyz answers 200.", 1 if broker.ready else 0)
        yield _gauge("broker_draining", "1 while shutting down gracefully.", 1 if broker.draining else 0)
        yield _gauge(
            "broker_uptime_seconds", "Seconds since the broker was created.", time.monotonic() - broker.started_at
        )

    def _actor_metrics(self) -> Iterator[Metric]:
        """Actor counts and mailbox depth, walked at scrape time only.

        Depth is the messages waiting in inboxes: a steadily growing sum means
        the loop cannot keep up; a large maximum points at one flooded actor.
        """
        dispatcher = self.dispatcher
        if dispatcher is None:
            try:
                dispatcher = self.dispatcher = current_dispatcher()
            except RuntimeError:
                return  # nothing runs yet, so there is nothing to report
        counts = dict.fromkeys(_KINDS.values(), 0)
        counts["other"] = 0
        pending = 0
        deepest = 0
        for ref in dispatcher.actors():
            inbox = ref.actor_inbox
            kind = _KINDS.get(ref.actor_class, "other")
            counts[kind] += 1
            depth = len(inbox) if isinstance(inbox, Inbox) else 0  # pykka types it as its ActorInbox protocol
            pending += depth
            deepest = max(deepest, depth)
        actors = GaugeMetricFamily("broker_actors", "Live actors, by kind.", labels=["kind"])
        for kind, count in counts.items():
            actors.add_metric([kind], count)
        yield actors
        yield _gauge("broker_actor_mailbox_messages", "Messages waiting in all actors' mailboxes.", pending)
        yield _gauge("broker_actor_mailbox_max_messages", "Messages waiting in the fullest mailbox.", deepest)
        yield _gauge(
            "broker_actors_ready", "Actors with mail, queued for a turn on the dispatcher.", dispatcher.ready_count()
        )


def broker_registry(broker: Broker, dispatcher: Dispatcher | None = None, *, process: bool = True) -> CollectorRegistry:
    """A fresh registry for `broker`: its collector, plus process/runtime metrics.

    `process` adds the standard `process_*`, `python_info` and `python_gc_*`
    families (memory, CPU, open files), which is what an operator checks
    first when the broker misbehaves.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(broker, dispatcher))
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


def _descriptor_metrics(descriptors: DescriptorBudget) -> Iterator[Metric]:
    """The daemon's descriptors (docs/protocol.md section 5, "Sockets"), counted afresh at each scrape."""
    yield _gauge("broker_descriptors_in_use", "Open file descriptors of the process.", descriptors.recount())
    yield _gauge(
        "broker_descriptors_budget",
        "Descriptors WebSocket and SSE connections may bring the total to (open-file limit minus fd_reserve).",
        descriptors.budget,
    )
    yield _gauge("broker_descriptors_limit", "The process's open-file limit (RLIMIT_NOFILE).", descriptors.limit)
    yield _counter(
        "broker_accept_failures",
        "accept() calls that failed (out of descriptors: EMFILE, ENFILE); each pauses accepting briefly.",
        descriptors.accept_failures,
    )
    yield _counter(
        "broker_connections_shed",
        "Connections waiting for a request that were closed to make room past the descriptor budget.",
        descriptors.shed,
    )
    timeouts = CounterMetricFamily(
        "broker_connection_timeouts",
        "HTTP connections closed for a timeout: headers (header_timeout), idle or body (idle_timeout).",
        labels=["phase"],
    )
    for phase, count in descriptors.timeouts.items():
        timeouts.add_metric([phase], count)
    yield timeouts


def _latency(histogram: LatencyHistogram) -> HistogramMetricFamily:
    return _histogram(
        "broker_publish_to_write_seconds",
        "From a session accepting a message to a connection handing it to its socket.",
        histogram,
    )


def _histogram(name: str, documentation: str, histogram: LatencyHistogram) -> HistogramMetricFamily:
    buckets = []
    running = 0
    for bound, count in zip((*histogram.BOUNDS, float("inf")), histogram.counts, strict=True):
        running += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=histogram.total)


def _cluster_metrics(node: ClusterNode) -> Iterator[Metric]:
    """What an operator watches on a Redis node: is Redis answering, is the subscription alive (the canary)."""
    subscriber = node.subscriber
    info = GaugeMetricFamily("broker_node", "This node (always 1), named by its node_id.", labels=["node_id"])
    info.add_metric([node.node_id], 1)
    yield info
    yield _gauge("broker_redis_reachable", "1 while Redis answers this node's commands.", 1 if node.reachable else 0)
    yield _gauge(
        "broker_redis_subscription_healthy",
        "1 while the pub/sub subscription is confirmed and its last canary came back (a deaf node shows 0).",
        1 if subscriber.healthy else 0,
    )
    yield _counter(
        "broker_redis_messages_received",
        "Session and broadcast messages received over pub/sub (canaries not counted).",
        subscriber.messages_received,
    )
    yield _counter(
        "broker_redis_reconnects",
        "Pub/sub connections made again after a loss or a failed canary (each one is followed by a catch-up).",
        subscriber.reconnects,
    )
    yield _counter(
        "broker_redis_canary_failures",
        "Canaries that did not come back within the check interval: the subscription was found deaf.",
        subscriber.canary_failures,
    )
    yield _gauge("broker_cluster_nodes", "Live nodes in the cluster, this one included.", len(node.nodes))


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)
