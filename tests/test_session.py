"""SessionActor and ConnectionActor under the deterministic harness and manual clock."""

from __future__ import annotations

from typing import Any

import pytest

from actors.filters import ALL, parse_events_param
from actors.messages import CloseSession, DescribeConnection, DescribeSession, Publish
from broker.config import Settings
from broker.core import Broker
from broker.testing import RecordingTransport
from broker.validation import normalize_events


class World:
    """A broker on the harness: publish, connect with a recording transport, read."""

    def __init__(self, harness: Any, **settings: Any) -> None:
        self.h = harness
        self.broker = Broker(Settings(**settings))
        self.stats = self.broker.stats

    def publish(self, session_id: str, *events: dict[str, Any]) -> list[int | None]:
        normalized = normalize_events(list(events), session_id=session_id, now=self.h.clock.time())
        return self.session(session_id).ask(Publish(normalized))

    def progress(self, session_id: str, task_id: str, value: float, **extra: Any) -> int | None:
        return self.publish(session_id, {"type": "task_progress", "task_id": task_id, "progress": value, **extra})[0]

    def session(self, session_id: str):
        return self.broker.directory.get_or_create(session_id)

    def connect(
        self,
        session_id: str,
        *,
        events: str | None = None,
        replay: str = "all",
        last_seq: int | None = None,
        epoch: str | None = None,
        transport: RecordingTransport | None = None,
    ) -> tuple[Any, RecordingTransport]:
        transport = transport or RecordingTransport()
        ref = self.broker.open_connection(
            session_id=session_id,
            user_id="u1",
            event_filter=parse_events_param(events) if events else ALL,
            replay=replay,
            last_seq=last_seq,
            epoch=epoch,
            greeting_type="connected",
            transport=transport,
        ).ref
        self.h.run_until_idle()
        return ref, transport

    def describe(self, session_id: str) -> dict[str, Any]:
        return self.session(session_id).ask(DescribeSession())


def seqs(transport: RecordingTransport) -> list[int]:
    return [m["seq"] for m in transport.messages if "seq" in m]


def progress_values(transport: RecordingTransport) -> list[float]:
    return [m["progress"] for m in transport.messages if m["type"] == "task_progress"]


@pytest.fixture
def world(harness):
    return World(harness)


# -- history, seq, epoch ---------------------------------------------------


def test_seq_counts_from_one_without_holes_and_carries_the_epoch(world):
    _, client = world.connect("s")
    assert world.publish("s", {"type": "session_started"}, {"type": "plan_generated", "plan": [1]}) == [1, 2]
    greeting, first, second = client.messages
    assert greeting["type"] == "connected" and greeting["last_seq"] == 0
    assert (first["seq"], second["seq"]) == (1, 2)
    assert first["epoch"] == second["epoch"] == greeting["epoch"]
    assert second["plan"] == [1]  # payload stays flat, at top level


def test_history_keeps_the_newest_buffer_size_messages(harness):
    world = World(harness, buffer_size=3)
    for i in range(10):
        world.publish("s", {"type": "task_started", "task_id": f"t{i}"})
    assert world.describe("s")["buffered_messages"] == 3
    _, client = world.connect("s", replay="all")
    assert seqs(client) == [8, 9, 10]
    assert world.stats.total_buffered_messages == 3


def test_last_seq_after_eviction_gets_a_gap_then_what_is_held(harness):
    world = World(harness, buffer_size=5)
    for i in range(12):
        world.publish("s", {"type": "task_started", "task_id": f"t{i}"})
    _, client = world.connect("s", last_seq=2)
    kinds = client.messages
    assert kinds[1] == {"type": "gap", "from_seq": 3, "to_seq": 7, "epoch": kinds[0]["epoch"]}
    assert seqs(client) == [8, 9, 10, 11, 12]


def test_last_seq_within_history_gets_exactly_the_newer_ones(world):
    for i in range(6):
        world.publish("s", {"type": "task_started", "task_id": f"t{i}"})
    _, client = world.connect("s", last_seq=4)
    assert client.types() == ["connected", "task_started", "task_started"]
    assert seqs(client) == [5, 6]


def test_wrong_epoch_gets_a_full_gap_then_the_whole_history(world):
    for i in range(3):
        world.publish("s", {"type": "task_started", "task_id": f"t{i}"})
    _, client = world.connect("s", last_seq=3, epoch="e-from-an-earlier-life")
    gap = client.messages[1]
    assert gap["type"] == "gap" and gap["from_seq"] == 1 and gap["to_seq"] is None
    assert gap["epoch"] == client.messages[0]["epoch"] != "e-from-an-earlier-life"
    assert seqs(client) == [1, 2, 3]


def test_last_seq_beyond_newest_closes_1008_before_any_data(world):
    world.publish("s", {"type": "session_started"})
    _, client = world.connect("s", last_seq=5)
    assert client.messages == []
    assert client.closed is not None and client.closed[0] == 1008


def test_a_session_made_only_for_a_refused_handshake_does_not_stay(world):
    _, client = world.connect("fresh", last_seq=3)
    assert client.closed is not None and client.closed[0] == 1008
    world.h.run_until_idle()
    assert world.broker.directory.get("fresh") is None
    assert world.broker.stats_snapshot()["active_sessions"] == 0
    _, again = world.connect("fresh", last_seq=0)
    assert again.types() == ["connected"], "the session id is free to use"


def test_a_refused_handshake_leaves_a_session_that_had_events_alone(world):
    world.publish("s", {"type": "session_started"})
    world.connect("s", last_seq=9)
    world.h.run_until_idle()
    assert world.describe("s")["buffered_messages"] == 1


def test_last_seq_beyond_newest_with_another_epoch_follows_the_epoch_rule(world):
    world.publish("s", {"type": "session_started"})
    _, client = world.connect("s", last_seq=50, epoch="e-old")
    assert client.types() == ["connected", "gap", "session_started"]


def test_replay_missed_sends_only_what_no_connection_got(world):
    world.publish("s", {"type": "task_started", "task_id": "a"})
    _, first = world.connect("s", replay="missed")
    world.publish("s", {"type": "task_started", "task_id": "b"})
    _, second = world.connect("s", replay="missed")
    assert seqs(first) == [1, 2]
    assert seqs(second) == []  # both were sent to `first` already


def test_replay_missed_counts_what_a_filter_kept_back_as_missed(world):
    _, essential = world.connect("s", events="essential", replay="none")
    world.publish("s", {"type": "task_started", "task_id": "a"}, {"type": "task_completed", "task_id": "a"})
    _, newcomer = world.connect("s", replay="missed")
    assert seqs(essential) == [2]
    assert seqs(newcomer) == [1]


def test_replay_none_gets_only_live_messages(world):
    world.publish("s", {"type": "session_started"})
    _, client = world.connect("s", replay="none")
    world.publish("s", {"type": "session_completed"})
    assert client.types() == ["connected", "session_completed"]
    assert client.messages[0]["last_seq"] == 1


def test_a_new_session_after_delete_has_a_new_epoch_and_starts_at_one(world):
    world.publish("s", {"type": "session_started"})
    old_epoch = world.describe("s")["epoch"]
    assert world.session("s").ask(CloseSession()) is True
    assert "s" not in world.broker.directory
    assert world.publish("s", {"type": "session_started"}) == [1]
    assert world.describe("s")["epoch"] != old_epoch


def test_delete_tells_clients_then_closes_them_1000(world):
    _, client = world.connect("s")
    world.session("s").ask(CloseSession())
    world.h.run_until_idle()
    assert client.types()[-1] == "session_closed"
    assert client.closed == (1000, "session closed")
    assert world.stats.active_connections == 0


# -- throttling as the session applies it ----------------------------------------


def test_small_steps_are_held_and_the_newest_arrives_on_the_trailing_edge(world):
    _, client = world.connect("s")
    assert world.progress("s", "t", 10) == 1
    assert world.progress("s", "t", 11) is None
    assert world.progress("s", "t", 12) is None
    world.publish("s", {"type": "system_notification", "message": "meanwhile"})
    world.h.advance(0.999)
    assert progress_values(client) == [10]
    world.h.advance(0.001)
    assert progress_values(client) == [10, 12]
    # the held one gets its seq when delivered, after the notification published later
    assert [(m["type"], m["seq"]) for m in client.messages[1:]] == [
        ("task_progress", 1),
        ("system_notification", 2),
        ("task_progress", 3),
    ]
    assert world.stats.throttled_events == 1  # 11, superseded while held


def test_big_steps_zero_hundred_and_action_changes_pass_at_once(world):
    _, client = world.connect("s")
    for value in (50, 55, 50, 52, 0, 1, 100):
        world.progress("s", "t", value)
    world.progress("s", "t", 100.5 - 0.5, current_action="writing")
    world.progress("s", "t", 99, current_action="reviewing")
    assert progress_values(client) == [50, 55, 50, 0, 100, 100, 99]


def test_completion_discards_the_held_progress_and_later_progress(world):
    _, client = world.connect("s")
    world.progress("s", "t", 10)
    world.progress("s", "t", 12)  # held
    world.publish("s", {"type": "task_completed", "task_id": "t"})
    assert world.progress("s", "t", 50) is None
    world.h.advance(5)
    assert progress_values(client) == [10]
    assert client.types()[-1] == "task_completed"
    assert world.stats.throttled_events == 2


def test_task_started_again_restarts_a_finished_task(world):
    _, client = world.connect("s")
    world.progress("s", "t", 10)
    world.publish("s", {"type": "task_failed", "task_id": "t", "error": "timeout"})
    world.publish("s", {"type": "task_started", "task_id": "t"})
    assert world.progress("s", "t", 11) is not None
    assert progress_values(client) == [10, 11]


def test_throttle_is_per_task(world):
    _, client = world.connect("s")
    world.progress("s", "a", 10)
    world.progress("s", "b", 11)
    world.progress("s", "a", 12)
    assert progress_values(client) == [10, 11]


# -- idempotent publishing ------------------------------------------------------


def test_a_repeated_event_id_gets_the_first_seq_and_is_not_delivered_again(world):
    _, client = world.connect("s")
    event = {"type": "task_started", "task_id": "t", "event_id": "ev-1"}
    assert world.publish("s", event) == [1]
    assert world.publish("s", event, {"type": "task_started", "task_id": "u"}) == [1, 2]
    assert world.publish("s", event, event) == [1, 1]
    assert seqs(client) == [1, 2]


def test_a_repeated_held_event_answers_null_then_its_seq_once_delivered(world):
    world.progress("s", "t", 10)
    held = {"type": "task_progress", "task_id": "t", "progress": 11, "event_id": "ev-held"}
    assert world.publish("s", held) == [None]
    assert world.publish("s", held) == [None]
    world.h.advance(1)
    assert world.publish("s", held) == [2]


def test_event_ids_are_forgotten_after_the_dedup_window(harness):
    world = World(harness, dedup_window=300)
    event = {"type": "task_started", "task_id": "t", "event_id": "ev-1"}
    assert world.publish("s", event) == [1]
    world.h.advance(299)
    assert world.publish("s", event) == [1]
    world.h.advance(2)
    assert world.publish("s", event) == [2]


# -- filters --------------------------------------------------------------------


def test_each_connection_gets_what_its_filter_admits(world):
    _, everything = world.connect("s")
    _, essential = world.connect("s", events="essential")
    _, planning = world.connect("s", events="planning")
    _, no_progress = world.connect("s", events="all,-task_progress")
    world.publish(
        "s",
        {"type": "session_started"},
        {"type": "plan_generated", "plan": []},
        {"type": "task_progress", "task_id": "t", "progress": 5},
        {"type": "task_completed", "task_id": "t"},
        {"type": "my_custom_event"},
        {"type": "session_completed"},
    )
    assert everything.types()[1:] == [
        "session_started",
        "plan_generated",
        "task_progress",
        "task_completed",
        "my_custom_event",
        "session_completed",
    ]
    assert essential.types()[1:] == ["session_started", "task_completed", "session_completed"]
    assert planning.types()[1:] == ["session_started", "plan_generated", "session_completed"]
    assert "task_progress" not in no_progress.types() and "my_custom_event" in no_progress.types()
    assert essential.messages[0]["events"] == sorted(
        [
            "session_started",
            "session_completed",
            "session_cancelled",
            "task_completed",
            "task_failed",
            "complete",
            "error",
        ]
    )
    assert no_progress.messages[0]["events"] == ["*", "-task_progress"]


def test_subscribe_and_unsubscribe_change_the_filter_at_runtime(world):
    ref, client = world.connect("s", events="essential")
    from actors.messages import ClientMessage

    ref.tell(ClientMessage('{"type": "subscribe", "events": ["task_progress"]}'))
    world.h.run_until_idle()
    assert client.messages[-1]["type"] == "subscribed"
    assert "task_progress" in client.messages[-1]["events"]
    world.progress("s", "t", 5)
    ref.tell(ClientMessage('{"type": "unsubscribe", "events": ["*"]}'))
    world.h.run_until_idle()
    assert client.messages[-1] == {"type": "subscribed", "events": [], "timestamp": client.messages[-1]["timestamp"]}
    world.publish("s", {"type": "session_completed"})
    assert client.types() == ["connected", "subscribed", "task_progress", "subscribed"]


# -- expiry -----------------------------------------------------------------------


def test_a_session_ends_ttl_after_its_last_event_when_nobody_is_connected(harness):
    world = World(harness, session_ttl=60)
    world.publish("s", {"type": "session_started"})
    world.h.advance(59)
    assert "s" in world.broker.directory
    world.publish("s", {"type": "session_completed"})  # an event restarts the clock
    world.h.advance(59)
    assert "s" in world.broker.directory
    world.h.advance(1)
    assert "s" not in world.broker.directory
    assert world.stats.total_buffered_messages == 0


def test_a_connected_session_does_not_expire_and_its_ttl_starts_when_the_last_one_leaves(harness):
    world = World(harness, session_ttl=60)
    ref, _ = world.connect("s")
    world.h.advance(600)
    assert "s" in world.broker.directory
    ref.stop()
    world.h.advance(59)
    assert "s" in world.broker.directory
    world.h.advance(1)
    assert "s" not in world.broker.directory


def test_an_event_that_reaches_an_expiring_session_lands_in_its_next_life(harness):
    world = World(harness, session_ttl=10)
    old = world.session("s")
    world.h.advance(10)  # expired, stopping
    assert not old.is_alive()
    assert world.publish("s", {"type": "session_started"}) == [1]


# -- connections: queue limits, keepalive, client errors ----------------------------


def test_a_slow_client_is_compacted_before_it_is_closed(harness):
    world = World(harness, max_queue_bytes=2_000)
    slow = RecordingTransport(auto_flush=False)
    _, slow = world.connect("s", transport=slow)  # greeting in flight, not flushed
    _, fast = world.connect("s")
    for i in range(40):  # each progress ~250 bytes; 5 tasks, superseded ones dropped
        world.publish(
            "s",
            {"type": "task_progress", "task_id": f"t{i % 5}", "progress": i * 2, "current_action": f"step {i}"},
        )
    assert slow.closed is None, "compaction kept it under the limit"
    slow.flush()
    harness.run_until_idle()
    delivered = [m for m in slow.messages if m["type"] == "task_progress"]
    assert {m["task_id"] for m in delivered} == {f"t{i}" for i in range(5)}
    assert [m["progress"] for m in delivered if m["task_id"] == "t0"][-1] == 70  # the newest won
    assert len(progress_values(fast)) == 40

    for i in range(30):  # lifecycle events are never dropped: now it must close
        world.publish("s", {"type": "task_started", "task_id": f"x{i}", "note": "y" * 100})
    assert slow.closed == (4008, "slow_consumer")
    assert world.stats.slow_consumer_disconnects == 1
    assert len([m for m in fast.messages if m["type"] == "task_started"]) == 30


def test_a_single_message_larger_than_the_limit_is_still_written(harness):
    world = World(harness, max_queue_bytes=100)
    _, client = world.connect("s")
    world.publish("s", {"type": "report_generated", "report": "r" * 5_000})
    assert client.types() == ["connected", "report_generated"]
    assert client.closed is None


def test_replay_is_written_in_parts_and_does_not_count_towards_the_limit(harness):
    world = World(harness, max_queue_bytes=10_000)
    for i in range(100):
        world.publish("s", {"type": "task_started", "task_id": f"t{i}", "pad": "p" * 2_000})
    transport = RecordingTransport(auto_flush=False)
    ref, _ = world.connect("s", transport=transport)
    assert transport.closed is None
    assert len(transport.writes) == 1  # one part in flight, the rest waits for the socket
    first = sum(len(b) for b in transport.writes[0])
    assert first <= 64 * 1024 + 2_200
    assert ref.ask(DescribeConnection())["queued_bytes"] == 0
    while True:
        before = len(transport.writes)
        transport.flush()
        harness.run_until_idle()
        if len(transport.writes) == before:
            break
    assert seqs(transport) == list(range(1, 101))


def test_live_messages_during_replay_follow_it_without_duplicates(harness):
    world = World(harness, buffer_size=500)
    for i in range(50):
        world.publish("s", {"type": "task_started", "task_id": f"t{i}", "pad": "p" * 2_000})
    transport = RecordingTransport(auto_flush=False)
    world.connect("s", transport=transport)
    for i in range(50, 80):
        world.publish("s", {"type": "task_started", "task_id": f"t{i}"})
    for _ in range(20):
        transport.flush()
        harness.run_until_idle()
    assert seqs(transport) == list(range(1, 81))


def test_keepalive_on_an_idle_connection_only(harness):
    world = World(harness, keepalive_interval=25)
    _, client = world.connect("s")
    harness.advance(24)
    world.publish("s", {"type": "session_started"})
    harness.advance(24)  # 48 s in, but the last write was 24 s ago
    assert "keepalive" not in client.types()
    harness.advance(1)
    assert client.types()[-1] == "keepalive"
    harness.advance(25)
    assert client.types().count("keepalive") == 2


def test_client_errors_close_1008_only_past_the_limit_within_60_seconds(harness):
    from actors.messages import ClientMessage

    world = World(harness, max_client_errors=3)
    ref, client = world.connect("s")
    for _ in range(3):
        ref.tell(ClientMessage("not json"))
        harness.advance(25)  # spread over 75 s: never more than 3 in a window
    ref.tell(ClientMessage("not json"))
    harness.run_until_idle()
    assert client.closed is None
    ref.tell(ClientMessage("{}"))  # errors at 25, 50, 75, 75 s: four within 60 s
    ref.tell(ClientMessage('{"type": "nope"}'))  # after the close: not answered
    harness.run_until_idle()
    assert [m.get("code") for m in client.messages if m["type"] == "error"] == [
        "bad_json",
        "bad_json",
        "bad_json",
        "bad_json",
        "bad_message",
    ]
    assert client.closed == (1008, "too many invalid messages")


def test_a_failed_write_cleans_the_connection_up(world):
    transport = RecordingTransport()
    _, transport = world.connect("s", transport=transport)
    transport.fail_writes = True
    world.publish("s", {"type": "session_started"})
    world.h.run_until_idle()
    assert world.stats.active_connections == 0
    assert world.describe("s")["connections"] == []


def test_connection_describes_acked_seq(world):
    from actors.messages import ClientMessage

    ref, _ = world.connect("s")
    ref.tell(ClientMessage('{"type": "ack", "seq": 7}'))
    ref.tell(ClientMessage('{"type": "ack", "seq": 3}'))  # acks never go back
    assert ref.ask(DescribeConnection()) == {"acked_seq": 7, "queued_bytes": 0, "transport": "recording"}


def test_a_reload_applies_buffer_size_and_throttle_settings_to_existing_sessions(harness):
    world = World(harness, buffer_size=10)
    for i in range(10):
        world.publish("s", {"type": "task_started", "task_id": f"t{i}"})
    world.broker.settings = world.broker.settings.replace(buffer_size=4, min_delta=50)
    harness.run_until_idle()
    assert world.describe("s")["buffered_messages"] == 4  # at once, without a publish
    assert world.stats.total_buffered_messages == 4
    _, client = world.connect("s", replay="none")
    world.progress("s", "p", 10)
    assert world.progress("s", "p", 40) is None  # under the new min_delta of 50
    assert progress_values(client) == [10]


def test_writes_record_publish_to_write_latency(harness):
    world = World(harness)
    _, client = world.connect("s", transport=RecordingTransport(auto_flush=False))
    world.publish("s", {"type": "session_started"})  # queued behind the greeting in flight
    harness.advance(0.02)
    client.flush()
    harness.run_until_idle()
    histogram = world.stats.write_latency
    assert sum(histogram.counts) == 1
    assert histogram.total == pytest.approx(0.02)


def test_a_peer_that_stops_answering_pings_is_closed_after_the_ping_timeout(harness):
    world = World(harness, ws_ping_interval=20, ws_ping_timeout=10, keepalive_interval=0)
    _, alive = world.connect("s")
    _, dead = world.connect("s", transport=RecordingTransport())
    dead.answers_pings = False
    harness.advance(20)
    assert alive.pings == dead.pings == 1
    harness.advance(9.9)
    assert dead.closed is None
    harness.advance(0.1)
    assert dead.closed == (1000, "ping timed out")
    assert world.stats.active_connections == 1
    harness.advance(60)
    assert alive.closed is None and alive.pings == 4
