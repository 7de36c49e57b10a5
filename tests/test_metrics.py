"""`GET /metrics`: Prometheus text that parses, and counters that follow the traffic.

In process, against the real application (pytest-tornasync fixtures from
conftest.py); the collector reads the Broker's own counters at scrape time,
so these tests drive traffic and scrape again.
"""

from __future__ import annotations

import pytest

from actors.messages import DescribeSession
from broker.config import Settings
from broker.core import Broker
from broker.metrics import BrokerCollector, broker_registry
from broker.testing import ActorHarness
from tests.support.wire import metrics, publish, session_info, wait_until
from tests.support.wire import stats as get_stats


async def test_metrics_parse_and_start_at_zero(http_server_client):
    samples = await metrics(http_server_client)
    for name in (
        "broker_connections",
        "broker_sessions",
        "broker_events_received_total",
        "broker_messages_delivered_total",
        "broker_events_throttled_total",
        "broker_slow_consumer_disconnects_total",
        "broker_buffered_messages",
        "broker_actor_mailbox_messages",
        "broker_actors_ready",
    ):
        assert samples.value(name) == 0, name
    assert samples.value("broker_events_dropped_total", reason="throttled") == 0
    assert samples.value("broker_ready") == 1
    assert samples.value("process_resident_memory_bytes") > 0


async def test_counters_follow_the_traffic(connect, http_server_client):
    client, _ = await connect("m1", research=True)
    progress = [
        {"type": "task_progress", "task_id": "t1", "progress": p, "current_action": "reading"} for p in (10, 11, 12)
    ]
    await publish(
        http_server_client,
        "m1",
        [{"type": "task_started", "task_id": "t1"}, *progress, {"type": "task_completed", "task_id": "t1"}],
    )
    await client.receive_until(type="task_completed")
    # The session has handled everything the publish started: ask it something (as an operator can).
    assert (await session_info(http_server_client, "m1"))[0] == 200

    samples = await metrics(http_server_client)
    stats = await get_stats(http_server_client)  # the same numbers, as the stats endpoint shows them
    assert samples.value("broker_connections") == 1
    assert samples.value("broker_sessions") == 1
    assert samples.value("broker_connected_sessions") == 1
    assert samples.value("broker_events_received_total") == 5 == stats["total_events_received"]
    # progress 11 was superseded by 12, and 12 was still held when the task completed
    assert samples.value("broker_events_throttled_total") == stats["throttled_events"] >= 1
    assert samples.value("broker_events_dropped_total", reason="throttled") == stats["throttled_events"]
    delivered = samples.value("broker_messages_delivered_total")
    assert delivered == stats["total_messages_sent"] >= 4  # greeting, started, progress 10, completed
    assert samples.value("broker_buffered_messages") == stats["total_buffered_messages"] >= 3
    assert samples.value("broker_actors", kind="connection") == 1
    assert samples.value("broker_actors", kind="session") == 1

    client.close()
    await publish(http_server_client, "m1", [{"type": "task_started", "task_id": "t2"}])
    later = await metrics(http_server_client)
    assert later.value("broker_events_received_total") == 6


def test_mailbox_depth_is_read_from_the_inboxes_at_scrape_time():
    """Under the manual dispatcher, messages wait until the test runs them."""
    with ActorHarness() as harness:
        broker = Broker(Settings())
        collector = BrokerCollector(broker, harness.dispatcher)
        session = broker.directory.get_or_create("deep")
        for _ in range(3):
            session.tell(DescribeSession())
        samples = {s.name: s.value for family in collector.collect() for s in family.samples if not s.labels}
        assert samples["broker_actor_mailbox_messages"] == 4  # on_start, then the three
        assert samples["broker_actor_mailbox_max_messages"] == 4
        assert samples["broker_actors_ready"] == 1
        harness.run_until_idle()
        samples = {s.name: s.value for family in collector.collect() for s in family.samples if not s.labels}
        assert samples["broker_actor_mailbox_messages"] == 0
        assert samples["broker_actors_ready"] == 0


def test_each_broker_has_its_own_registry():
    """No process-global registry: two brokers (two tests) never collide."""
    with ActorHarness():
        first, second = Broker(Settings()), Broker(Settings())
        first.stats.total_events_received = 3
        one, two = broker_registry(first, process=False), broker_registry(second, process=False)
        assert one.get_sample_value("broker_events_received_total") == 3
        assert two.get_sample_value("broker_events_received_total") == 0
        assert broker_registry(first).get_sample_value("process_open_fds") is not None


async def test_openmetrics_when_asked(http_server_client):
    response = await http_server_client.fetch(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    assert response.body.endswith(b"# EOF\n")


async def test_limit_refusals_compaction_and_latency_are_exported(broker, http_server_client):
    """The collector exports what the counters hold (real refusals: tests/test_limits.py)."""
    broker.stats.refused("max_sessions")
    broker.stats.compacted_messages += 3
    broker.stats.write_latency.observe(0.003)
    samples = await metrics(http_server_client)
    assert samples.value("broker_limit_refusals_total", limit="max_sessions") == 1
    assert samples.value("broker_events_dropped_total", reason="compacted") == 3
    assert samples.value("broker_publish_to_write_seconds_bucket", le="0.005") == 1
    assert samples.value("broker_publish_to_write_seconds_bucket", le="0.0025") == 0
    assert samples.value("broker_publish_to_write_seconds_count") == 1


async def test_gc_pauses_are_measured_and_exported(broker, http_server_client):
    import gc

    from broker.gc_tuning import GcPauses

    broker.gc_pauses = GcPauses().install()
    try:
        gc.collect()
    finally:
        broker.gc_pauses.uninstall()
    samples = await metrics(http_server_client)
    assert samples.value("broker_gc_pause_gen2_seconds_count") >= 1


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
async def test_a_redis_node_reports_its_subscription_and_a_cut_one_is_counted(
    connect, http_server_client, redis_server, broker
):
    """What an operator alerts on: Redis reachable, the subscription alive, and each time it was found deaf."""
    samples = await metrics(http_server_client)
    assert samples.value("broker_redis_reachable") == 1
    assert samples.value("broker_redis_subscription_healthy") == 1
    assert samples.value("broker_cluster_nodes") == 1
    assert samples.value("broker_node", node_id=broker.cluster.node_id) == 1  # node_id names the node here too
    assert samples.value("broker_redis_reconnects_total") == 0
    client, _ = await connect("rm1", research=True)
    # another node hears rm1 (its mark, stamped far ahead): this node's publish then goes out by pub/sub
    redis_server.command("HSET", "ab:{rm1}:listeners", "another-node", "99999999999999")
    await publish(http_server_client, "rm1", [{"type": "task_started", "task_id": "t1"}])
    await client.expect(type="task_started")
    received = await metrics(http_server_client)
    assert received.value("broker_redis_messages_received_total") >= 1

    redis_server.command("CLIENT", "KILL", "TYPE", "pubsub")  # the subscription is cut under the node
    samples = await wait_until(
        lambda: metrics(http_server_client),
        lambda s: s.value("broker_redis_reconnects_total") >= 1 and s.value("broker_redis_subscription_healthy") == 1,
        timeout=10,
        what="the node resubscribing",
    )
    assert samples.value("broker_redis_reachable") == 1
    await publish(http_server_client, "rm1", [{"type": "task_started", "task_id": "t2"}])
    assert (await client.expect(type="task_started"))["task_id"] == "t2"  # it hears the session again
