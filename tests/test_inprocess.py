"""In-process publishing (broker.events, Broker.publish_events, Broker.emit) and POST /api/broadcast.

Wire tests run the real application on a real port; publishers call the
Broker object directly, from the loop or from other threads.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

import pytest

from broker import events
from broker.testing import WebSocketClient
from broker.validation import ValidationFailed, normalize_events
from tests.support.wire import next_message, post_json, session_info, session_messages


async def nothing_queued(client: WebSocketClient) -> None:
    """Whatever was queued for the client before now has been read: the pong comes next."""
    await client.send({"type": "ping"})
    message = await next_message(client)
    assert message["type"] == "pong", message


# -- 1. the typed constructors --------------------------------------------------------------


@pytest.mark.parametrize(
    ("built", "expected"),
    [
        (events.session_started("s", query="q"), {"type": "session_started", "session_id": "s", "query": "q"}),
        (events.session_completed("s"), {"type": "session_completed", "session_id": "s"}),
        (events.session_cancelled("s", reason="r"), {"type": "session_cancelled", "session_id": "s", "reason": "r"}),
        (
            events.plan_generated("s", {"steps": [1, 2]}),
            {"type": "plan_generated", "session_id": "s", "plan": {"steps": [1, 2]}},
        ),
        (
            events.task_started("s", "t1", title="x"),
            {"type": "task_started", "session_id": "s", "task_id": "t1", "title": "x"},
        ),
        (
            events.task_progress("s", "t1", 40),
            {"type": "task_progress", "session_id": "s", "task_id": "t1", "progress": 40},
        ),
        (
            events.task_progress("s", "t1", 40.5, "reading"),
            {
                "type": "task_progress",
                "session_id": "s",
                "task_id": "t1",
                "progress": 40.5,
                "current_action": "reading",
            },
        ),
        (events.task_completed("s", "t1"), {"type": "task_completed", "session_id": "s", "task_id": "t1"}),
        (
            events.task_failed("s", "t1", "boom"),
            {"type": "task_failed", "session_id": "s", "task_id": "t1", "error": "boom"},
        ),
        (events.report_generated("s", ["r"]), {"type": "report_generated", "session_id": "s", "report": ["r"]}),
        (events.query_start("s", "why"), {"type": "query_start", "session_id": "s", "query": "why"}),
        (
            events.chunk("s", "text", 3),
            {"type": "chunk", "session_id": "s", "content": "text", "chunk_number": 3},
        ),
        (
            events.complete("s", "full", 2),
            {"type": "complete", "session_id": "s", "full_response": "full", "total_chunks": 2},
        ),
        (events.error("s", "bad", code="x"), {"type": "error", "session_id": "s", "error": "bad", "code": "x"}),
        (
            events.system_notification("s", "hello"),
            {"type": "system_notification", "session_id": "s", "message": "hello"},
        ),
        (events.event("custom.kind", "s", n=1), {"type": "custom.kind", "session_id": "s", "n": 1}),
        (
            events.task_started("s", "t1", event_id="e1", correlation_id="c1"),
            {"type": "task_started", "session_id": "s", "task_id": "t1", "event_id": "e1", "correlation_id": "c1"},
        ),
    ],
    ids=lambda value: value["type"] if isinstance(value, dict) and "event_id" not in value else None,
)
def test_constructors_build_the_documented_flat_shapes(built, expected):
    assert built == expected
    # and the broker takes them as they are (every required field is there and well typed)
    (normalized,) = normalize_events([built], session_id=None, now=0.0)
    assert {k: normalized[k] for k in built} == built


def test_task_progress_without_current_action_leaves_it_out():
    assert "current_action" not in events.task_progress("s", "t1", 10)


# -- 2. Broker.publish_events on the loop ---------------------------------------------------------


async def test_publish_events_returns_seqs_and_a_connected_client_receives_them(broker, connect):
    client, hello = await connect("p1", research=True)
    seqs = await broker.publish_events(
        events.session_started("p1", query="q"),
        events.task_started("p1", "t1"),
        events.task_progress("p1", "t1", 10),
        events.task_progress("p1", "t1", 11),  # held by throttling: no seq yet
        events.task_completed("p1", "t1", result="done"),
    )
    assert seqs == [1, 2, 3, None, 4]
    got = await session_messages(client, 4)
    assert [(m["type"], m["seq"]) for m in got] == [
        ("session_started", 1),
        ("task_started", 2),
        ("task_progress", 3),
        ("task_completed", 4),
    ]
    assert all(m["epoch"] == hello["epoch"] and m["session_id"] == "p1" for m in got)
    assert got[0]["query"] == "q" and got[3]["result"] == "done"
    assert all(m["event_id"] and m["correlation_id"] and m["timestamp"] for m in got)


async def test_publish_events_to_several_sessions_keeps_the_callers_order(broker, connect):
    one, _ = await connect("p2a", research=True)
    two, _ = await connect("p2b", research=True)
    seqs = await broker.publish_events(
        events.task_started("p2a", "a1"),
        events.task_started("p2b", "b1"),
        events.task_started("p2a", "a2"),
    )
    assert seqs == [1, 1, 2]
    assert [m["task_id"] for m in await session_messages(one, 2)] == ["a1", "a2"]
    assert [m["task_id"] for m in await session_messages(two, 1)] == ["b1"]


async def test_publish_events_with_a_bad_event_raises_and_publishes_nothing(broker, connect):
    client, _ = await connect("p3", research=True)
    with pytest.raises(ValidationFailed) as failed:
        await broker.publish_events(events.task_started("p3", "t1"), events.task_progress("p3", "t1", 150))
    assert failed.value.details[0]["index"] == 1 and failed.value.details[0]["field"] == "progress"
    assert await broker.publish_events(events.system_notification("p3", "marker")) == [1]
    (marker,) = await session_messages(client, 1)
    assert marker["type"] == "system_notification" and marker["seq"] == 1


# -- 3. Broker.emit from other threads ----------------------------------------------------------


async def test_emit_from_four_threads_at_once_delivers_everything_in_order_per_thread(broker, connect):
    workers, per_worker = 4, 50
    client, _ = await connect("e1", research=True, timeout=10.0)
    barrier = threading.Barrier(workers)
    failures: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            barrier.wait(timeout=10)
            for n in range(per_worker):
                if n % 10 == 9:  # some batches too: a batch keeps its order
                    broker.emit(events.event("work.step", "e1", worker=worker, n=n, batch=True))
                else:
                    broker.emit(events.task_started("e1", f"w{worker}-{n}", worker=worker, n=n))
        except BaseException as exc:
            failures.append(exc)
            raise

    threads = [threading.Thread(target=work, args=(w,), name=f"emitter-{w}") for w in range(workers)]
    for thread in threads:
        thread.start()
    got = await session_messages(client, workers * per_worker)
    for thread in threads:
        thread.join(timeout=10)
    assert not failures
    assert [m["seq"] for m in got] == list(range(1, workers * per_worker + 1))
    by_worker: dict[int, list[int]] = defaultdict(list)
    for message in got:
        by_worker[message["worker"]].append(message["n"])
    assert by_worker == {w: list(range(per_worker)) for w in range(workers)}
    await nothing_queued(client)  # and nothing twice


async def test_emit_from_the_loop_thread_delivers_too(broker, connect):
    client, _ = await connect("e2", research=True)
    broker.emit(events.task_started("e2", "t1"), events.task_completed("e2", "t1"))
    got = await session_messages(client, 2)
    assert [(m["type"], m["seq"]) for m in got] == [("task_started", 1), ("task_completed", 2)]


async def test_emit_with_a_bad_event_raises_in_the_caller_and_publishes_nothing(broker, connect):
    client, _ = await connect("e3", research=True)
    # on the loop thread
    with pytest.raises(ValidationFailed):
        broker.emit(events.task_started("e3", "ok"), {"type": "task_progress", "session_id": "e3", "task_id": "t1"})
    # and in another thread, where the emitter's own code sees it
    raised: list[ValidationFailed] = []

    def bad_emitter() -> None:
        try:
            broker.emit(events.task_started("e3", "ok2"), events.chunk("e3", "x", 0))
        except ValidationFailed as exc:  # anything else escapes the thread and fails the test
            raised.append(exc)

    thread = threading.Thread(target=bad_emitter)
    thread.start()
    thread.join(timeout=10)
    assert len(raised) == 1
    assert raised[0].details == [{"index": 1, "field": "chunk_number", "error": raised[0].details[0]["error"]}]
    # nothing of either batch was published: the next session message is the marker, with seq 1
    assert await broker.publish_events(events.system_notification("e3", "marker")) == [1]
    (marker,) = await session_messages(client, 1)
    assert marker["message"] == "marker" and marker["seq"] == 1


# -- 4. POST /api/broadcast ------------------------------------------------------------------------


async def broadcast(http: Any, body: Any) -> tuple[int, dict[str, Any]]:
    return await post_json(http, "/api/broadcast", body)


def delivered(count: int, backend: str) -> dict[str, int]:
    """The broadcast answer: a Redis node also says how many nodes it reached (docs/protocol.md section 7)."""
    return {"delivered": count, "nodes": 1} if backend == "redis" else {"delivered": count}


async def test_broadcast_reaches_every_connection_outside_exclude(http_server_client, broker, connect, backend):
    s1a, _ = await connect("s1", research=True)
    s1b, _ = await connect("s1", events="essential")  # filters do not apply to broadcasts
    s2, _ = await connect("s2", research=True)
    s3, _ = await connect("s3")
    await broker.publish_events(events.task_started("idle", "t1"))  # a session with no connection
    code, body = await broadcast(http_server_client, {"type": "system_notification", "message": "m", "exclude": ["s2"]})
    assert (code, body) == (202, delivered(3, backend))
    for client in (s1a, s1b, s3):
        notice = await next_message(client)
        assert notice["type"] == "system_notification" and notice["message"] == "m"
        assert "seq" not in notice and "epoch" not in notice and "exclude" not in notice
        assert notice["timestamp"]
    await nothing_queued(s2)  # the excluded session got nothing
    for client in (s1a, s1b, s3):
        await nothing_queued(client)  # and the others got it once


async def test_broadcast_enters_no_history(http_server_client, broker, connect, backend):
    first, hello = await connect("h1", research=True)
    await broker.publish_events(events.task_started("h1", "t1"))
    await session_messages(first, 1)
    code, body = await broadcast(http_server_client, {"type": "system_notification", "message": "gone"})
    assert (code, body) == (202, delivered(1, backend))
    assert (await next_message(first))["message"] == "gone"
    later, again = await connect("h1", research=True, replay="all")
    assert again["last_seq"] == 1 and again["epoch"] == hello["epoch"]
    (replayed,) = await session_messages(later, 1)
    assert replayed["type"] == "task_started"
    await nothing_queued(later)
    missed, _ = await connect("h1", last_seq=0)
    assert [m["type"] for m in await session_messages(missed, 1)] == ["task_started"]
    await nothing_queued(missed)
    code, info = await session_info(http_server_client, "h1")
    assert (code, info["buffered_messages"]) == (200, 1)


async def test_broadcast_of_another_type_and_to_nobody(http_server_client, connect, backend):
    code, body = await broadcast(http_server_client, {"type": "system_notification", "message": "empty"})
    assert (code, body) == (202, delivered(0, backend))
    client, _ = await connect("o1", research=True)
    code, body = await broadcast(http_server_client, {"type": "maintenance.window", "starts": "soon"})
    assert (code, body) == (202, delivered(1, backend))
    notice = await next_message(client)
    assert notice["type"] == "maintenance.window" and notice["starts"] == "soon" and "seq" not in notice


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"type": "system_notification"}, "message"),
        ({"type": "system_notification", "message": 5}, "message"),
        ({"message": "m", "exclude": "s2"}, "exclude"),
        ({"message": "m", "exclude": ["s2", 3]}, "exclude"),
        ({"type": "Bad Type", "message": "m"}, "type"),
        ({"type": "system_notification", "message": "m", "seq": 1}, "seq"),
        ({"type": "system_notification", "message": "m", "epoch": "e"}, "epoch"),
    ],
    ids=["no-message", "message-number", "exclude-string", "exclude-item", "bad-type", "seq", "epoch"],
)
async def test_bad_broadcast_bodies_are_422(http_server_client, connect, body, field):
    client, _ = await connect("b1", research=True)
    code, answer = await broadcast(http_server_client, body)
    assert code == 422, answer
    assert isinstance(answer["error"], str)
    assert field in [d["field"] for d in answer["details"]]
    await nothing_queued(client)  # nothing was sent


@pytest.mark.parametrize(
    ("raw", "status"),
    [(b"not json", 400), (b'[{"message": "m"}]', 400)],
    ids=["not-json", "array"],
)
async def test_unreadable_broadcast_bodies(http_server_client, raw, status):
    code, answer = await broadcast(http_server_client, raw)
    assert code == status and isinstance(answer["error"], str)
