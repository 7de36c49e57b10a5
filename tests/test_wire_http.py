"""The HTTP API over a real socket, as a publisher or an operator sees it.

docs/protocol.md sections 2 and 4: publishing (`POST /api/sessions/{id}/events`,
`POST /api/events`), what connected clients receive, throttling and
idempotency as seen in the answers, the error table, session inspection and
deletion, stats, request ids and probes, and publisher auth.

Nothing here sleeps: a WebSocket client's next message (bounded by its
timeout) is the only wait, and "nothing else was delivered" is shown by a
marker event published afterwards arriving next (a session delivers in
publish order).
"""

from __future__ import annotations

import asyncio
import re
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from tornado.httpclient import HTTPResponse

from tests.support import with_settings
from tests.support.wire import get_json, json_of, post, post_events, publish, send_raw, stats

JSON = "application/json"
NDJSON = "application/x-ndjson"
TIMESTAMP_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z\Z")

SESSION_FIELDS = [
    "session_id",
    "epoch",
    "last_seq",
    "connections",
    "buffered_messages",
    "created_at",
    "last_event_at",
]
CONNECTION_FIELDS = ["connection_id", "user_id", "events", "acked_seq", "queued_bytes", "transport"]
STATS_FIELDS = [
    "status",
    "active_connections",
    "active_sessions",
    "total_buffered_messages",
    "sessions_with_buffer",
    "total_messages_sent",
    "total_events_received",
    "throttled_events",
    "slow_consumer_disconnects",
    "connected_sessions",
    "uptime_seconds",
]
ESSENTIAL = sorted(
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
STATS_PATHS = ["/api/websocket/stats", "/ws/health"]








# --------------------------------------------------------------------------
# Helpers: speak HTTP the way a publisher would


def progress(value: float, task_id: str = "t1", **extra: Any) -> dict[str, Any]:
    return {"type": "task_progress", "task_id": task_id, "progress": value, **extra}


def marker(name: str = "end", **extra: Any) -> dict[str, Any]:
    """An event of a custom type, published last to show what came before it."""
    return {"type": "test.marker", "name": name, **extra}


def ndjson(events: list[dict[str, Any]], newline: bytes = b"\n") -> bytes:
    return b"".join(orjson.dumps(event) + newline for event in events)


async def raw_request(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (no client defaults added); return status, headers, body."""
    data = await send_raw(port, request, timeout=5)
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def blocking_post(port: int, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    """POST as a plain stdlib publisher does: the whole body first, then read the answer.

    Runs in a thread (the server needs the loop); a reset connection raises.
    """
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


async def stdlib_post(port: int, path: str, body: bytes, headers: dict[str, str] | None = None):
    sent = {"Content-Type": JSON, **(headers or {})}
    return await asyncio.get_running_loop().run_in_executor(None, blocking_post, port, path, body, sent)


def assert_timestamp(value: Any) -> datetime:
    assert isinstance(value, str) and TIMESTAMP_RE.match(value), value
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


# --------------------------------------------------------------------------
# 1. POST /api/sessions/{id}/events


async def test_single_event_is_accepted_with_seq_1(http_server_client):
    response = await post_events(http_server_client, "s1", {"type": "task_started", "task_id": "t1"})
    assert response.code == 202
    assert json_of(response) == {"accepted": 1, "seq": [1]}


async def test_json_array_gets_seqs_in_order(http_server_client):
    events = [{"type": "task_started", "task_id": f"t{i}"} for i in range(3)]
    assert await publish(http_server_client, "s1", events) == [1, 2, 3]
    response = await post_events(http_server_client, "s1", events[:2])
    assert json_of(response) == {"accepted": 2, "seq": [4, 5]}


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"], ids=["lf", "crlf"])
async def test_ndjson_batch_gets_seqs_in_order(http_server_client, newline):
    events = [{"type": "task_started", "task_id": f"t{i}"} for i in range(3)]
    body = ndjson(events, newline) + newline  # a blank line at the end is fine
    response = await post(http_server_client, "/api/sessions/s1/events", body, NDJSON)
    assert response.code == 202
    assert json_of(response) == {"accepted": 3, "seq": [1, 2, 3]}


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json; charset=utf-8",
        "application/json;charset=UTF-8",
        "application/x-ndjson; charset=utf-8",
    ],
)
async def test_charset_utf8_parameter_is_accepted(http_server_client, content_type):
    body = orjson.dumps({"type": "task_started", "task_id": "t1"})
    response = await post(http_server_client, "/api/sessions/s1/events", body, content_type)
    assert response.code == 202
    assert json_of(response) == {"accepted": 1, "seq": [1]}


async def test_event_may_repeat_the_session_id_of_the_path(http_server_client, connect):
    client, _ = await connect("s1", research=True)
    assert await publish(http_server_client, "s1", {"type": "session_started", "session_id": "s1"}) == [1]
    assert await publish(http_server_client, "s1", {"type": "session_started"}) == [2]
    first = await client.expect(type="session_started", seq=1)
    second = await client.expect(type="session_started", seq=2)
    assert first["session_id"] == second["session_id"] == "s1"


async def test_event_naming_another_session_than_the_path_is_422(http_server_client):
    response = await post_events(http_server_client, "s1", {"type": "session_started", "session_id": "s2"})
    assert response.code == 422
    body = json_of(response)
    assert isinstance(body["error"], str) and body["error"]
    [detail] = body["details"]
    assert detail["index"] == 0 and detail["field"] == "session_id"
    assert isinstance(detail["error"], str) and detail["error"]
    for session_id in ("s1", "s2"):
        code, _ = await get_json(http_server_client, f"/api/sessions/{session_id}")
        assert code == 404


# --------------------------------------------------------------------------
# 2. POST /api/events


async def test_batch_of_several_sessions_gets_per_session_seqs_in_order(http_server_client, connect):
    assert await publish(http_server_client, "a", {"type": "session_started"}) == [1]
    client_a, _ = await connect("a", research=True, replay="none")
    client_b, _ = await connect("b", research=True, replay="none")
    batch = [
        {"type": "task_started", "session_id": "a", "task_id": "a1"},
        {"type": "task_started", "session_id": "b", "task_id": "b1"},
        {"type": "task_started", "session_id": "a", "task_id": "a2"},
        {"type": "task_started", "session_id": "c", "task_id": "c1"},
        {"type": "task_started", "session_id": "b", "task_id": "b2"},
    ]
    response = await post_events(http_server_client, None, batch)
    assert response.code == 202
    assert json_of(response) == {"accepted": 5, "seq": [2, 1, 3, 1, 2]}
    await client_a.expect(task_id="a1", seq=2, session_id="a")
    await client_a.expect(task_id="a2", seq=3, session_id="a")
    await client_b.expect(task_id="b1", seq=1, session_id="b")
    await client_b.expect(task_id="b2", seq=2, session_id="b")


async def test_ndjson_batch_of_several_sessions(http_server_client):
    batch = [
        {"type": "session_started", "session_id": "a"},
        {"type": "session_started", "session_id": "b"},
        {"type": "session_completed", "session_id": "a"},
    ]
    response = await post(http_server_client, "/api/events", ndjson(batch), NDJSON)
    assert response.code == 202
    assert json_of(response) == {"accepted": 3, "seq": [1, 1, 2]}


async def test_batch_event_without_session_id_is_422_naming_its_index(http_server_client):
    batch = [
        {"type": "session_started", "session_id": "a"},
        {"type": "session_started"},
    ]
    response = await post_events(http_server_client, None, batch)
    assert response.code == 422
    body = json_of(response)
    assert [(d["index"], d["field"]) for d in body["details"]] == [(1, "session_id")]
    code, _ = await get_json(http_server_client, "/api/sessions/a")
    assert code == 404, "nothing of a rejected batch is published"


# --------------------------------------------------------------------------
# 3. What a connected client receives


async def test_client_receives_the_event_flat_with_seq_and_epoch(http_server_client, connect):
    client, hello = await connect("s1", research=True)
    event = {
        "type": "report_generated",
        "report": {"title": "Findings", "sections": [{"h": "one"}, {"h": "two"}]},
        "score": 0.75,
        "tags": ["a", "b"],
    }
    await publish(http_server_client, "s1", event)
    message = await client.expect(type="report_generated", seq=1, epoch=hello["epoch"])
    assert "data" not in message
    assert message["session_id"] == "s1"
    generated = {"event_id", "correlation_id", "timestamp", "session_id", "seq", "epoch"}
    assert {k: v for k, v in message.items() if k not in generated} == event


async def test_any_well_formed_custom_type_is_delivered(http_server_client, connect):
    client, _ = await connect("s1", research=True)
    await publish(http_server_client, "s1", {"type": "build.step_2", "anything": {"goes": None}})
    message = await client.expect(type="build.step_2", seq=1)
    assert message["anything"] == {"goes": None}


async def test_event_id_correlation_id_and_timestamp_are_generated_when_absent(http_server_client, connect):
    client, _ = await connect("s1", research=True)
    before = datetime.now(UTC).replace(microsecond=0)
    await publish(http_server_client, "s1", [{"type": "session_started"}, {"type": "session_completed"}])
    first = await client.expect(type="session_started", seq=1)
    second = await client.expect(type="session_completed", seq=2)
    for message in (first, second):
        for name in ("event_id", "correlation_id"):
            assert isinstance(message[name], str) and 0 < len(message[name]) <= 128
        stamp = assert_timestamp(message["timestamp"])
        assert before <= stamp <= datetime.now(UTC)
    assert first["event_id"] != second["event_id"]
    assert first["correlation_id"] != second["correlation_id"]


async def test_event_id_correlation_id_and_timestamp_are_kept_when_given(http_server_client, connect):
    client, _ = await connect("s1", research=True)
    given = {"event_id": "ev-42", "correlation_id": "req-7", "timestamp": "2025-10-25T12:34:56.123Z"}
    await publish(http_server_client, "s1", {"type": "session_started", **given})
    message = await client.expect(type="session_started", seq=1)
    assert {name: message[name] for name in given} == given


async def test_a_given_timestamp_reaches_clients_in_the_protocol_form(http_server_client, connect):
    client, _ = await connect("s1", research=True)
    await publish(http_server_client, "s1", {"type": "session_started", "timestamp": "2025-10-25T14:34:56.5+02:00"})
    message = await client.expect(type="session_started", seq=1)
    assert message["timestamp"] == "2025-10-25T12:34:56.500Z"


async def test_a_timestamp_that_is_not_iso_8601_is_422_and_publishes_nothing(http_server_client, connect):
    client, _ = await connect("s1", research=True)
    batch = [{"type": "session_started"}, {"type": "task_started", "task_id": "t", "timestamp": "last tuesday"}]
    response = await post_events(http_server_client, "s1", batch)
    assert response.code == 422
    [detail] = json_of(response)["details"]
    assert (detail["index"], detail["field"]) == (1, "timestamp")
    await publish(http_server_client, "s1", {"type": "session_completed"})
    assert (await client.expect(type="session_completed"))["seq"] == 1, "nothing of the bad batch was published"


# --------------------------------------------------------------------------
# 4. Throttling of task_progress, as seen in the answers
#
# A long max_interval keeps the trailing edge out of the way, except in the
# tests about it.

no_trailing_edge = with_settings(max_interval_ms=60_000)


@no_trailing_edge
async def test_progress_within_min_delta_is_held_and_a_big_step_is_delivered(http_server_client):
    assert await publish(http_server_client, "s1", [progress(10), progress(12)]) == [1, None]
    assert await publish(http_server_client, "s1", progress(20)) == [2]


@no_trailing_edge
async def test_progress_0_and_100_are_always_delivered(http_server_client):
    events = [progress(3), progress(0), progress(98), progress(100), progress(100), progress(99)]
    assert await publish(http_server_client, "s1", events) == [1, 2, 3, 4, 5, None]


@no_trailing_edge
async def test_progress_with_a_new_current_action_is_delivered(http_server_client):
    events = [
        progress(10, current_action="reading"),
        progress(11, current_action="reading"),
        progress(11, current_action="writing"),
    ]
    assert await publish(http_server_client, "s1", events) == [1, None, 2]


@no_trailing_edge
async def test_progress_after_task_completed_is_never_delivered(http_server_client, connect):
    client, _ = await connect("s1", research=True)
    seqs = await publish(
        http_server_client,
        "s1",
        [progress(10), {"type": "task_completed", "task_id": "t1"}, progress(50)],
    )
    assert seqs == [1, 2, None]
    assert await publish(http_server_client, "s1", marker()) == [3]
    await client.expect(type="task_progress", progress=10, seq=1)
    await client.expect(type="task_completed", seq=2)
    await client.expect(type="test.marker", seq=3)


@no_trailing_edge
async def test_throttled_events_counts_the_progress_never_delivered(http_server_client):
    assert (await stats(http_server_client))["throttled_events"] == 0
    await publish(http_server_client, "s1", [progress(10), progress(11), progress(12)])  # 11 superseded
    assert (await stats(http_server_client))["throttled_events"] == 1
    await publish(http_server_client, "s1", {"type": "task_completed", "task_id": "t1"})  # 12 discarded
    assert (await stats(http_server_client))["throttled_events"] == 2
    await publish(http_server_client, "s1", progress(60))  # after completion
    assert (await stats(http_server_client))["throttled_events"] == 3


@with_settings(max_interval_ms=50)
async def test_held_progress_is_delivered_within_max_interval_with_the_next_seq(http_server_client, connect):
    client, _ = await connect("s1", research=True)
    seqs = await publish(
        http_server_client,
        "s1",
        [progress(10), progress(12), {"type": "task_started", "task_id": "t2"}],
    )
    assert seqs == [1, None, 2]
    await client.expect(type="task_progress", progress=10, seq=1)
    await client.expect(type="task_started", task_id="t2", seq=2)
    # The held one gets its seq when it is finally delivered: after t2's.
    await client.expect(type="task_progress", progress=12, seq=3)
    code, session = await get_json(http_server_client, "/api/sessions/s1")
    assert code == 200 and session["last_seq"] == 3
    assert (await stats(http_server_client))["throttled_events"] == 0


# --------------------------------------------------------------------------
# 5. Idempotent publishing


async def test_repeated_event_id_answers_the_first_seq_and_is_not_delivered_again(http_server_client, connect):
    client, _ = await connect("s1", research=True)
    event = {"type": "task_started", "task_id": "t1", "event_id": "ev-1"}
    assert await publish(http_server_client, "s1", event) == [1]
    response = await post_events(http_server_client, "s1", event)
    assert response.code == 202
    assert json_of(response) == {"accepted": 1, "seq": [1]}
    assert await publish(http_server_client, "s1", marker()) == [2]
    await client.expect(type="task_started", event_id="ev-1", seq=1)
    await client.expect(type="test.marker", seq=2)


async def test_repeated_event_id_inside_one_batch_is_delivered_once(http_server_client, connect):
    client, _ = await connect("s1", research=True)
    event = {"type": "task_started", "task_id": "t1", "event_id": "ev-1"}
    response = await post_events(http_server_client, "s1", [event, event, marker()])
    assert response.code == 202
    assert json_of(response) == {"accepted": 3, "seq": [1, 1, 2]}
    await client.expect(type="task_started", seq=1)
    await client.expect(type="test.marker", seq=2)


async def test_retried_batch_publishes_nothing_twice(http_server_client):
    batch = [{"type": "task_started", "task_id": f"t{i}", "event_id": f"ev-{i}"} for i in range(3)]
    assert await publish(http_server_client, "s1", batch) == [1, 2, 3]
    assert await publish(http_server_client, "s1", batch) == [1, 2, 3]
    code, session = await get_json(http_server_client, "/api/sessions/s1")
    assert code == 200 and session["last_seq"] == 3


@no_trailing_edge
async def test_repeated_held_progress_answers_null(http_server_client):
    assert await publish(http_server_client, "s1", progress(10, event_id="p-10")) == [1]
    assert await publish(http_server_client, "s1", progress(12, event_id="p-12")) == [None]
    assert await publish(http_server_client, "s1", progress(12, event_id="p-12")) == [None]
    assert (await stats(http_server_client))["throttled_events"] == 0, "a repeat is not a new event"


@with_settings(max_interval_ms=50)
async def test_repeated_progress_answers_the_seq_it_got_once_delivered(http_server_client, connect):
    client, _ = await connect("s1", research=True)
    assert await publish(http_server_client, "s1", [progress(10), progress(12, event_id="p-12")]) == [1, None]
    await client.expect(type="task_progress", progress=10, seq=1)
    await client.expect(type="task_progress", progress=12, seq=2)
    assert await publish(http_server_client, "s1", progress(12, event_id="p-12")) == [2]
    assert await publish(http_server_client, "s1", marker()) == [3]
    await client.expect(type="test.marker", seq=3)


# --------------------------------------------------------------------------
# 6. Errors


def assert_error(response: HTTPResponse, status: int) -> dict[str, Any]:
    assert response.code == status, (response.code, response.body)
    body = json_of(response)
    assert isinstance(body.get("error"), str) and body["error"], body
    return body


VALID = orjson.dumps({"type": "session_started"})

BODY_ERRORS = [
    pytest.param(JSON, b'{"type": "session_started",', 400, id="bad-json"),
    pytest.param(JSON, b"\xff\xfe{}", 400, id="not-utf8"),
    pytest.param(JSON, b"[]", 400, id="empty-array"),
    pytest.param(JSON, b"", 400, id="empty-body"),
    pytest.param(JSON, b"  \n", 400, id="blank-body"),
    pytest.param(JSON, b'"session_started"', 400, id="json-string"),
    pytest.param(NDJSON, b"", 400, id="empty-ndjson"),
    pytest.param(NDJSON, VALID + b"\n{oops\n", 400, id="bad-ndjson-line"),
    pytest.param("text/plain", VALID, 415, id="text-plain"),
    pytest.param("application/x-www-form-urlencoded", VALID, 415, id="form"),
    pytest.param("application/json; charset=latin-1", VALID, 415, id="other-charset"),
]


@pytest.mark.parametrize("path", ["/api/sessions/s1/events", "/api/events"])
@pytest.mark.parametrize(("content_type", "body", "status"), BODY_ERRORS)
async def test_unreadable_body_is_answered_with_json_error(http_server_client, path, content_type, body, status):
    response = await post(http_server_client, path, body, content_type)
    assert_error(response, status)
    assert (await stats(http_server_client))["total_events_received"] == 0


async def test_missing_content_type_is_415(http_server_client, port):
    # Tornado's client adds a form Content-Type to every POST; send the bytes ourselves.
    request = (
        b"POST /api/sessions/s1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(VALID), VALID)
    )
    status, headers, body = await raw_request(port, request)
    assert status == 415
    assert headers["content-type"].startswith(JSON)
    assert isinstance(orjson.loads(body)["error"], str)
    code, _ = await get_json(http_server_client, "/api/sessions/s1")
    assert code == 404


def body_of_size(size: int) -> bytes:
    """A valid one-event JSON body of exactly `size` bytes."""
    empty = orjson.dumps({"type": "test.padding", "pad": ""})
    body = orjson.dumps({"type": "test.padding", "pad": "x" * (size - len(empty))})
    assert len(body) == size
    return body


def chunked(body: bytes, piece: int = 16 * 1024) -> dict[str, Any]:
    """fetch() arguments that send `body` without Content-Length, in chunks."""

    async def producer(write):
        for start in range(0, len(body), piece):
            await write(body[start : start + piece])

    return {"body_producer": producer}


async def post_sized(client: Any, body: bytes, transfer: str) -> HTTPResponse:
    if transfer == "content-length":
        return await post(client, "/api/sessions/s1/events", body)
    return await client.fetch(
        "/api/sessions/s1/events",
        method="POST",
        headers={"Content-Type": JSON},
        raise_error=False,
        **chunked(body),
    )


small_bodies = with_settings(max_body_size=1024)
transfers = pytest.mark.parametrize("transfer", ["content-length", "chunked"])


@small_bodies
@transfers
@pytest.mark.parametrize("size", [1025, 64 * 1024, 4 * 1024 * 1024], ids=["1025B", "64KiB", "4MiB"])
async def test_body_over_max_body_size_is_answered_413(http_server_client, transfer, size):
    response = await post_sized(http_server_client, body_of_size(size), transfer)
    assert_error(response, 413)
    code, _ = await get_json(http_server_client, "/api/sessions/s1")
    assert code == 404


@small_bodies
@transfers
async def test_body_of_exactly_max_body_size_is_accepted(http_server_client, transfer):
    response = await post_sized(http_server_client, body_of_size(1024), transfer)
    assert response.code == 202, response.body
    assert json_of(response) == {"accepted": 1, "seq": [1]}


@small_bodies
@pytest.mark.parametrize("size", [1025, 4 * 1024 * 1024], ids=["1025B", "4MiB"])
async def test_413_reaches_a_client_that_sends_its_whole_body_before_reading(http_server_client, port, size):
    status, body = await stdlib_post(port, "/api/sessions/s1/events", body_of_size(size))
    assert status == 413
    assert isinstance(orjson.loads(body)["error"], str)


@pytest.mark.parametrize("size", [1024 * 1024 + 1, 8 * 1024 * 1024], ids=["1MiB+1", "8MiB"])
async def test_body_over_the_default_limit_is_answered_413(http_server_client, port, size):
    status, body = await stdlib_post(port, "/api/sessions/s1/events", body_of_size(size))
    assert status == 413
    assert isinstance(orjson.loads(body)["error"], str)


@small_bodies
async def test_client_expecting_100_continue_gets_413_before_sending_the_body(http_server_client, port):
    request = (
        b"POST /api/sessions/s1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: 4194304\r\n\r\n"
    )
    status, headers, body = await raw_request(port, request)
    assert status == 413
    assert headers["content-type"].startswith(JSON)
    assert isinstance(orjson.loads(body)["error"], str)


@pytest.mark.parametrize("declared", [100 * 1024 * 1024, 10 * 1024**3], ids=["100MiB", "10GiB"])
async def test_huge_declared_body_is_refused_without_waiting_for_it(http_server_client, port, declared):
    request = (
        b"POST /api/sessions/s1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % declared
    )
    status, _, body = await raw_request(port, request)
    assert status == 413
    assert isinstance(orjson.loads(body)["error"], str)


@small_bodies
async def test_server_keeps_answering_after_a_413(http_server_client):
    assert_error(await post_sized(http_server_client, body_of_size(2048), "content-length"), 413)
    assert await publish(http_server_client, "s1", {"type": "session_started"}) == [1]


SCHEMA_ERRORS = [
    pytest.param(progress(150), "progress", id="progress-150"),
    pytest.param(progress(-1), "progress", id="progress-negative"),
    pytest.param(progress("50"), "progress", id="progress-string"),
    pytest.param(progress(True), "progress", id="progress-boolean"),
    pytest.param({"type": "task_progress", "progress": 10}, "task_id", id="missing-task_id"),
    pytest.param(progress(10, task_id=""), "task_id", id="empty-task_id"),
    pytest.param(progress(10, current_action=3), "current_action", id="current_action-number"),
    pytest.param({"type": "chunk", "content": "x", "chunk_number": 0}, "chunk_number", id="chunk_number-0"),
    pytest.param({"type": "chunk", "content": "x", "chunk_number": 1.5}, "chunk_number", id="chunk_number-float"),
    pytest.param({"type": "chunk", "chunk_number": 1}, "content", id="missing-content"),
    pytest.param({"type": "complete", "full_response": "", "total_chunks": -1}, "total_chunks", id="total_chunks"),
    pytest.param({"type": "task_failed", "task_id": "t1"}, "error", id="missing-error"),
    pytest.param({"type": "plan_generated"}, "plan", id="missing-plan"),
    pytest.param({"type": "system_notification", "message": 5}, "message", id="message-number"),
    pytest.param({"type": "task_started", "task_id": "t1", "seq": 5}, "seq", id="reserved-seq"),
    pytest.param({"type": "task_started", "task_id": "t1", "epoch": "e"}, "epoch", id="reserved-epoch"),
    pytest.param({"task_id": "t1"}, "type", id="missing-type"),
    pytest.param({"type": "Task Started"}, "type", id="bad-type"),
    pytest.param({"type": "session_started", "event_id": ""}, "event_id", id="empty-event_id"),
    pytest.param({"type": "session_started", "event_id": "e" * 129}, "event_id", id="long-event_id"),
    pytest.param({"type": "session_started", "correlation_id": 7}, "correlation_id", id="correlation_id"),
]


@pytest.mark.parametrize(("event", "field"), SCHEMA_ERRORS)
async def test_schema_error_is_422_naming_index_and_field(http_server_client, event, field):
    body = assert_error(await post_events(http_server_client, "s1", event), 422)
    assert [(d["index"], d["field"]) for d in body["details"]] == [(0, field)]
    assert isinstance(body["details"][0]["error"], str) and body["details"][0]["error"]


async def test_422_names_every_bad_event_of_a_batch(http_server_client):
    batch = [
        {"type": "session_started"},
        progress(150),
        {"type": "task_progress", "progress": 10},
        {"type": "chunk", "content": "x", "chunk_number": 0},
        {"type": "task_started", "task_id": "t1", "seq": 9},
    ]
    body = assert_error(await post_events(http_server_client, "s1", batch), 422)
    assert [(d["index"], d["field"]) for d in body["details"]] == [
        (1, "progress"),
        (2, "task_id"),
        (3, "chunk_number"),
        (4, "seq"),
    ]


async def test_batch_with_one_bad_event_publishes_nothing(http_server_client, connect):
    assert await publish(http_server_client, "s1", {"type": "session_started"}) == [1]
    client, _ = await connect("s1", research=True, replay="none")
    batch = [{"type": "task_started", "task_id": "t1"}, progress(150), {"type": "task_started", "task_id": "t2"}]
    assert_error(await post_events(http_server_client, "s1", batch), 422)
    code, session = await get_json(http_server_client, "/api/sessions/s1")
    assert code == 200 and session["last_seq"] == 1
    assert await publish(http_server_client, "s1", marker()) == [2]
    await client.expect(type="test.marker", seq=2)


async def test_bad_event_of_another_session_publishes_nothing(http_server_client):
    batch = [{"type": "session_started", "session_id": "a"}, {"type": "task_started", "session_id": "b"}]
    body = assert_error(await post_events(http_server_client, None, batch), 422)
    assert [(d["index"], d["field"]) for d in body["details"]] == [(1, "task_id")]
    for session_id in ("a", "b"):
        code, _ = await get_json(http_server_client, f"/api/sessions/{session_id}")
        assert code == 404


async def test_unknown_session_is_404_for_get_and_delete(http_server_client):
    assert_error(await http_server_client.fetch("/api/sessions/nope", raise_error=False), 404)
    assert_error(await http_server_client.fetch("/api/sessions/nope", method="DELETE", raise_error=False), 404)


@pytest.mark.parametrize("path", ["/nowhere", "/api/nothing", "/api/sessions/s1/events/extra", "/api/sessions/"])
async def test_unknown_path_is_404_json(http_server_client, path):
    assert_error(await http_server_client.fetch(path, raise_error=False), 404)


async def test_publishing_while_draining_is_503(http_server_client, broker):
    broker.draining = True
    assert_error(await post_events(http_server_client, "s1", {"type": "session_started"}), 503)
    assert (await stats(http_server_client))["total_events_received"] == 0


# --------------------------------------------------------------------------
# 7. GET /api/sessions/{id}


async def test_session_shows_every_field_with_its_connections(http_server_client, connect, backend):
    essential, hello = await connect("s1", research=True, user_id="u1", events="essential")
    everything, _ = await connect("s1", replay="none")
    events = [{"type": "task_started", "task_id": "t1"}, {"type": "task_completed", "task_id": "t1"}]
    assert await publish(http_server_client, "s1", events) == [1, 2]
    await essential.expect(type="task_completed", seq=2)
    await everything.expect(type="task_started", seq=1)
    await everything.expect(type="task_completed", seq=2)
    await essential.send({"type": "ack", "seq": 2})
    await essential.send({"type": "ping"})
    await essential.expect(type="pong")  # the ack was handled before the pong

    code, session = await get_json(http_server_client, "/api/sessions/s1")
    assert code == 200
    assert list(session) == SESSION_FIELDS
    assert session["session_id"] == "s1"
    assert session["epoch"] == hello["epoch"]
    assert session["last_seq"] == 2
    assert session["buffered_messages"] == 2
    assert_timestamp(session["created_at"])
    assert assert_timestamp(session["last_event_at"]) >= assert_timestamp(session["created_at"])
    connections = {c["connection_id"]: c for c in session["connections"]}
    assert len(connections) == 2 and hello["connection_id"] in connections
    # In a cluster each connection also names its node (docs/protocol.md section 7).
    fields = CONNECTION_FIELDS + (["node_id"] if backend == "redis" else [])
    assert all(list(c) == fields for c in connections.values())
    if backend == "redis":
        node = (await stats(http_server_client))["node_id"]
        assert [c.pop("node_id") for c in connections.values()] == [node, node]
    assert connections.pop(hello["connection_id"]) == {
        "connection_id": hello["connection_id"],
        "user_id": "u1",
        "events": ESSENTIAL,
        "acked_seq": 2,
        "queued_bytes": 0,
        "transport": "websocket",
    }
    [other] = connections.values()
    assert other["user_id"] is None
    assert other["events"] == ["*"]
    assert other["acked_seq"] is None
    assert other["queued_bytes"] == 0


async def test_session_opened_by_a_client_has_no_events_yet(http_server_client, connect):
    _, hello = await connect("s1", research=True)
    code, session = await get_json(http_server_client, "/api/sessions/s1")
    assert code == 200
    assert session["epoch"] == hello["epoch"]
    assert (session["last_seq"], session["buffered_messages"], session["last_event_at"]) == (0, 0, None)
    assert_timestamp(session["created_at"])


# --------------------------------------------------------------------------
# 8. DELETE /api/sessions/{id}


async def test_deleted_session_is_gone(http_server_client):
    await publish(http_server_client, "s1", {"type": "session_started"})
    response = await http_server_client.fetch("/api/sessions/s1", method="DELETE", raise_error=False)
    assert response.code == 200
    json_of(response)
    assert_error(await http_server_client.fetch("/api/sessions/s1", raise_error=False), 404)
    assert (await stats(http_server_client))["active_sessions"] == 0


async def test_deleting_a_session_closes_its_clients(http_server_client, connect):
    client, _ = await connect("s1", research=True)
    response = await http_server_client.fetch("/api/sessions/s1", method="DELETE", raise_error=False)
    assert response.code == 200
    await client.expect(type="session_closed", session_id="s1")
    assert (await client.closed())[0] == 1000


async def test_session_published_to_after_delete_starts_afresh(http_server_client):
    assert await publish(http_server_client, "s1", [{"type": "session_started"}, marker()]) == [1, 2]
    _, before = await get_json(http_server_client, "/api/sessions/s1")
    await http_server_client.fetch("/api/sessions/s1", method="DELETE")
    assert await publish(http_server_client, "s1", {"type": "session_started"}) == [1]
    code, after = await get_json(http_server_client, "/api/sessions/s1")
    assert code == 200
    assert after["epoch"] != before["epoch"]
    assert (after["last_seq"], after["buffered_messages"]) == (1, 1)


async def test_event_ids_are_forgotten_with_a_deleted_session(http_server_client):
    event = {"type": "session_started", "event_id": "ev-1"}
    assert await publish(http_server_client, "s1", event) == [1]
    await http_server_client.fetch("/api/sessions/s1", method="DELETE")
    assert await publish(http_server_client, "s1", event) == [1]
    code, session = await get_json(http_server_client, "/api/sessions/s1")
    assert code == 200 and session["last_seq"] == 1


@pytest.mark.memory_only("total_buffered_messages counts what this node mirrors (none without a client here)")
@with_settings(buffer_size=3)
async def test_history_keeps_the_last_buffer_size_messages(http_server_client):
    for i in range(10):
        assert await publish(http_server_client, "s1", marker(str(i))) == [i + 1]
    code, session = await get_json(http_server_client, "/api/sessions/s1")
    assert code == 200
    assert (session["last_seq"], session["buffered_messages"]) == (10, 3)
    counters = await stats(http_server_client)
    assert (counters["total_buffered_messages"], counters["sessions_with_buffer"]) == (3, 1)


# --------------------------------------------------------------------------
# 9. Stats


@pytest.mark.parametrize("path", STATS_PATHS)
async def test_stats_show_every_field(http_server_client, path):
    code, body = await get_json(http_server_client, path)
    assert code == 200
    assert [key for key in body if key in STATS_FIELDS] == STATS_FIELDS
    assert isinstance(body["uptime_seconds"], float) and body["uptime_seconds"] >= 0
    assert {key: body[key] for key in STATS_FIELDS[:-1]} == {
        "status": "healthy",
        "active_connections": 0,
        "active_sessions": 0,
        "total_buffered_messages": 0,
        "sessions_with_buffer": 0,
        "total_messages_sent": 0,
        "total_events_received": 0,
        "throttled_events": 0,
        "slow_consumer_disconnects": 0,
        "connected_sessions": [],
    }


@pytest.mark.memory_only("active_sessions and the buffer counters describe this node's mirrors only")
async def test_stats_counters_follow_events_and_clients(http_server_client, connect):
    await publish(http_server_client, "s1", [{"type": "session_started"}, marker("a"), marker("b")])
    counters = await stats(http_server_client)
    assert counters["total_events_received"] == 3
    assert counters["active_sessions"] == 1
    assert (counters["total_buffered_messages"], counters["sessions_with_buffer"]) == (3, 1)
    assert counters["total_messages_sent"] == 0, "nobody is connected"
    assert (counters["active_connections"], counters["connected_sessions"]) == (0, [])

    client, _ = await connect("s1", research=True)
    await client.receive_until(type="test.marker", name="b")
    await connect("s2")
    counters = await stats(http_server_client)
    assert counters["active_connections"] == 2
    assert counters["active_sessions"] == 2
    assert counters["connected_sessions"] == ["s1", "s2"]
    sent = counters["total_messages_sent"]
    assert sent >= 3, "the replayed history counts as sent"

    await publish(http_server_client, "s1", marker("c"))
    await client.expect(type="test.marker", name="c")
    counters = await stats(http_server_client)
    assert counters["total_events_received"] == 4
    assert counters["total_messages_sent"] > sent
    assert (counters["total_buffered_messages"], counters["sessions_with_buffer"]) == (4, 1)


async def test_both_stats_paths_show_the_same_counters(http_server_client, connect):
    await publish(http_server_client, "s1", [{"type": "session_started"}, progress(10), progress(11)])
    await connect("s1", research=True)
    _, one = await get_json(http_server_client, STATS_PATHS[0])
    _, other = await get_json(http_server_client, STATS_PATHS[1])
    one.pop("uptime_seconds")
    other.pop("uptime_seconds")
    assert one == other


# --------------------------------------------------------------------------
# 10. Request ids, caching, probes

REQUESTS = [
    pytest.param("GET", "/api/websocket/stats", None, id="stats"),
    pytest.param("GET", "/ws/health", None, id="ws-health"),
    pytest.param("GET", "/api/sessions/nope", None, id="session-404"),
    pytest.param("DELETE", "/api/sessions/nope", None, id="delete-404"),
    pytest.param("GET", "/nowhere", None, id="path-404"),
    pytest.param("POST", "/api/sessions/s1/events", VALID, id="publish-202"),
    pytest.param("POST", "/api/events", VALID, id="publish-422"),
    pytest.param("POST", "/api/events", b"{", id="publish-400"),
    pytest.param("PUT", "/api/events", VALID, id="publish-405"),
    pytest.param("GET", "/api/events", None, id="get-405"),
]
PROBES = [
    pytest.param("GET", "/healthz", None, id="healthz"),
    pytest.param("GET", "/readyz", None, id="readyz"),
]


def fetch_kwargs(method: str, body: bytes | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"method": method, "raise_error": False}
    if body is not None:
        kwargs["body"] = body
    return kwargs


@pytest.mark.parametrize(("method", "path", "body"), REQUESTS + PROBES)
async def test_every_response_echoes_the_request_id(http_server_client, method, path, body):
    response = await http_server_client.fetch(
        path, headers={"X-Request-ID": "req-abc-123", "Content-Type": JSON}, **fetch_kwargs(method, body)
    )
    assert response.headers.get("X-Request-ID") == "req-abc-123"


@pytest.mark.parametrize(("method", "path", "body"), REQUESTS + PROBES)
async def test_every_response_gets_a_generated_request_id(http_server_client, method, path, body):
    ids = set()
    for _ in range(2):
        response = await http_server_client.fetch(path, headers={"Content-Type": JSON}, **fetch_kwargs(method, body))
        request_id = response.headers.get("X-Request-ID")
        assert request_id, response.headers
        ids.add(request_id)
    assert len(ids) == 2, "each request gets its own id"


@pytest.mark.parametrize(("method", "path", "body"), REQUESTS)
async def test_api_responses_are_not_cached(http_server_client, method, path, body):
    response = await http_server_client.fetch(path, headers={"Content-Type": JSON}, **fetch_kwargs(method, body))
    assert response.headers.get("Cache-Control") == "no-store"
    if response.code >= 400:
        assert_error(response, response.code)


@pytest.mark.parametrize("path", ["/ws?session_id=s1", "/ws/research/s1"])
async def test_websocket_paths_answer_plain_http_with_a_request_id(http_server_client, path):
    response = await http_server_client.fetch(path, headers={"X-Request-ID": "req-ws-1"}, raise_error=False)
    assert response.code == 400
    assert response.headers.get("X-Request-ID") == "req-ws-1"


async def test_healthz_is_200(http_server_client):
    response = await http_server_client.fetch("/healthz", raise_error=False)
    assert response.code == 200


async def test_readyz_follows_broker_readiness(http_server_client, broker):
    assert (await http_server_client.fetch("/readyz", raise_error=False)).code == 200
    broker.ready = False
    assert (await http_server_client.fetch("/readyz", raise_error=False)).code == 503
    assert (await http_server_client.fetch("/healthz", raise_error=False)).code == 200
    broker.ready = True
    assert (await http_server_client.fetch("/readyz", raise_error=False)).code == 200


# --------------------------------------------------------------------------
# 11. Publisher auth


async def test_loopback_may_publish_without_keys(http_server_client):
    assert await publish(http_server_client, "s1", {"type": "session_started"}) == [1]
    response = await http_server_client.fetch("/api/sessions/s1", method="DELETE", raise_error=False)
    assert response.code == 200


with_keys = with_settings(api_keys=("k1", "k2"))

AUTH_CASES = [
    pytest.param({}, 401, id="no-header"),
    pytest.param({"Authorization": "Bearer"}, 401, id="bearer-without-key"),
    pytest.param({"Authorization": "Basic azE6"}, 401, id="basic"),
    pytest.param({"Authorization": "Bearer wrong"}, 403, id="wrong-key"),
    pytest.param({"Authorization": "Bearer k1x"}, 403, id="key-prefix"),
    pytest.param({"Authorization": "Bearer k1"}, 202, id="k1"),
    pytest.param({"Authorization": "Bearer k2"}, 202, id="k2"),
    pytest.param({"Authorization": "bearer k2"}, 202, id="scheme-case-insensitive"),
]


@with_keys
@pytest.mark.parametrize("path", ["/api/sessions/s1/events", "/api/events"])
@pytest.mark.parametrize(("headers", "status"), AUTH_CASES)
async def test_publishing_needs_one_of_the_api_keys(http_server_client, path, headers, status):
    body = orjson.dumps({"type": "session_started", "session_id": "s1"})
    response = await post(http_server_client, path, body, headers=headers)
    if status == 202:
        assert json_of(response) == {"accepted": 1, "seq": [1]}
        return
    assert_error(response, status)
    code, _ = await get_json(http_server_client, "/api/sessions/s1")
    assert code == 404, "a refused publish publishes nothing"


@with_keys
@pytest.mark.parametrize(("headers", "status"), [({}, 401), ({"Authorization": "Bearer nope"}, 403)])
async def test_refusal_reaches_a_client_that_sends_a_large_body_first(http_server_client, port, headers, status):
    answer, body = await stdlib_post(port, "/api/sessions/s1/events", body_of_size(4 * 1024 * 1024), headers)
    assert answer == status
    assert isinstance(orjson.loads(body)["error"], str)


@with_keys
async def test_auth_is_checked_before_the_body(http_server_client):
    response = await post(http_server_client, "/api/sessions/s1/events", b"{", "text/plain")
    assert_error(response, 401)


@with_keys
@pytest.mark.parametrize(("headers", "status"), [({}, 401), ({"Authorization": "Bearer nope"}, 403)])
async def test_deleting_needs_an_api_key(http_server_client, headers, status):
    await publish_with_key(http_server_client)
    response = await http_server_client.fetch("/api/sessions/s1", method="DELETE", headers=headers, raise_error=False)
    assert_error(response, status)
    code, _ = await get_json(http_server_client, "/api/sessions/s1")
    assert code == 200, "a refused delete deletes nothing"
    response = await http_server_client.fetch(
        "/api/sessions/s1", method="DELETE", headers={"Authorization": "Bearer k1"}, raise_error=False
    )
    assert response.code == 200


async def publish_with_key(client: Any) -> None:
    response = await post(
        client, "/api/sessions/s1/events", VALID, headers={"Authorization": "Bearer k2"}
    )
    assert response.code == 202


@with_keys
@pytest.mark.parametrize("path", ["/api/websocket/stats", "/ws/health", "/api/sessions/s1", "/healthz", "/readyz"])
async def test_read_only_endpoints_need_no_key(http_server_client, path):
    await publish_with_key(http_server_client)
    response = await http_server_client.fetch(path, raise_error=False)
    assert response.code == 200


# -- which reader a publish gets: whole (small, declared bodies) or streamed ---------


def request_with(headers: dict[str, str]) -> Any:
    from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine

    start = RequestStartLine("POST", "/api/sessions/s1/events", "HTTP/1.1")
    return HTTPServerRequest(start_line=start, headers=HTTPHeaders({"Host": "127.0.0.1", **headers}))


@pytest.mark.parametrize(
    ("headers", "whole"),
    [
        ({"Content-Length": "50"}, True),
        ({"Content-Length": "1024"}, True),  # max_body_size, exactly
        ({"Content-Length": "1025"}, False),  # over max_body_size: streamed, answered 413
        ({"Transfer-Encoding": "chunked"}, False),  # no length declared
        ({"Content-Length": "50", "Expect": "100-continue"}, False),  # waits to be told before sending
        ({"Content-Length": "+50"}, False),
        ({"Content-Length": "50", "Content-Type": "multipart/form-data"}, False),  # tornado would parse it
        ({"Content-Length": "50", "Content-Type": "application/x-www-form-urlencoded"}, False),
    ],
    ids=["small", "at-limit", "over-limit", "chunked", "expect", "odd-length", "multipart", "form"],
)
@small_bodies
def test_only_small_declared_bodies_are_read_whole(broker, headers, whole):
    from handlers.body import SmallBody

    matcher = SmallBody(r"/api/sessions/([^/]+)/events", broker, 64 * 1024)
    assert (matcher.match(request_with(headers)) is not None) is whole
