"""Hostile input against the real application (docs/protocol.md sections 2, 3 and 6).

Property-based tests (hypothesis) that throw arbitrary WebSocket frames, JSON
shapes, unicode, huge numbers, deeply nested payloads, malformed publish
bodies and hostile handshake query strings at the application on a real
port, and check, for every example, that

* the answer is the documented one: an `error` with a documented `code`, a
  documented reply, close 1009 over `max_message_size`, or close 1008 with a
  reason before any data at the handshake; HTTP 202/400/413/415/422 with a
  JSON body of the documented shape; never a 1011, a 500 or a dropped
  connection without a close code;
* the application stays up, and a "witness" client on another session keeps
  receiving every event published to it, in order, with no holes.

The properties (one test each):

1. any WebSocket frame (text, binary, JSON values, client-message shapes,
   nesting past 1024 levels, sizes around 64 KiB) gets exactly its documented
   answer; with `max_client_errors`/`max_client_rate` raised, errors never close;
2. any publish request (bytes, JSON, NDJSON, batches, event-like objects,
   nesting, sizes around `max_body_size`, any Content-Type and X-Request-ID)
   gets 202/400/413/415/422 with the documented body, and a refusal publishes
   nothing;
3. any handshake query string (and research path) gets a greeting or close
   1008 with a reason before any data (or HTTP 403/503);
4. any HTTP framing of a publish (lengths that lie, chunked, none) is answered
   below 500 or closed, and the server stays up;

plus: eleven bad frames of any kind close 1008 after eleven errors, a flood
past `max_client_rate` does too, and regression tests for what the properties
found (an event nested deeper than orjson writes was accepted, then a 500;
the same for broadcasts; a handshake argument that is not UTF-8 was a 400 or
a socket dropped without a close code).

How the properties run: hypothesis cannot drive pytest-tornasync's async
tests, so each property is a plain test whose examples each run one
`io_loop.run_sync(...)` against the app the `port` fixture serves. The
clients a property keeps (the witness, the hostile client) are opened once by
a fixture and live across examples on that same loop.

Nothing here sleeps: every wait is a message (bounded by the client's
timeout) or a bounded number of awaited HTTP requests.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, event, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from broker.testing import WebSocketClient
from broker.validation import SESSION_ID_RE
from tests.support import with_settings
from tests.support.wire import get_json, next_message, post, send_raw

JSON = "application/json"
NDJSON = "application/x-ndjson"

WITNESS_SESSION = "witness.session"
HOSTILE_SESSION = "hostile.session"
TARGET_SESSION = "target.session"

#: Message types a client may send (section 3, "Client to server").
CLIENT_TYPES = ("ping", "subscribe", "unsubscribe", "disconnect", "ack", "query", "refresh")
#: The `code` of an `error` answering a client's own bad input (section 3, "Bad input").
INPUT_ERROR_CODES = frozenset({"bad_json", "bad_message", "unknown_type", "rate_limited", "bad_token"})
#: Session messages a hostile client's own queries put into its session.
QUERY_TYPES = frozenset({"query_start", "chunk", "complete", "error"})
#: Known publisher types (section 1).
KNOWN_TYPES = (
    "session_started",
    "session_completed",
    "session_cancelled",
    "plan_generated",
    "task_started",
    "task_progress",
    "task_completed",
    "task_failed",
    "report_generated",
    "query_start",
    "chunk",
    "complete",
    "error",
    "system_notification",
)
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
MAX_MESSAGE_SIZE = 64 * 1024
BODY_LIMIT = 4096

#: Examples per property: the whole file runs well under a minute.
FRAME_EXAMPLES = 300
HTTP_EXAMPLES = 200
HANDSHAKE_EXAMPLES = 200

#: A failing example may hold a 1 MiB frame: hypothesis warns that printing it is costly, which
#: filterwarnings=error would turn into an error hiding the real failure.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr:hypothesis.errors.HypothesisWarning")

PROPERTY = hypothesis_settings(
    deadline=None,
    database=None,  # no .hypothesis/ directory in the work tree; failures print their reproduction
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)








@pytest.fixture
def run(io_loop) -> Callable[..., Any]:
    """Run one coroutine function to completion on the test's loop (one hypothesis example)."""

    def run(fn: Callable[..., Awaitable[Any]], *args: Any, timeout: float = 30) -> Any:
        return io_loop.run_sync(lambda: fn(*args), timeout=timeout)

    return run


# --------------------------------------------------------------------------
# Strategies: what a hostile peer sends

#: Integers orjson reads as floats (over 64 bits), and the 64-bit edges.
HUGE_INTS = st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 2**200, -(2**200)]) | st.builds(
    lambda sign, exponent: sign * 10**exponent, st.sampled_from([1, -1]), st.integers(19, 400)
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | HUGE_INTS
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=25,
)


def dumps(value: Any, ensure_ascii: bool = False) -> str:
    """Python's JSON writer: big integers as digits, NaN/Infinity as the (non-JSON) bare words."""
    return json.dumps(value, ensure_ascii=ensure_ascii, allow_nan=True)


def nested_text(depth: int, kind: str, leaf: str = "1") -> str:
    """`depth` levels of arrays or objects around `leaf`, as text (no recursion in a JSON writer)."""
    if kind == "list":
        return "[" * depth + leaf + "]" * depth
    return '{"k":' * depth + leaf + "}" * depth


def padded_to(size: int, pad: str, prefix: str = '{"type":"ping","pad":"', suffix: str = '"}') -> str:
    """A JSON text of exactly `size` UTF-8 bytes: `prefix`, `pad` repeated (then ASCII), `suffix`."""
    room = size - len((prefix + suffix).encode())
    unit = len(pad.encode())
    body = pad * (room // unit)
    body += "x" * (room - len(body.encode()))
    text = prefix + body + suffix
    assert len(text.encode()) == size
    return text


EVENT_ITEMS = (
    st.lists(st.sampled_from(["all", "*", "essential", "planning", "task_progress", "x.y"]), min_size=1, max_size=4)
    | st.lists(
        st.sampled_from(["all", "*", "essential", "planning", "task_progress", "-task_progress", "Bad", "", "a" * 65])
        | st.text(max_size=20)
        | JSON_VALUES,
        max_size=5,
    )
    | JSON_VALUES
)
CLIENT_MESSAGES = st.fixed_dictionaries(
    {
        "type": st.sampled_from(CLIENT_TYPES)
        | st.sampled_from(["", "PING", "ping ", " ping", "ping\n", "pong", "connected", "error", "task_progress"])
        | st.text(max_size=80)
        | JSON_VALUES
    },
    optional={
        "events": EVENT_ITEMS,
        "seq": st.integers(min_value=-5) | HUGE_INTS | JSON_VALUES,
        "query": st.text(max_size=40) | JSON_VALUES,
        "session_id": st.sampled_from([HOSTILE_SESSION, WITNESS_SESSION, ""]) | JSON_VALUES,
        "include_context": st.booleans() | JSON_VALUES,
        "system_prompt": st.text(max_size=20) | JSON_VALUES,
        "token": st.text(max_size=40) | JSON_VALUES,
        "extra": JSON_VALUES | st.floats(),  # NaN / Infinity make the whole text non-JSON
    },
)
#: Messages of each client type with fields that are right, nearly right, or wrong.
PLAUSIBLE_MESSAGES = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["subscribe", "unsubscribe"]), "events": EVENT_ITEMS}),
    st.fixed_dictionaries({"type": st.just("ack"), "seq": st.integers(min_value=-3) | HUGE_INTS | st.floats()}),
    st.fixed_dictionaries(
        {"type": st.just("query"), "query": st.text(max_size=40)},
        optional={
            "session_id": st.sampled_from([HOSTILE_SESSION, WITNESS_SESSION]),
            "include_context": st.booleans() | st.integers(0, 1),
            "system_prompt": st.text(max_size=20) | st.none(),
        },
    ),
    st.fixed_dictionaries({"type": st.just("refresh")}, optional={"token": st.text(max_size=40) | JSON_VALUES}),
    st.fixed_dictionaries({"type": st.sampled_from(["ping", "disconnect"])}, optional={"extra": JSON_VALUES}),
)
#: Nesting up to past orjson's read limit (1024), bare or inside a message that is otherwise fine.
DEEP_FRAMES = st.builds(
    lambda depth, kind, wrap: (
        '{"type":"ping","deep":' + nested_text(depth, kind) + "}" if wrap else nested_text(depth, kind)
    ),
    st.integers(1, 1100),
    st.sampled_from(["list", "dict"]),
    st.booleans(),
)
#: Frames around max_message_size (exactly 64 KiB is allowed), in multi-byte characters too.
SIZED_TEXT = st.builds(
    padded_to,
    st.sampled_from([MAX_MESSAGE_SIZE - 1, MAX_MESSAGE_SIZE, MAX_MESSAGE_SIZE + 1, 100_000, 1 << 20]),
    st.sampled_from(["x", "\u00e9", "\u20ac", "\U0001f600", "\\u0000"]),
)
SIZED_BINARY = st.builds(lambda n: b"\x00" * n, st.sampled_from([MAX_MESSAGE_SIZE, MAX_MESSAGE_SIZE + 1]))
SPECIAL_TEXTS = st.sampled_from(
    [
        "",
        " ",
        "null",
        "NaN",
        '{"type": "ping", "x": NaN}',
        '{"type": "ping", "x": Infinity}',
        '{"type": "ping", "x": 1e400}',
        '{"type": "ping", "x": -1e400}',
        '{"type": "ping", "x": "\\ud800"}',  # a lone surrogate escape
        '{"type": "ping", "x": "\\udc00\\ud800"}',
        '\ufeff{"type": "ping"}',  # a byte order mark
        '{"type": "ping"} trailing',
        '{"type": "ping"}{"type": "ping"}',
        '{"type": "ping", "type": "nope"}',  # duplicate keys: the last wins
        '{"type": "ack", "seq": 18446744073709551616}',
        '{"type": "ack", "seq": -0}',
        '{"type": "ack", "seq": 1.0}',
        '{"type": "ack", "seq": true}',
        '{"type": "subscribe", "events": "all"}',
        '{"type": "subscribe", "events": []}',
        '{"type": "query", "query": "   "}',
        "\x00\x01\x02",
        '{"type": "\u0000"}',
    ]
)
FRAMES = st.one_of(
    st.text(),  # any unicode (surrogate-free), control characters included
    st.binary(max_size=256),  # binary frames
    st.builds(dumps, JSON_VALUES, st.booleans()),  # any JSON value
    st.builds(dumps, CLIENT_MESSAGES, st.booleans()),  # objects shaped like client messages
    st.builds(dumps, PLAUSIBLE_MESSAGES, st.booleans()),  # each client type, right or nearly
    st.builds(dumps, PLAUSIBLE_MESSAGES, st.booleans()),  # (twice: they need the weight)
    DEEP_FRAMES,
    SIZED_TEXT,
    SIZED_BINARY,
    SPECIAL_TEXTS,
)


# --------------------------------------------------------------------------
# The witness: a well-behaved client on a session nobody hostile touches


class Witness:
    """Gets exactly one event per check, the next seq, and nothing else."""

    def __init__(self, port: int, http: Any, session_id: str = WITNESS_SESSION) -> None:
        self.port = port
        self.http = http
        self.session_id = session_id
        self.client: WebSocketClient | None = None
        self.last_seq = 0
        self.count = 0

    async def open(self) -> None:
        self.client = await WebSocketClient.connect(
            self.port, "/ws", session_id=self.session_id, replay="none", timeout=10
        )
        greeting = await self.client.expect(type="connected", session_id=self.session_id)
        self.last_seq = greeting["last_seq"]

    async def check(self) -> None:
        """Publish one event to the witness session: it must arrive next, with the next seq."""
        assert self.client is not None
        self.count += 1
        path = f"/api/sessions/{self.session_id}/events"
        response = await post(self.http, path, {"type": "test.witness", "n": self.count})
        assert response.code == 202, response.body
        assert orjson.loads(response.body)["seq"] == [self.last_seq + 1]
        message = await next_message(self.client, "witness")
        got = (message.get("type"), message.get("n"), message.get("seq"))
        assert got == ("test.witness", self.count, self.last_seq + 1), message
        self.last_seq += 1

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


# --------------------------------------------------------------------------
# Property 1: any WebSocket frame


def expected_answers(frame: str | bytes) -> tuple[set[tuple[str, ...]], int | None]:
    """What the server may answer to `frame` (control messages, in order) and the close code it ends with.

    The JSON reading is orjson's, as documented by the server's behaviour:
    integers over 64 bits become floats, NaN / Infinity / 1e400 and lone
    surrogate escapes are not JSON, nesting past 1024 levels is not JSON.
    """
    size = len(frame) if isinstance(frame, bytes) else len(frame.encode())
    if size > MAX_MESSAGE_SIZE:
        return {()}, 1009
    if isinstance(frame, bytes):
        return {("error:bad_json",)}, None
    try:
        message = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return {("error:bad_json",)}, None
    if not isinstance(message, dict):
        return {("error:bad_json",)}, None
    mtype = message.get("type")
    if not isinstance(mtype, str) or not mtype:
        return {("error:bad_message",)}, None
    if mtype not in CLIENT_TYPES:
        return {("error:unknown_type",)}, None
    if mtype == "ping":
        return {("pong",)}, None
    if mtype in ("subscribe", "unsubscribe"):
        return {("subscribed",), ("error:bad_message",)}, None
    if mtype == "disconnect":
        return {("disconnected",)}, 1000
    if mtype == "refresh":
        return {("error:bad_token",)}, None  # this server has no tokens
    if mtype == "ack":
        seq = message.get("seq")
        ok = isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0
        return {()} if ok else {("error:bad_message",)}, None
    # query
    query = message.get("query")
    ok = isinstance(query, str) and bool(query.strip())
    ok = ok and message.get("session_id") in (None, HOSTILE_SESSION)
    ok = ok and isinstance(message.get("include_context", True), bool)
    ok = ok and isinstance(message.get("system_prompt", ""), str)
    return ({(), ("error:busy",)} if ok else {("error:bad_message",)}), None


def signature(message: dict[str, Any]) -> str:
    """A control message as the oracle names it; checks the documented shape on the way."""
    mtype = message["type"]
    if mtype == "error":
        assert isinstance(message.get("error"), str), message
        assert isinstance(message.get("timestamp"), str), message
        assert message.get("code") in INPUT_ERROR_CODES | {"busy"}, message
        return f"error:{message['code']}"
    if mtype == "subscribed":
        assert isinstance(message.get("events"), list), message
        assert all(isinstance(item, str) for item in message["events"]), message
    if mtype == "pong":
        assert isinstance(message.get("timestamp"), str), message
    return mtype


#: After each frame: goes through the session (like subscribe answers and busy errors), so
#: its `subscribed` comes after everything the frame caused; it also undoes any unsubscribe.
SENTINEL = {"type": "subscribe", "events": ["all"]}


class HostileClient:
    """One connection to HOSTILE_SESSION that sends the frames; reopened after a close."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.client: WebSocketClient | None = None
        self.errors = 0
        self.last_seq = 0

    async def connection(self) -> WebSocketClient:
        if self.client is not None and self.errors > 800:  # far below max_client_errors=1000
            await self.hang_up()
        if self.client is None:
            self.client = await WebSocketClient.connect(
                self.port, "/ws", session_id=HOSTILE_SESSION, replay="none", timeout=10
            )
            await self.client.expect(type="connected")
            self.errors = 0
            self.last_seq = 0
        return self.client

    async def hang_up(self) -> None:
        if self.client is not None:
            self.client.close()
            while await self.client.receive() is not None:
                pass
            self.client = None

    async def receive(self) -> dict[str, Any] | None:
        """The next control message (session messages are checked and skipped); None on close."""
        assert self.client is not None
        while True:
            message = await self.client.receive()
            if message is None:
                return None
            if message["type"] == "keepalive":
                continue
            if "seq" in message:
                # Only this client's own queries put messages into its session.
                assert message["type"] in QUERY_TYPES, message
                assert message["seq"] > self.last_seq, (message, self.last_seq)
                self.last_seq = message["seq"]
                continue
            return message

    async def exchange(self, frame: str | bytes) -> None:
        allowed, close_code = expected_answers(frame)
        client = await self.connection()
        await client.send(frame)
        answers: list[str] = []
        if close_code is not None:
            while (message := await self.receive()) is not None:
                answers.append(signature(message))
            code, reason = client.close_info()
            client.close()
            self.client = None
            assert code == close_code, (code, reason, answers)
            assert tuple(answers) in allowed, (answers, allowed)
            event(f"closed {code}")
            return
        await client.send(SENTINEL)
        subscribed_seen = 0
        # A valid (un)subscribe is answered `subscribed` too, before the sentinel's.
        wanted = 2 if ("subscribed",) in allowed else 1
        while subscribed_seen < wanted:
            message = await self.receive()
            assert message is not None, f"closed {client.close_info()} after {answers}; allowed {allowed}"
            name = signature(message)
            if name == "subscribed":
                subscribed_seen += 1
                if subscribed_seen == wanted:
                    break
            answers.append(name)
            if name == "error:bad_message" and wanted == 2:
                wanted = 1  # the (un)subscribe was refused: only the sentinel's is left
        self.errors += sum(1 for name in answers if name.removeprefix("error:") in INPUT_ERROR_CODES)
        assert tuple(answers) in allowed, (answers, allowed)
        event(f"answered {', '.join(answers) or 'nothing'}")


@pytest.fixture
def frame_rig(run, port, http_server_client):
    hostile = HostileClient(port)
    witness = Witness(port, http_server_client)
    run(witness.open)
    yield hostile, witness
    run(hostile.hang_up)
    witness.close()


@with_settings(max_client_errors=1000, max_client_rate=100_000)
@hypothesis_settings(PROPERTY, max_examples=FRAME_EXAMPLES)
@given(frame=FRAMES)
def test_any_frame_gets_its_documented_answer_and_other_sessions_are_untouched(frame, frame_rig, run):
    hostile, witness = frame_rig

    async def example() -> None:
        await hostile.exchange(frame)
        await witness.check()

    run(example)


# --------------------------------------------------------------------------
# Property 2: any publish request body

HEADER_TEXT = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
CONTENT_TYPES = st.one_of(
    st.just(JSON),
    st.just(NDJSON),
    st.sampled_from(
        [
            f"{JSON}; charset=utf-8",
            f'{JSON}; charset="UTF-8"',
            f"{NDJSON};charset=utf-8",
            f"{JSON}; charset=latin-1",
            f"{NDJSON}; charset=utf-16",
            f"{JSON}; boundary=x",
            "APPLICATION/JSON",
            "text/plain",
            "application/x-www-form-urlencoded",
            "application/jsonx",
            f"{JSON}, text/plain",
            "",
        ]
    ),
    HEADER_TEXT,
)
#: Session ids for events: the target, another, or anything (never the witness's).
EVENT_SESSIONS = st.sampled_from([TARGET_SESSION, "target.other"]) | st.text(max_size=20).filter(
    lambda s: s != WITNESS_SESSION
)
#: docs/protocol.md section 2.3, the known types and the fields each requires, with well-typed values.
GOOD_FIELDS: dict[str, Any] = {
    "task_id": st.text(min_size=1, max_size=8),
    "progress": st.integers(0, 100) | st.floats(0, 100),
    "error": st.text(max_size=8),
    "message": st.text(max_size=8),
    "content": st.text(max_size=8),
    "full_response": st.text(max_size=8),
    "chunk_number": st.integers(1, 10),
    "total_chunks": st.integers(0, 10),
    "plan": JSON_VALUES,
    "report": JSON_VALUES,
    "query": JSON_VALUES,
}
REQUIRES = {
    "plan_generated": ("plan",),
    "task_started": ("task_id",),
    "task_progress": ("task_id", "progress"),
    "task_completed": ("task_id",),
    "task_failed": ("task_id", "error"),
    "report_generated": ("report",),
    "query_start": ("query",),
    "chunk": ("content", "chunk_number"),
    "complete": ("full_response", "total_chunks"),
    "error": ("error",),
    "system_notification": ("message",),
}
#: Any field, with any value, or an almost-right one.
ANY_FIELDS = {
    "task_id": st.text(max_size=8) | JSON_VALUES,
    "progress": st.integers(-10, 110) | st.floats() | HUGE_INTS | JSON_VALUES,
    "current_action": st.text(max_size=8) | JSON_VALUES,
    "chunk_number": st.integers(-2, 5) | HUGE_INTS | JSON_VALUES,
    "total_chunks": st.integers(-2, 5) | HUGE_INTS | JSON_VALUES,
    "error": st.text(max_size=8) | JSON_VALUES,
    "event_id": st.text(max_size=130) | JSON_VALUES,
    "correlation_id": st.text(max_size=130) | JSON_VALUES,
    "timestamp": st.text(max_size=30) | JSON_VALUES,
    "session_id": EVENT_SESSIONS | JSON_VALUES,
    "seq": JSON_VALUES,
    "epoch": JSON_VALUES,
    "payload": JSON_VALUES | st.floats(),
}
TYPES = (
    st.sampled_from(KNOWN_TYPES)
    | st.sampled_from(["test.custom", "a", "a" * 64, "a" * 65, "Task_progress", "", "1x", "x\n"])
    | st.text(max_size=70)
    | JSON_VALUES
)
ANY_EVENTS = st.fixed_dictionaries({"type": TYPES}, optional=ANY_FIELDS)
GOOD_EVENTS = st.sampled_from([*KNOWN_TYPES, "test.custom"]).flatmap(
    lambda etype: st.fixed_dictionaries(
        {"type": st.just(etype), **{name: GOOD_FIELDS[name] for name in REQUIRES.get(etype, ())}},
        optional={"session_id": st.just(TARGET_SESSION), "payload": JSON_VALUES, "current_action": st.text(max_size=5)},
    )
)
EVENTS = ANY_EVENTS | GOOD_EVENTS | GOOD_EVENTS
ITEMS = EVENTS | JSON_VALUES


def json_body(value: Any, ensure_ascii: bool = False) -> bytes:
    return dumps(value, ensure_ascii).encode()


def ndjson_body(items: list[Any], separator: bytes) -> bytes:
    return b"".join(dumps(item).encode() + separator for item in items)


NDJSON_BODIES = st.builds(ndjson_body, st.lists(ITEMS, max_size=6), st.sampled_from([b"\n", b"\r\n", b"\n\n", b" "]))
JSON_BODIES = st.one_of(
    st.builds(json_body, JSON_VALUES, st.booleans()),  # any JSON value
    st.builds(json_body, EVENTS, st.booleans()),  # one event, right or wrong
    st.builds(json_body, st.lists(ITEMS, max_size=6)),  # a batch
    st.builds(  # deep nesting in an event's payload, up to past orjson's read limit
        lambda depth, kind: ('{"type":"test.deep","payload":' + nested_text(depth, kind) + "}").encode(),
        st.integers(1, 1100),
        st.sampled_from(["list", "dict"]),
    ),
    st.builds(  # sizes around max_body_size (exactly the limit is allowed)
        lambda size, pad: padded_to(size, pad, '{"type":"test.pad","pad":"').encode(),
        st.sampled_from([BODY_LIMIT - 1, BODY_LIMIT, BODY_LIMIT + 1, 3 * BODY_LIMIT]),
        st.sampled_from(["x", "\u00e9", "\U0001f600"]),
    ),
    st.sampled_from(
        [
            b"",
            b" \n ",
            b"[]",
            b"{}",
            b"null",
            b"\xff\xfe",
            b'{"type": "test.x", "v": "\xc3"}',  # truncated UTF-8
            b'\xef\xbb\xbf{"type": "test.x"}',  # a byte order mark
            b'{"type": "test.x", "v": NaN}',
            b'{"type": "test.x", "v": 1e400}',
            b'{"type": "test.x", "v": "\\ud800"}',
            b'{"type": "test.x"}\n{',
            b'{"type": "test.x"} {"type": "test.x"}',
            b"[" + b",".join([b"{}"] * 1001) + b"]",  # over the 1000-event batch limit
            b'{"type": "test.x", "event_id": "dup"}\n{"type": "test.x", "event_id": "dup"}',
            b'{"type": "task_progress", "task_id": "t", "progress": 100.0000001}',
            b'{"type": "chunk", "content": "c", "chunk_number": 18446744073709551616}',
        ]
    ),
)
#: (body, Content-Type): mostly the type that fits the body, so most requests get past the 415.
PUBLISH_BODIES = st.one_of(
    st.tuples(JSON_BODIES, st.just(JSON)),
    st.tuples(JSON_BODIES, st.just(JSON)),
    st.tuples(NDJSON_BODIES, st.just(NDJSON)),
    st.tuples(JSON_BODIES | NDJSON_BODIES | st.binary(max_size=300), CONTENT_TYPES),  # any bytes too
)


def media_type_ok(content_type: str) -> bool:
    """docs/protocol.md section 2.2: JSON or NDJSON, any case, with no charset or utf-8."""
    media, *params = content_type.split(";")
    if media.strip().lower() not in (JSON, NDJSON):
        return False
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() != "utf-8":
            return False
    return True


def items_in(body: bytes, content_type: str) -> int:
    """How many events an accepted body held."""
    if content_type.split(";", maxsplit=1)[0].strip().lower() == NDJSON:
        return sum(1 for line in body.split(b"\n") if line.strip())
    value = orjson.loads(body)
    return 1 if isinstance(value, dict) else len(value)


async def events_received(http: Any) -> int:
    code, stats = await get_json(http, "/api/websocket/stats")
    assert code == 200, stats
    return stats["total_events_received"]


async def target_last_seq(http: Any) -> int | None:
    code, body = await get_json(http, f"/api/sessions/{TARGET_SESSION}")
    assert code in (200, 404), body
    return body["last_seq"] if code == 200 else None


async def publish_hostile(
    http: Any, path: str, body: bytes, content_type: str, request_id: str | None
) -> tuple[int, Any]:
    """POST; check what every answer must have; return (status, JSON body)."""
    headers = {"X-Request-ID": request_id} if request_id is not None else {}
    response = await post(http, path, body, content_type=content_type, headers=headers)
    answered_id = response.headers.get("X-Request-ID", "")
    assert REQUEST_ID_RE.fullmatch(answered_id), answered_id
    if request_id is not None and REQUEST_ID_RE.fullmatch(request_id):
        assert answered_id == request_id
    assert response.headers.get("Content-Type", "").startswith(JSON), response.headers
    answer = orjson.loads(response.body)
    assert isinstance(answer, dict), answer
    if response.code != 202:
        assert isinstance(answer.get("error"), str), answer
        assert answer["error"], answer
    return response.code, answer


PUBLISH_PATHS = st.one_of(
    st.just(f"/api/sessions/{TARGET_SESSION}/events"),
    st.just("/api/events"),
    st.text(min_size=1, max_size=20)
    .filter(lambda s: s != WITNESS_SESSION)
    .map(lambda s: f"/api/sessions/{urllib.parse.quote(s, safe='')}/events"),
)


@pytest.fixture
def witness(run, port, http_server_client):
    """A Witness open across a sync (hypothesis) test's examples."""
    client = Witness(port, http_server_client)
    run(client.open)
    yield client
    client.close()


@with_settings(max_body_size=BODY_LIMIT, min_delta=0.0)  # min_delta=0: no progress is held, last_seq is exact
@hypothesis_settings(PROPERTY, max_examples=HTTP_EXAMPLES)
@given(
    path=PUBLISH_PATHS,
    request=PUBLISH_BODIES,
    request_id=st.none() | HEADER_TEXT,
)
def test_any_publish_body_gets_a_documented_status_and_a_refused_one_publishes_nothing(
    path, request, request_id, witness, http_server_client, run
):
    body, content_type = request
    http = http_server_client

    async def example() -> None:
        received_before = await events_received(http)
        seq_before = await target_last_seq(http)
        status, answer = await publish_hostile(http, path, body, content_type, request_id)
        event(f"status {status}")
        if len(body) > BODY_LIMIT:
            assert status == 413, (status, answer)
        elif not media_type_ok(content_type):
            assert status == 415, (status, answer)
        else:
            assert status in (202, 400, 422), (status, answer)
        if status == 202:
            n = items_in(body, content_type)
            assert answer["accepted"] == n, answer
            assert len(answer["seq"]) == n, answer
            assert all(s is None or (isinstance(s, int) and s >= 1) for s in answer["seq"]), answer
            assert await events_received(http) <= received_before + n
            if path.startswith(f"/api/sessions/{TARGET_SESSION}/"):
                new = [s for s in answer["seq"] if s is not None]
                assert await target_last_seq(http) == max([seq_before or 0, *new])
        else:
            if status == 422:
                details = answer.get("details")
                assert isinstance(details, list), answer
                assert details, answer
                for detail in details:
                    assert isinstance(detail.get("index"), int), detail
                    assert detail["index"] >= 0, detail
                    assert isinstance(detail.get("field"), str), detail
                    assert isinstance(detail.get("error"), str), detail
            assert await events_received(http) == received_before, "a refused request published something"
            assert await target_last_seq(http) == seq_before, "a refused request published something"
        code, health = await get_json(http, "/healthz")
        assert code == 200, health
        await witness.check()

    run(example)


# --------------------------------------------------------------------------
# Property 3: any handshake query string

INVALID = object()  # a value that is not UTF-8


def as_read(value: str | bytes) -> Any:
    """A query parameter as the server reads it (tornado: control characters to spaces, stripped)."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return INVALID
    return re.sub(r"[\x00-\x08\x0e-\x1f]", " ", value).strip()


def handshake_verdict(params: dict[str, str | bytes], path_session: str | None) -> str:
    """ "greet", "refuse" (1008 before any data) or "either".

    Not modelled ("either"): whether an `events` list is good (any valid type
    name is), and a `last_seq` of very many digits with an `epoch`.
    """
    read = {name: as_read(value) for name, value in params.items() if name != "token"}
    if any(value is INVALID for value in read.values()):
        return "refuse"
    session_id = path_session if path_session is not None else read.get("session_id")
    if not session_id or not SESSION_ID_RE.match(session_id):
        return "refuse"
    if len(read.get("user_id", "")) > 128:
        return "refuse"
    if read.get("replay") not in (None, "", "all", "missed", "none"):
        return "refuse"
    verdict = "greet"
    last_seq = read.get("last_seq")
    if last_seq is not None:
        if not (last_seq.isascii() and last_seq.isdigit()):
            return "refuse"
        # Every session here is empty: beyond its newest seq (0) unless another epoch is named.
        if int(last_seq) > 0 and not read.get("epoch"):
            return "refuse"
        if len(last_seq) > 18:
            verdict = "either"
    return "either" if "events" in read else verdict


def query_values(plausible: list[str]) -> st.SearchStrategy[str | bytes]:
    return st.sampled_from(plausible) | st.text(max_size=30) | st.binary(min_size=1, max_size=6)


VALID_SESSION_IDS = st.from_regex(r"[A-Za-z0-9_.:-]{1,128}", fullmatch=True).filter(lambda s: s != WITNESS_SESSION)
HANDSHAKE_PARAMS = st.fixed_dictionaries(
    {},
    optional={
        "session_id": VALID_SESSION_IDS | query_values(["hs.a", "x" * 128, "x" * 129, "", " hs.b ", "a b", "a/b"]),
        "user_id": query_values(["u1", "x" * 128, "x" * 129, "", " "]),
        "events": query_values(["all", "essential,-chunk", "-task_progress", "chunk,x.y", "*", "nope!", ",", "A"]),
        "replay": query_values(["all", "missed", "none", "", "ALL", "some"]),
        "last_seq": query_values(["0", "1", "5", "-1", "1e3", "\u0663", "9" * 18, "9" * 19, " 0", "0x1"])
        | st.integers(-5, 10**30).map(str),
        "epoch": query_values(["e-x", ""]),
        "token": query_values(["abc", "a.b.c"]),
    },
)
PATH_SESSIONS = st.none() | VALID_SESSION_IDS | st.text(min_size=1, max_size=30).filter(lambda s: s != WITNESS_SESSION)


async def handshake(port: int, params: dict[str, str | bytes], path_session: str | None) -> None:
    if path_session is None:
        path, greeting_type = "/ws", "connected"
    else:
        path, greeting_type = f"/ws/research/{urllib.parse.quote(path_session, safe='')}", "connection_established"
    url = f"ws://127.0.0.1:{port}{path}?{urllib.parse.urlencode(params)}"
    verdict = handshake_verdict(params, path_session)
    try:
        conn = await websocket_connect(HTTPRequest(url, connect_timeout=10, request_timeout=10))
    except HTTPClientError as exc:
        event(f"HTTP {exc.code}")
        assert exc.code in (403, 503), (exc.code, url)
        return
    client = WebSocketClient(conn, timeout=10)
    first = None
    try:
        first = await client.receive()
        if first is None:
            code, reason = client.close_info()
            event("refused 1008" if code == 1008 else f"closed {code}")
            assert code == 1008, (code, reason, url)
            assert reason, url
            assert verdict != "greet", (reason, url)
            return
        event("greeted")
        assert verdict != "refuse", (first, url)
        assert first["type"] == greeting_type, first
        read = {name: as_read(value) for name, value in params.items()}
        assert first["session_id"] == (path_session if path_session is not None else read["session_id"]), first
        assert first["user_id"] == (read.get("user_id") or None), first  # empty means absent
        assert isinstance(first["events"], list), first
        assert all(isinstance(item, str) for item in first["events"]), first
        assert first["last_seq"] == 0, first
        if read.get("last_seq") and int(read["last_seq"]) > 0:  # a seq of another epoch: all again, from 1
            gap = await next_message(client, "gap")
            assert (gap["type"], gap["from_seq"], gap["to_seq"]) == ("gap", 1, None), gap
    finally:
        client.close()
        if first is not None:  # still open: wait until the server has seen the close
            while await client.receive() is not None:
                pass


@hypothesis_settings(PROPERTY, max_examples=HANDSHAKE_EXAMPLES)
@given(params=HANDSHAKE_PARAMS, path_session=PATH_SESSIONS)
def test_any_handshake_query_gets_a_greeting_or_a_1008_before_any_data(params, path_session, witness, port, run):

    async def example() -> None:
        await handshake(port, params, path_session)
        await witness.check()

    run(example)


# --------------------------------------------------------------------------
# The error limit: more than max_client_errors answers to bad input close 1008

COUNTED_ERRORS = frozenset(f"error:{code}" for code in INPUT_ERROR_CODES)


def one_counted_error(frame: str | bytes) -> bool:
    allowed, close_code = expected_answers(frame)
    return close_code is None and len(allowed) == 1 and next(iter(allowed)) in {(name,) for name in COUNTED_ERRORS}


BAD_FRAMES = st.one_of(
    st.text(max_size=50),
    st.binary(max_size=50),
    st.builds(dumps, JSON_VALUES),
    st.builds(dumps, CLIENT_MESSAGES),
    st.fixed_dictionaries({"type": st.just("refresh")}, optional={"token": st.text(max_size=10)}).map(dumps),
).filter(one_counted_error)


@hypothesis_settings(PROPERTY, max_examples=30)
@given(frames=st.lists(BAD_FRAMES, min_size=11, max_size=11))
def test_more_than_max_client_errors_of_any_kind_answers_each_then_closes_1008(frames, witness, port, run):
    """Default max_client_errors=10: eleven bad frames get eleven errors, then close 1008."""

    async def example() -> None:
        client = await WebSocketClient.connect(port, "/ws", session_id="errors.s", replay="none", timeout=10)
        await client.expect(type="connected")
        for frame in frames:
            await client.send(frame)
        answers = []
        while (message := await client.receive()) is not None:
            if message["type"] != "keepalive":
                answers.append(signature(message))
        code, reason = client.close_info()
        client.close()
        assert (code, reason) == (1008, "too many invalid messages"), (code, reason, answers)
        assert answers == [next(iter(expected_answers(frame)[0]))[0] for frame in frames]
        await witness.check()

    run(example)


async def test_a_flood_past_max_client_rate_is_answered_rate_limited_then_closed_1008(http_server_client, port):
    """Default max_client_rate=50 a second and max_client_errors=10: a flood of pings is cut off."""
    witness = Witness(port, http_server_client)
    await witness.open()
    client = await WebSocketClient.connect(port, "/ws", session_id="flood.s", replay="none", timeout=10)
    await client.expect(type="connected")
    for _ in range(300):
        await client.send({"type": "ping"})
    code, reason = await client.closed()
    kinds = [signature(m) for m in client.received[1:] if m["type"] != "keepalive"]
    assert set(kinds) <= {"pong", "error:rate_limited"}, kinds
    assert kinds.count("error:rate_limited") == 11, kinds  # the eleventh error closes
    assert kinds[-1] == "error:rate_limited"
    assert (code, reason) == (1008, "too many invalid messages")
    await witness.check()
    witness.close()


# --------------------------------------------------------------------------
# Deep nesting: the documented 422, not a 500 when the message is written


def nested_value(depth: int) -> Any:
    """`depth` levels of arrays (parsed from text: no recursion limit to hit here)."""
    return orjson.loads(nested_text(depth, "list", "0"))


async def test_an_event_nested_as_deep_as_allowed_is_delivered_intact_and_one_level_more_is_a_422(
    http_server_client, port
):
    """The event object is level 1; MAX_NESTING (128) levels in all are fine, 129 are a 422."""
    from broker.validation import MAX_NESTING

    http = http_server_client
    witness = Witness(port, http)
    await witness.open()
    reader = Witness(port, http, "deep.s")
    await reader.open()
    assert reader.client is not None
    payload = nested_value(MAX_NESTING - 1)
    response = await post(http, "/api/sessions/deep.s/events", {"type": "test.deep", "payload": payload})
    assert response.code == 202, response.body
    message = await next_message(reader.client, "deep reader")
    assert message["payload"] == payload
    for depth in (MAX_NESTING, 253, 254, 1000):
        single = '{"type": "test.deep", "payload": ' + nested_text(depth, "list", "0") + "}"
        batch = (
            '[{"type": "test.ok", "session_id": "deep.s"}, '
            '{"type": "plan_generated", "session_id": "deep.s", "plan": ' + nested_text(depth, "dict", "0") + "}]"
        )
        for path, body, where in (
            ("/api/sessions/deep.s/events", single, (0, "payload")),
            ("/api/events", batch, (1, "plan")),
        ):
            response = await post(http, path, body.encode())
            assert response.code == 422, (depth, response.code, response.body)
            details = orjson.loads(response.body)["details"]
            assert [(d["index"], d["field"]) for d in details] == [where], details
    code, info = await get_json(http, "/api/sessions/deep.s")
    assert (code, info["last_seq"]) == (200, 1), "a refused batch published something"
    await witness.check()
    witness.close()
    reader.close()


@pytest.mark.parametrize("depth", [10, 253, 254, 1000])
async def test_a_broadcast_nested_deeply_is_answered_not_a_500(http_server_client, port, depth):
    """POST /api/broadcast takes any fields; a deeply nested one must get an answer, not a 500."""
    http = http_server_client
    witness = Witness(port, http)
    await witness.open()
    assert witness.client is not None
    body = '{"type": "system_notification", "message": "deep", "data": ' + nested_text(depth, "list", "0") + "}"
    response = await post(http, "/api/broadcast", body.encode())
    if depth < 100:
        assert response.code == 202, response.body
        message = await next_message(witness.client, "broadcast")
        assert message["data"] == nested_value(depth)
    else:
        assert response.code == 422, (response.code, response.body)
        assert orjson.loads(response.body)["details"][0]["field"] == "data"
    await witness.check()
    witness.close()


# --------------------------------------------------------------------------
# Handshake arguments that are not UTF-8 (found by the handshake property)


@pytest.mark.parametrize("name", ["session_id", "user_id", "events", "replay", "last_seq", "epoch", "research path"])
async def test_a_handshake_argument_that_is_not_utf8_closes_1008_with_a_reason(http_server_client, port, name):
    """Was: HTTP 400 at the handshake (session_id, user_id, the research path) or, for arguments
    read once the socket is open (events, replay, last_seq, epoch), a socket dropped without a close code."""
    params = {"session_id": "utf8.s", "user_id": "u1"}
    path = "/ws"
    if name == "research path":
        path = "/ws/research/s%FF"
        del params["session_id"]
    url = f"ws://127.0.0.1:{port}{path}?{urllib.parse.urlencode(params)}"
    if name != "research path":
        url += f"&{name}=%FF%FE"
    conn = await websocket_connect(HTTPRequest(url, connect_timeout=10, request_timeout=10))
    client = WebSocketClient(conn, timeout=10)
    assert await client.receive() is None
    code, reason = client.close_info()
    client.close()
    assert code == 1008, (code, reason)
    assert reason == f"{'session_id' if name == 'research path' else name} is not valid UTF-8"
    # The server is fine, and the same client can still connect properly.
    witness = Witness(port, http_server_client, "utf8.s")
    await witness.open()
    await witness.check()
    witness.close()


# --------------------------------------------------------------------------
# Property 4: HTTP framing of a publish: lengths that lie, chunked bodies, no length at all

FRAMINGS = ("exact", "chunked", "declared_more", "declared_less", "chunked_garbage", "no_length", "bad_length")
STATUS_RE = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


def raw_request(path: str, content_type: str, body: bytes, framing: str, chunk: int) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: {content_type}\r\n"
    payload = body
    if framing == "exact":
        head += f"Content-Length: {len(body)}\r\n"
    elif framing == "declared_more":  # the client then stops sending: the body never completes
        head += f"Content-Length: {len(body) + 10}\r\n"
    elif framing == "declared_less":  # the rest is read as the next request
        head += f"Content-Length: {max(0, len(body) - 3)}\r\n"
    elif framing == "bad_length":
        head += f"Content-Length: {len(body)}, {len(body) + 1}\r\n"
    elif framing == "chunked":
        head += "Transfer-Encoding: chunked\r\n"
        pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)]
        payload = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"
    elif framing == "chunked_garbage":
        head += "Transfer-Encoding: chunked\r\n"
    return head.encode() + b"\r\n" + payload


#: Framings after which the server waits for bytes that never come: the client half-closes, and
#: the server, seeing the end of the stream, closes (tornado treats it as a close, so no answer).
INCOMPLETE = ("declared_more", "chunked_garbage")


@with_settings(max_body_size=BODY_LIMIT, min_delta=0.0)
@hypothesis_settings(PROPERTY, max_examples=100)
@given(
    path=st.sampled_from([f"/api/sessions/{TARGET_SESSION}/events", "/api/events"]),
    request=PUBLISH_BODIES,
    framing=st.sampled_from(FRAMINGS),
    chunk=st.integers(1, 5000),
)
def test_any_http_framing_of_a_publish_is_answered_below_500_or_closed_and_the_server_stays_up(
    path, request, framing, chunk, witness, http_server_client, port, run
):
    body, content_type = request
    if not content_type.strip():
        content_type = "x"  # an empty header line would end the head early

    async def example() -> None:
        received_before = await events_received(http_server_client)
        request = raw_request(path, content_type, body, framing, chunk)
        answer = await send_raw(port, request, half_close=framing in INCOMPLETE)
        statuses = [int(code) for code in STATUS_RE.findall(answer)]
        event(f"{framing}: {statuses[:2]}")
        assert all(status < 500 for status in statuses), answer[:500]
        if framing in ("exact", "chunked"):  # well framed: the documented answer, like property 2
            assert statuses, "a well-framed request got no answer"
            if len(body) > BODY_LIMIT:
                assert statuses[0] == 413, answer[:300]
            elif not media_type_ok(content_type):
                assert statuses[0] == 415, answer[:300]
            else:
                assert statuses[0] in (202, 400, 422), answer[:300]
        if 202 not in statuses:
            assert await events_received(http_server_client) == received_before, answer[:300]
        code, health = await get_json(http_server_client, "/healthz")
        assert code == 200, health
        await witness.check()

    run(example)
