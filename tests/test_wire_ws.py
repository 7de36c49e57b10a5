"""The WebSocket endpoints over a real socket (docs/protocol.md sections 1, 2.6-2.7 and 3).

Every test runs the real application on a real port and asserts what a
client written to the protocol would notice: field names, close codes and
order. Nothing here sleeps: every wait is on a message (bounded by the
client's timeout) or on a bounded number of HTTP polls.
"""

from __future__ import annotations

import asyncio
import re
from functools import partial
from typing import Any

import orjson
import pytest
from tornado.httpclient import HTTPClientError

from broker.testing import WebSocketClient
from tests.support import with_settings
from tests.support.wire import get_json, publish, session_info, session_messages, stats, wait_until

TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
ESSENTIAL = [
    "complete",
    "error",
    "session_cancelled",
    "session_completed",
    "session_started",
    "task_completed",
    "task_failed",
]
PLANNING = ["plan_generated", "report_generated", "session_completed", "session_started"]
#: One event of every known type (section 1), plus one a publisher invented.
ONE_OF_EACH = [
    {"type": "session_started"},
    {"type": "plan_generated", "plan": ["a", "b"]},
    {"type": "task_started", "task_id": "t1"},
    {"type": "task_progress", "task_id": "t1", "progress": 50},
    {"type": "task_completed", "task_id": "t1"},
    {"type": "task_failed", "task_id": "t2", "error": "boom"},
    {"type": "report_generated", "report": {"text": "done"}},
    {"type": "query_start", "query": "q"},
    {"type": "chunk", "content": "c", "chunk_number": 1},
    {"type": "complete", "full_response": "c", "total_chunks": 1},
    {"type": "error", "error": "bad"},
    {"type": "system_notification", "message": "hello"},
    {"type": "custom.thing", "x": 1},
    {"type": "session_cancelled"},
    {"type": "session_completed"},
]






# -- helpers -------------------------------------------------------------------


def tasks(*task_ids: str) -> list[dict[str, Any]]:
    """task_started events: never throttled, one per task id."""
    return [{"type": "task_started", "task_id": t} for t in task_ids]


def seqs(messages: list[dict[str, Any]]) -> list[int]:
    return [m["seq"] for m in messages]


async def read_until_type(client: WebSocketClient, mtype: str) -> list[dict[str, Any]]:
    """Read up to and including the first message of type `mtype`; short failures for big payloads."""
    seen: list[dict[str, Any]] = []
    while not seen or seen[-1]["type"] != mtype:
        message = await client.receive()
        if message is None:
            summary = [(m["type"], m.get("seq")) for m in seen[-5:]]
            raise AssertionError(f"closed {client.close_info()} before a {mtype!r} after {len(seen)}; last {summary}")
        seen.append(message)
    return seen


def no_connections(answer: tuple[int, Any]) -> bool:
    """A `session_info` answer: the session is there and no connection is attached to it."""
    code, session = answer
    return code == 200 and session["connections"] == []


async def refused(client: WebSocketClient) -> str:
    """The server closed with 1008 before sending anything; return the reason."""
    code, reason = await client.closed()
    assert (code, client.received) == (1008, []), (code, reason, client.received)
    assert reason
    return reason


async def still_delivers(http: Any, client: WebSocketClient, session_id: str, marker: str) -> None:
    """A healthy connection of the session still receives what is published."""
    await publish(http, session_id, {"type": "system_notification", "message": marker})
    message = await client.expect(type="system_notification")
    assert message["message"] == marker


# -- 1. greetings ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("research", "greeting"), [(False, "connected"), (True, "connection_established")], ids=["ws", "research"]
)
async def test_greeting_has_every_field(connect, http_server_client, research, greeting):
    await publish(http_server_client, "g1", tasks("a", "b", "c"))
    client = await connect.plain("g1", research=research, user_id="user1", replay="none")
    hello = await client.expect(type=greeting)
    assert {
        "type",
        "message",
        "session_id",
        "connection_id",
        "user_id",
        "events",
        "epoch",
        "last_seq",
        "keepalive_interval",
        "timestamp",
    } <= set(hello)
    assert hello["message"] == "WebSocket connection established"
    assert hello["session_id"] == "g1"
    assert hello["connection_id"].startswith("c-")
    assert hello["user_id"] == "user1"
    assert hello["events"] == ["*"]
    assert hello["epoch"].startswith("e-")
    assert hello["last_seq"] == 3
    assert hello["keepalive_interval"] == 25
    assert TIMESTAMP.match(hello["timestamp"]), hello["timestamp"]


async def test_greeting_of_a_new_session_has_last_seq_0_and_epoch_of_later_messages(connect, http_server_client):
    client, hello = await connect("g2")
    assert hello["last_seq"] == 0
    assert hello["user_id"] is None
    await publish(http_server_client, "g2", tasks("a"))
    event = await client.expect(type="task_started", task_id="a", session_id="g2", seq=1)  # flat: no data wrapper
    assert event["epoch"] == hello["epoch"]
    assert TIMESTAMP.match(event["timestamp"])
    assert event["event_id"]
    assert event["correlation_id"]


async def test_each_connection_gets_its_own_connection_id(connect):
    _, first = await connect("g3")
    _, second = await connect("g3", research=True)
    assert first["connection_id"] != second["connection_id"]
    assert first["epoch"] == second["epoch"]


async def test_greeting_keepalive_interval_is_an_integer_on_the_wire(connect):
    client = await connect.plain("g4")
    raw = await asyncio.wait_for(client.conn.read_message(), client.timeout)
    assert b'"keepalive_interval":25,' in raw.encode()


# -- 2. client messages ----------------------------------------------------------


async def test_ping_is_answered_with_pong_and_timestamp(connect):
    client, _ = await connect("p1")
    await client.send({"type": "ping"})
    pong = await client.expect(type="pong")
    assert TIMESTAMP.match(pong["timestamp"]), pong


@with_settings(keepalive_interval=0.2)
async def test_an_idle_connection_gets_keepalives(connect):
    client, hello = await connect("k1")
    assert hello["keepalive_interval"] == 0.2
    for _ in range(2):
        keepalive = await client.expect(type="keepalive")
        assert "seq" not in keepalive
        assert TIMESTAMP.match(keepalive["timestamp"])


async def test_unsubscribe_from_all_stops_only_that_type(connect, http_server_client):
    client, _ = await connect("sub1")
    await client.send({"type": "unsubscribe", "events": ["task_progress"]})
    answer = await client.expect(type="subscribed")
    assert answer["events"] == ["*", "-task_progress"]
    assert "seq" not in answer

    await publish(
        http_server_client,
        "sub1",
        [{"type": "task_progress", "task_id": "t1", "progress": 10}, *tasks("t2")],
    )
    await client.expect(type="task_started", task_id="t2", seq=2)

    code, session = await get_json(http_server_client, "/api/sessions/sub1")
    assert code == 200
    assert [c["events"] for c in session["connections"]] == [["*", "-task_progress"]]

    await client.send({"type": "subscribe", "events": ["task_progress"]})
    assert (await client.expect(type="subscribed"))["events"] == ["*"]
    await publish(http_server_client, "sub1", {"type": "task_progress", "task_id": "t3", "progress": 10})
    await client.expect(type="task_progress", task_id="t3", seq=3)  # no replay of seq 1 on subscribe


async def test_subscribe_adds_types_to_a_preset_filter(connect, http_server_client):
    client, hello = await connect("sub2", events="planning")
    assert hello["events"] == PLANNING
    await client.send({"type": "subscribe", "events": ["task_started", "essential"]})
    answer = await client.expect(type="subscribed")
    assert answer["events"] == sorted({*PLANNING, *ESSENTIAL, "task_started"})
    await publish(http_server_client, "sub2", [{"type": "chunk", "content": "x", "chunk_number": 1}, *tasks("t")])
    await client.expect(type="task_started", seq=2)


async def test_unsubscribe_everything_then_subscribe_one_type(connect, http_server_client):
    client, _ = await connect("sub3")
    await client.send({"type": "unsubscribe", "events": ["*"]})
    assert (await client.expect(type="subscribed"))["events"] == []
    await client.send({"type": "subscribe", "events": ["task_completed"]})
    assert (await client.expect(type="subscribed"))["events"] == ["task_completed"]
    await publish(http_server_client, "sub3", [*tasks("t"), {"type": "task_completed", "task_id": "t"}])
    await client.expect(type="task_completed", seq=2)


@pytest.mark.parametrize(
    "message",
    [
        {"type": "subscribe", "events": ["Not A Type"]},
        {"type": "subscribe", "events": "task_started"},
        {"type": "subscribe", "events": []},
        {"type": "subscribe"},
        {"type": "subscribe", "events": [5]},
        {"type": "unsubscribe", "events": ["Task_Started"]},
    ],
    ids=["bad-name", "string", "empty", "missing", "not-a-string", "unsubscribe-bad-name"],
)
async def test_bad_subscribe_item_is_bad_message_and_keeps_the_filter(connect, http_server_client, message):
    client, _ = await connect("sub4", events="task_completed")
    await client.send(message)
    error = await client.expect(type="error", code="bad_message")
    assert error["error"]
    assert TIMESTAMP.match(error["timestamp"])
    await publish(http_server_client, "sub4", [*tasks("t"), {"type": "task_completed", "task_id": "t"}])
    await client.expect(type="task_completed", seq=2)
    await client.send({"type": "ping"})
    await client.expect(type="pong")


async def test_disconnect_answers_disconnected_then_closes_1000(connect):
    client, hello = await connect("d1")
    await client.send({"type": "disconnect"})
    answer = await client.expect(type="disconnected")
    assert answer["connection_id"] == hello["connection_id"]
    code, _ = await client.closed()
    assert code == 1000
    assert [m["type"] for m in client.received] == ["connected", "disconnected"]


async def test_ack_sends_nothing_and_shows_in_the_session(connect, http_server_client):
    client, hello = await connect("ack1")
    _, other = await connect("ack1")
    await publish(http_server_client, "ack1", tasks("a", "b", "c"))
    await session_messages(client, 3)
    await client.send({"type": "ack", "seq": 2})
    await client.send({"type": "ping"})
    await client.expect(type="pong")  # the ack itself was answered with nothing
    code, session = await get_json(http_server_client, "/api/sessions/ack1")
    assert code == 200
    for connection in session["connections"]:
        assert {"connection_id", "user_id", "events", "acked_seq", "queued_bytes"} <= set(connection)
    acked = {c["connection_id"]: c["acked_seq"] for c in session["connections"]}
    assert acked == {hello["connection_id"]: 2, other["connection_id"]: None}


@pytest.mark.parametrize("seq", ["2", -1, 1.5, None, True], ids=["string", "negative", "float", "null", "bool"])
async def test_ack_with_bad_seq_is_bad_message(connect, seq):
    client, _ = await connect("ack2")
    await client.send({"type": "ack", "seq": seq})
    await client.expect(type="error", code="bad_message")


async def test_ack_without_seq_is_bad_message(connect):
    client, _ = await connect("ack3")
    await client.send({"type": "ack"})
    await client.expect(type="error", code="bad_message")


# -- 3. bad input ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("this is not json", "bad_json"),
        ("{'single': 'quotes'}", "bad_json"),
        ("[1, 2, 3]", "bad_json"),
        ("42", "bad_json"),
        ('"a string"', "bad_json"),
        ("null", "bad_json"),
        (b'{"type": "ping"}', "bad_json"),
        ("{}", "bad_message"),
        ('{"type": 5}', "bad_message"),
        ('{"type": ""}', "bad_message"),
        ('{"type": "publish"}', "unknown_type"),
        ('{"type": "task_started", "task_id": "t"}', "unknown_type"),
    ],
    ids=[
        "text",
        "python-literal",
        "array",
        "number",
        "string",
        "null",
        "binary",
        "no-type",
        "int-type",
        "empty-type",
        "unknown",
        "session-type",
    ],
)
async def test_bad_frame_is_an_error_and_the_connection_stays_open(connect, http_server_client, frame, code):
    healthy, _ = await connect("bad1")
    client, _ = await connect("bad1")
    await client.send(frame)
    error = await client.expect(type="error", code=code)
    assert isinstance(error["error"], str)
    assert error["error"]
    assert TIMESTAMP.match(error["timestamp"])
    assert "seq" not in error
    await client.send({"type": "ping"})
    await client.expect(type="pong")
    await still_delivers(http_server_client, healthy, "bad1", "after a bad frame")
    await client.expect(type="system_notification")  # the offender too


async def test_an_error_answers_only_the_offender(connect, http_server_client):
    healthy, _ = await connect("bad2")
    client, _ = await connect("bad2")
    await client.send("nope")
    await client.expect(type="error", code="bad_json")
    await still_delivers(http_server_client, healthy, "bad2", "only me")  # no error in between


@with_settings(max_client_errors=3)
async def test_more_than_max_client_errors_sends_the_error_then_closes_1008(connect, http_server_client):
    healthy, _ = await connect("bad3")
    client, _ = await connect("bad3")
    for frame in ("x", "{}", '{"type": "nope"}'):
        await client.send(frame)
        await client.expect(type="error")
    await client.send({"type": "ping"})  # three errors are still allowed
    await client.expect(type="pong")
    await client.send(b"\x00")
    await client.expect(type="error", code="bad_json")
    code, reason = await client.closed()
    assert code == 1008
    assert reason
    assert [m["type"] for m in client.received] == ["connected", "error", "error", "error", "pong", "error"]
    await still_delivers(http_server_client, healthy, "bad3", "after 1008")


@with_settings(max_client_rate=5, max_client_errors=1000)
async def test_messages_over_max_client_rate_are_answered_rate_limited_and_dropped(connect, http_server_client):
    healthy, _ = await connect("rl1")
    client, _ = await connect("rl1")
    for _ in range(30):  # a burst: far more than 5 within one second
        await client.send({"type": "ping"})
    answers = [await client.receive() for _ in range(30)]
    kinds = [(a["type"], a.get("code")) for a in answers if a is not None]
    assert len(kinds) == 30
    assert set(kinds) <= {("pong", None), ("error", "rate_limited")}
    assert kinds.count(("error", "rate_limited")) > 0
    assert kinds.count(("pong", None)) >= 5
    await still_delivers(http_server_client, healthy, "rl1", "after rate limiting")


def ping_of_size(size: int) -> str:
    """A ping frame of exactly `size` bytes (a padding field fills it up)."""
    empty = len(orjson.dumps({"type": "ping", "padding": ""}))
    frame = orjson.dumps({"type": "ping", "padding": "x" * (size - empty)}).decode()
    assert len(frame.encode()) == size
    return frame


@with_settings(max_message_size=1024)
async def test_a_frame_of_exactly_max_message_size_is_allowed(connect):
    client, _ = await connect("big1")
    await client.send(ping_of_size(1024))
    await client.expect(type="pong")


@with_settings(max_message_size=1024)
async def test_a_frame_over_max_message_size_closes_1009(connect, http_server_client):
    healthy, _ = await connect("big2")
    client, _ = await connect("big2")
    await client.send(ping_of_size(1025))
    code, _ = await client.closed()
    assert code == 1009
    assert [m["type"] for m in client.received] == ["connected"]
    await still_delivers(http_server_client, healthy, "big2", "after 1009")


async def test_exactly_64_kib_is_allowed_by_default_and_one_byte_more_closes_1009(connect):
    client, _ = await connect("big4")
    await client.send(ping_of_size(64 * 1024))
    await client.expect(type="pong")
    await client.send(ping_of_size(64 * 1024 + 1))
    code, _ = await client.closed()
    assert code == 1009


async def test_messages_at_frame_length_boundaries_arrive_intact(connect, http_server_client):
    """Server frames carry a 7-bit, 16-bit or 64-bit length (RFC 6455 5.2); each arrives whole."""
    client, _ = await connect("len1")
    await publish(http_server_client, "len1", {"type": "bulk", "pad": ""})
    base = len((await asyncio.wait_for(client.conn.read_message(), client.timeout)).encode())
    for seq, size in enumerate((base, 65_535, 65_536, 65_537, 300_000), start=2):  # seq stays one digit
        await publish(http_server_client, "len1", {"type": "bulk", "pad": "p" * (size - base)})
        raw = await asyncio.wait_for(client.conn.read_message(), client.timeout)
        assert len(raw.encode()) == size
        assert orjson.loads(raw)["seq"] == seq
    await client.send({"type": "ping"})
    await client.expect(type="pong")  # a 7-bit length, after all the others


@pytest.mark.parametrize(
    ("research", "session_id", "params"),
    [
        (False, None, {}),
        (False, "", {}),
        (False, "bad id!", {}),
        (False, "x" * 129, {}),
        (True, "bad%20id", {}),
        (True, "x" * 129, {}),
        (False, "hs1", {"events": "Task Started"}),
        (False, "hs1", {"events": "essential,,planning"}),
        (False, "hs1", {"events": "-all"}),
        (False, "hs1", {"events": "é" * 200}),
        (False, "hs1", {"replay": "sometimes"}),
        (False, "hs1", {"last_seq": "abc"}),
        (False, "hs1", {"last_seq": "-1"}),
        (False, "hs1", {"last_seq": "1.5"}),
        (False, "hs1", {"last_seq": ""}),
    ],
    ids=[
        "missing-session",
        "empty-session",
        "invalid-session",
        "long-session",
        "invalid-path-session",
        "long-path-session",
        "bad-events-item",
        "empty-events-item",
        "remove-everything",
        "long-unicode-events-item",
        "bad-replay",
        "last-seq-abc",
        "last-seq-negative",
        "last-seq-float",
        "last-seq-empty",
    ],
)
async def test_bad_handshake_parameter_closes_1008_before_any_data(
    connect, http_server_client, research, session_id, params
):
    healthy, _ = await connect("hs1")
    client = await connect.plain(session_id, research=research, **params)
    await refused(client)
    await still_delivers(http_server_client, healthy, "hs1", "after a refused handshake")


@pytest.mark.parametrize("research", [False, True], ids=["ws", "research"])
async def test_bad_handshake_parameter_on_either_endpoint_closes_1008(connect, research):
    client = await connect.plain("hs2", research=research, last_seq="abc")
    reason = await refused(client)
    assert "last_seq" in reason


async def test_last_seq_beyond_the_newest_closes_1008_before_any_data(connect, http_server_client):
    healthy, _ = await connect("hs3")
    await publish(http_server_client, "hs3", tasks("a", "b"))
    await session_messages(healthy, 2)
    client = await connect.plain("hs3", last_seq=3)
    await refused(client)
    await still_delivers(http_server_client, healthy, "hs3", "after last_seq beyond")


async def test_last_seq_beyond_the_newest_of_a_new_session_closes_1008(connect):
    client = await connect.plain("hs4", last_seq=1)
    await refused(client)


# -- 4. filters and presets on connect -------------------------------------------


@pytest.mark.parametrize(
    ("events", "echo", "admitted"),
    [
        ("essential", ESSENTIAL, set(ESSENTIAL)),
        ("planning", PLANNING, set(PLANNING)),
        (
            "all,-task_progress",
            ["*", "-task_progress"],
            {e["type"] for e in ONE_OF_EACH} - {"task_progress"},
        ),
        (
            "-task_progress,-chunk",
            ["*", "-chunk", "-task_progress"],
            {e["type"] for e in ONE_OF_EACH} - {"task_progress", "chunk"},
        ),
        ("*", ["*"], {e["type"] for e in ONE_OF_EACH}),
        (
            "task_completed,custom.thing,session_completed",
            ["custom.thing", "session_completed", "task_completed"],
            {"task_completed", "custom.thing", "session_completed"},
        ),
        (
            "essential,-error,plan_generated",
            sorted({*ESSENTIAL, "plan_generated"} - {"error"}),
            {*ESSENTIAL, "plan_generated"} - {"error"},
        ),
    ],
    ids=["essential", "planning", "all-minus", "only-removals", "star", "types", "preset-plus-minus"],
)
async def test_filter_on_connect_admits_exactly_its_types(connect, http_server_client, events, echo, admitted):
    client, hello = await connect("f1", events=events)
    assert hello["events"] == echo
    await publish(http_server_client, "f1", ONE_OF_EACH)
    expected = [(i + 1, e["type"]) for i, e in enumerate(ONE_OF_EACH) if e["type"] in admitted]
    got = await client.receive_until(type="session_completed")  # the last one, admitted by every filter here
    assert [(m["seq"], m["type"]) for m in got] == expected
    await client.send({"type": "ping"})
    await client.expect(type="pong")  # nothing else was queued before it


async def test_connection_level_messages_pass_every_filter(connect):
    client, _ = await connect("f2", events="planning")
    await client.send({"type": "ping"})
    await client.expect(type="pong")
    await client.send("garbage")
    await client.expect(type="error", code="bad_json")


async def test_replay_is_filtered_too(connect, http_server_client):
    await publish(http_server_client, "f3", ONE_OF_EACH)
    client, _ = await connect("f3", research=True, events="essential")
    got = await client.receive_until(type="session_completed")
    assert [m["type"] for m in got] == [e["type"] for e in ONE_OF_EACH if e["type"] in ESSENTIAL]


# -- 5. replay -------------------------------------------------------------------


async def test_research_replays_the_whole_history_by_default_then_live(connect, http_server_client):
    await publish(http_server_client, "r1", tasks("a", "b", "c"))
    watcher, _ = await connect("r1", research=True)
    await session_messages(watcher, 3)  # delivered once already: replay=all still sends it
    client, hello = await connect("r1", research=True)
    assert hello["last_seq"] == 3
    replayed = await session_messages(client, 3)
    assert [(m["seq"], m["task_id"]) for m in replayed] == [(1, "a"), (2, "b"), (3, "c")]
    assert all(m["epoch"] == hello["epoch"] for m in replayed)
    await publish(http_server_client, "r1", tasks("d"))
    await client.expect(type="task_started", task_id="d", seq=4)


async def test_ws_replays_only_what_no_connection_received_by_default(connect, http_server_client):
    await publish(http_server_client, "r2", tasks("offline1", "offline2"))
    first, hello = await connect("r2")
    assert hello["last_seq"] == 2
    assert seqs(await session_messages(first, 2)) == [1, 2]

    second, _ = await connect("r2")  # the offline messages went to `first` already
    await publish(http_server_client, "r2", tasks("live"))
    assert seqs(await session_messages(first, 1)) == [3]
    assert seqs(await session_messages(second, 1)) == [3]

    third, _ = await connect("r2")  # seq 3 was delivered while it streamed
    await publish(http_server_client, "r2", tasks("later"))
    assert seqs(await session_messages(third, 1)) == [4]


async def test_a_message_filtered_away_from_everyone_is_still_missed(connect, http_server_client):
    picky, _ = await connect("r3", events="task_completed")
    await publish(http_server_client, "r3", [*tasks("t"), {"type": "task_completed", "task_id": "t"}])
    await picky.expect(type="task_completed", seq=2)
    newcomer, _ = await connect("r3")
    assert seqs(await session_messages(newcomer, 1)) == [1]  # nobody had been sent seq 1


async def test_replay_none_gets_only_live_messages(connect, http_server_client):
    await publish(http_server_client, "r4", tasks("a", "b"))
    for research in (False, True):
        client, hello = await connect("r4", research=research, replay="none")
        assert hello["last_seq"] == 2 + (1 if research else 0)
        await publish(http_server_client, "r4", tasks(f"live-{research}"))
        event = await client.expect(type="task_started")
        assert event["task_id"] == f"live-{research}"


@pytest.mark.parametrize("research", [False, True], ids=["ws", "research"])
async def test_last_seq_gets_exactly_the_later_messages(connect, http_server_client, research):
    await publish(http_server_client, "r5", tasks("a", "b", "c", "d", "e"))
    _, first = await connect("r5", replay="none")
    client, hello = await connect("r5", research=research, last_seq=2, epoch=first["epoch"])
    assert hello["last_seq"] == 5
    assert seqs(await session_messages(client, 3)) == [3, 4, 5]  # no gap: the epoch is current
    await publish(http_server_client, "r5", tasks("f"))
    assert seqs(await session_messages(client, 1)) == [6]


async def test_last_seq_equal_to_the_newest_gets_only_live(connect, http_server_client):
    await publish(http_server_client, "r6", tasks("a", "b"))
    client, _ = await connect("r6", last_seq=2)
    await publish(http_server_client, "r6", tasks("c"))
    assert seqs(await session_messages(client, 1)) == [3]


async def test_last_seq_0_on_a_new_session_is_fine(connect, http_server_client):
    client, hello = await connect("r7", last_seq=0)
    assert hello["last_seq"] == 0
    await publish(http_server_client, "r7", tasks("a"))
    assert seqs(await session_messages(client, 1)) == [1]


@pytest.mark.parametrize("last_seq", [2, 99], ids=["within", "beyond-newest"])
async def test_wrong_epoch_gets_a_gap_then_the_whole_history(connect, http_server_client, last_seq):
    await publish(http_server_client, "r8", tasks("a", "b", "c"))
    client = await connect.plain("r8", last_seq=last_seq, epoch="e-from-another-life")
    hello = await client.expect(type="connected")
    gap = await client.receive()
    assert gap == {"type": "gap", "from_seq": 1, "to_seq": None, "epoch": hello["epoch"]}
    assert seqs(await session_messages(client, 3)) == [1, 2, 3]


@with_settings(buffer_size=5)
async def test_evicted_messages_are_announced_by_a_gap(connect, http_server_client):
    await publish(http_server_client, "r9", tasks(*(f"t{i}" for i in range(1, 13))))
    client = await connect.plain("r9", last_seq=2)
    hello = await client.expect(type="connected")
    assert hello["last_seq"] == 12
    gap = await client.receive()
    assert gap == {"type": "gap", "from_seq": 3, "to_seq": 7, "epoch": hello["epoch"]}
    events = await session_messages(client, 5)
    assert [(m["seq"], m["task_id"]) for m in events] == [(n, f"t{n}") for n in range(8, 13)]


@with_settings(buffer_size=5)
async def test_replay_all_after_eviction_sends_what_is_held(connect, http_server_client):
    await publish(http_server_client, "r10", tasks(*(f"t{i}" for i in range(1, 13))))
    client, _ = await connect("r10", research=True)
    assert seqs(await session_messages(client, 5)) == [8, 9, 10, 11, 12]


# -- 6. replay while publishing concurrently ------------------------------------


@with_settings(buffer_size=1000)
async def test_replay_during_concurrent_publishing_has_no_holes_or_duplicates(connect, http_server_client):
    total, batch, streams = 200, 5, 4
    batches = total // batch
    published = 0  # batches answered so far
    progress = asyncio.Condition()

    async def publish_stream(stream: int) -> None:
        """One publisher: its batches one after another, while the other streams publish too."""
        nonlocal published
        for start in range(stream * batch, total, streams * batch):
            await publish(http_server_client, "c1", tasks(*(f"t{n}" for n in range(start, start + batch))))
            async with progress:
                published += 1
                progress.notify_all()

    async def join(after: int, **params: Any) -> tuple[int, list[dict[str, Any]]]:
        """Connect once `after` batches are in, while the rest are still being published."""
        async with progress:
            await progress.wait_for(lambda: published >= after)
        client = await connect.plain("c1", **params)
        hello = await client.receive()
        assert hello is not None
        assert hello["type"] in {"connected", "connection_established"}
        received: list[dict[str, Any]] = []
        while not received or received[-1]["seq"] < total:
            received.extend(await session_messages(client, 1))
        return hello["last_seq"], received

    results = await asyncio.gather(
        *(publish_stream(stream) for stream in range(streams)),
        join(batches // 10, last_seq=0),
        join(batches // 4, research=True),
        join(batches // 2, research=True, replay="all"),
        join(batches // 2, research=True, last_seq=0),
        join(3 * batches // 4, replay="all"),
    )
    joined = results[streams:]
    assert any(0 < last_seq < total for last_seq, _ in joined)  # some joined while publishing went on
    task_ids = {f"t{n}" for n in range(total)}
    for _, received in joined:
        assert seqs(received) == list(range(1, total + 1))
        assert {m["task_id"] for m in received} == task_ids


# -- 7. slow consumer ------------------------------------------------------------


@with_settings(max_queue_bytes=64 * 1024, buffer_size=1000)
async def test_slow_consumer_is_closed_4008_and_recovers_with_last_seq(connect, http_server_client):
    total = 600  # 12 MB: well past what the kernel buffers of a loopback socket hold
    payload = "x" * 20_000
    normal, hello = await connect("slow1")
    slow, _ = await connect("slow1")  # from now on it does not read

    async def publish_all() -> None:
        for n in range(1, total + 1):
            await publish(http_server_client, "slow1", {"type": "bulk", "n": n, "blob": payload})

    async def read_normal() -> list[dict[str, Any]]:
        return await session_messages(normal, total)

    async def drain_slow_once_closed() -> tuple[list[dict[str, Any]], tuple[int | None, str | None]]:
        # The server gives a closed peer 5 s to read up to its close frame: start reading at once.
        await wait_until(lambda: stats(http_server_client), lambda b: b["slow_consumer_disconnects"], timeout=60)
        close = await slow.closed()
        return [m for m in slow.received if "seq" in m], close

    _, normal_events, (slow_events, close) = await asyncio.gather(
        publish_all(), read_normal(), drain_slow_once_closed()
    )
    assert seqs(normal_events) == list(range(1, total + 1))
    assert [m["n"] for m in normal_events] == list(range(1, total + 1))
    assert close == (4008, "slow_consumer")
    processed = seqs(slow_events)
    assert processed == list(range(1, len(processed) + 1))
    assert len(processed) < total

    again, rehello = await connect("slow1", last_seq=processed[-1], epoch=hello["epoch"])
    assert rehello["last_seq"] == total
    rest = await session_messages(again, total - len(processed))
    assert seqs(rest) == list(range(len(processed) + 1, total + 1))
    await again.send({"type": "ping"})
    await again.expect(type="pong")  # nothing was sent twice
    assert (await stats(http_server_client))["slow_consumer_disconnects"] == 1


@with_settings(max_queue_bytes=64 * 1024)
async def test_a_slow_consumers_queue_drops_superseded_progress_instead_of_closing(connect, http_server_client):
    total = 600
    blob = "x" * 20_000
    normal, _ = await connect("slow2")
    slow, _ = await connect("slow2")  # does not read until everything is published

    async def publish_all() -> None:
        await publish(http_server_client, "slow2", tasks("t1"))
        for n in range(1, total + 1):
            step = {"type": "task_progress", "task_id": "t1", "progress": 50, "current_action": f"step {n}"}
            await publish(http_server_client, "slow2", {**step, "blob": blob})
        await publish(http_server_client, "slow2", {"type": "task_completed", "task_id": "t1"})

    _, normal_events = await asyncio.gather(publish_all(), session_messages(normal, total + 2))
    assert seqs(normal_events) == list(range(1, total + 3))

    events = await read_until_type(slow, "task_completed")
    assert events[0]["type"] == "task_started"
    assert seqs(events) == sorted(set(seqs(events)))
    assert len(events) < total + 2  # superseded progress was dropped...
    assert events[-2]["current_action"] == f"step {total}"  # ...but the latest state arrived
    assert (events[-2]["seq"], events[-1]["seq"]) == (total + 1, total + 2)
    await slow.send({"type": "ping"})
    await slow.expect(type="pong")
    assert (await stats(http_server_client))["slow_consumer_disconnects"] == 0


@with_settings(max_queue_bytes=16 * 1024)
async def test_a_single_message_larger_than_max_queue_bytes_is_delivered(connect, http_server_client):
    client, _ = await connect("slow3")
    await publish(http_server_client, "slow3", {"type": "bulk", "blob": "x" * 200_000})
    event = await client.expect(type="bulk", seq=1)
    assert len(event["blob"]) == 200_000
    await client.send({"type": "ping"})
    await client.expect(type="pong")


@with_settings(max_queue_bytes=64 * 1024, buffer_size=1000)
async def test_replay_does_not_count_towards_max_queue_bytes(connect, http_server_client):
    total, batch = 600, 40  # 12 MB of history, written to a client that has not started reading
    blob = "x" * 20_000
    for start in range(0, total, batch):
        await publish(
            http_server_client, "slow4", [{"type": "bulk", "n": n, "blob": blob} for n in range(start, start + batch)]
        )
    client, _ = await connect("slow4", research=True)
    await publish(http_server_client, "slow4", {"type": "live"})
    _, session = await get_json(http_server_client, "/api/sessions/slow4")
    assert len(session["connections"]) == 1, "the replaying client was closed"
    assert session["connections"][0]["queued_bytes"] < 64 * 1024
    events = await session_messages(client, total + 1)
    assert seqs(events) == list(range(1, total + 2))
    assert events[-1]["type"] == "live"
    assert (await stats(http_server_client))["slow_consumer_disconnects"] == 0


# -- 8. scale --------------------------------------------------------------------


async def test_200_clients_over_20_sessions_each_get_their_sessions_events_in_order(connect, http_server_client):
    sessions = [f"scale{i}" for i in range(20)]
    per_session, per_client, batch = 10, 100, 10

    async def join(session_id: str, index: int) -> WebSocketClient:
        client, _ = await connect(session_id, research=index % 2 == 1, timeout=20.0)
        return client

    clients = await asyncio.gather(*(join(s, i) for s in sessions for i in range(per_session)))

    async def publish_session(session_id: str) -> None:
        for start in range(0, per_client, batch):
            events = [{"type": "tick", "n": n, "of": session_id} for n in range(start + 1, start + batch + 1)]
            published = await publish(http_server_client, session_id, events)
            assert published == list(range(start + 1, start + batch + 1))

    async def read(client: WebSocketClient) -> list[dict[str, Any]]:
        return await session_messages(client, per_client)

    received = await asyncio.gather(*(publish_session(s) for s in sessions), *(read(c) for c in clients))
    for index, events in enumerate(received[len(sessions) :]):
        session_id = sessions[index // per_session]
        assert [(m["seq"], m["n"], m["of"]) for m in events] == [(n, n, session_id) for n in range(1, per_client + 1)]
    for client in clients:
        await client.send({"type": "ping"})
    for client in clients:
        await client.expect(type="pong")  # and not one event more


# -- 9. origins ------------------------------------------------------------------


@pytest.mark.parametrize(
    "origin",
    [
        "http://evil.example",
        "https://evil.example:3000",
        "http://localhost.evil.example",
        "http://127.0.0.1.evil.example",
        "http://localhost@evil.example",
        "null",
    ],
)
async def test_a_foreign_origin_is_refused_403_at_the_handshake(connect, http_server_client, origin):
    healthy, _ = await connect("o1")
    for research in (False, True):
        with pytest.raises(HTTPClientError) as refused_handshake:
            await connect.plain("o1", research=research, headers={"Origin": origin})
        assert refused_handshake.value.code == 403
    await still_delivers(http_server_client, healthy, "o1", "after a refused origin")


@pytest.mark.parametrize(
    "origin",
    [None, "http://localhost:3000", "http://127.0.0.1:5173"],
    ids=["no-origin", "localhost", "loopback"],
)
async def test_local_origins_and_no_origin_are_accepted(connect, origin):
    headers = {"Origin": origin} if origin else None
    client, _ = await connect("o2", headers=headers)
    await client.send({"type": "ping"})
    await client.expect(type="pong")


@with_settings(allowed_origins=("https://app.example",))
@pytest.mark.parametrize(
    ("origin", "accepted"),
    [
        ("https://app.example", True),
        (None, True),
        ("same", True),
        ("http://localhost:3000", False),
        ("http://app.example", False),
        ("http://evil.example", False),
    ],
    ids=["listed", "no-origin", "same-origin", "localhost-not-listed", "other-scheme", "foreign"],
)
async def test_a_configured_origin_list_replaces_the_default(connect, port, origin, accepted):
    if origin == "same":
        origin = f"http://127.0.0.1:{port}"
    headers = {"Origin": origin} if origin else None
    if accepted:
        await connect("o4", headers=headers)
    else:
        with pytest.raises(HTTPClientError) as refused_handshake:
            await connect.plain("o4", headers=headers)
        assert refused_handshake.value.code == 403


@with_settings(allowed_origins=("*",))
async def test_a_star_origin_list_allows_every_origin(connect):
    await connect("o5", headers={"Origin": "http://evil.example"})


async def test_same_origin_is_accepted(connect, port):
    client, _ = await connect("o3", research=True, headers={"Origin": f"http://127.0.0.1:{port}"})
    await client.send({"type": "ping"})
    await client.expect(type="pong")


# -- 10. closing leaves no trace -------------------------------------------------


@with_settings(max_connections_per_session=2)
async def test_closing_clients_removes_every_trace(connect, http_server_client):
    first, _ = await connect("gone1")
    second, _ = await connect("gone1", research=True)
    third, _ = await connect("gone2")
    snapshot = await stats(http_server_client)
    assert snapshot["active_connections"] == 3
    assert snapshot["connected_sessions"] == ["gone1", "gone2"]
    with pytest.raises(HTTPClientError) as full:
        await connect.plain("gone1")
    assert full.value.code == 503

    first.close()
    await second.send({"type": "disconnect"})
    assert (await second.closed())[0] == 1000
    third.close()
    await wait_until(
        lambda: stats(http_server_client), lambda b: b["active_connections"] == 0 and b["connected_sessions"] == []
    )
    for session_id in ("gone1", "gone2"):
        await wait_until(partial(session_info, http_server_client, session_id), no_connections)

    # the per-session count was given back too: two new connections fit again
    again = [(await connect("gone1"))[0] for _ in range(2)]
    for client in again:
        await client.send({"type": "ping"})
        await client.expect(type="pong")


async def test_a_server_closed_connection_leaves_no_trace(connect, http_server_client):
    client, _ = await connect("gone3")
    refused_client = await connect.plain("gone3", last_seq=5)
    await refused(refused_client)
    await client.send({"type": "disconnect"})
    await client.closed()
    await wait_until(lambda: stats(http_server_client), lambda b: b["active_connections"] == 0)
    await wait_until(lambda: session_info(http_server_client, "gone3"), no_connections)


# -- 11. DELETE /api/sessions/{id} ---------------------------------------------


async def test_delete_session_closes_clients_and_a_later_publish_starts_afresh(connect, http_server_client):
    await publish(http_server_client, "del1", tasks("a", "b"))
    first, old = await connect("del1")
    second, _ = await connect("del1", research=True)
    await session_messages(first, 2)
    await session_messages(second, 2)

    response = await http_server_client.fetch("/api/sessions/del1", method="DELETE")
    assert response.code == 200
    for client in (first, second):
        notice = await client.expect(type="session_closed", session_id="del1")
        assert "seq" not in notice
        code, _ = await client.closed()
        assert code == 1000
        assert client.received[-1]["type"] == "session_closed"

    code, _ = await get_json(http_server_client, "/api/sessions/del1")
    assert code == 404
    assert await publish(http_server_client, "del1", tasks("fresh")) == [1]
    code, session = await get_json(http_server_client, "/api/sessions/del1")
    assert code == 200
    assert session["epoch"] != old["epoch"]
    assert session["last_seq"] == 1

    client, hello = await connect("del1", research=True)
    assert hello["epoch"] == session["epoch"]
    assert [(m["seq"], m["task_id"]) for m in await session_messages(client, 1)] == [(1, "fresh")]


async def test_reconnect_with_the_old_epoch_after_delete_gets_a_gap(connect, http_server_client):
    await publish(http_server_client, "del2", tasks("a", "b", "c"))
    _, old = await connect("del2", replay="none")
    await http_server_client.fetch("/api/sessions/del2", method="DELETE")
    await publish(http_server_client, "del2", tasks("fresh"))
    client = await connect.plain("del2", last_seq=3, epoch=old["epoch"])
    hello = await client.expect(type="connected")
    assert hello["epoch"] != old["epoch"]
    assert await client.receive() == {"type": "gap", "from_seq": 1, "to_seq": None, "epoch": hello["epoch"]}
    assert [m["task_id"] for m in await session_messages(client, 1)] == ["fresh"]
