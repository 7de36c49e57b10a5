"""Every limit of docs/protocol.md section 5 over real sockets: refused as documented, and counted.

The real application on a real port (pytest-tornasync). Each test sets one
limit small, goes past it, and checks three things: the refusal a client
sees (HTTP 503 with a JSON `{"error"}` at the handshake or on publishing,
`error` `rate_limited` then close 1008, 400, 413), that the refusal changed
nothing (nothing published, nothing opened, the others still served), and
that an operator sees it counted (`broker_limit_refusals_total{limit=...}`
and `broker_client_messages_rate_limited_total` in /metrics). What was
opened or created is read where an operator reads it too
(`GET /api/websocket/stats`, `GET /api/sessions/{id}`), never from the
broker's own counters.

Token rules themselves are in tests/test_tokens.py, origins in
tests/test_origins.py and tests/test_wire_ws.py, the 413 details of the
publish endpoints in tests/test_wire_http.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from functools import partial
from typing import Any

import jwt
import orjson
import pytest
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from broker.testing import WebSocketClient
from broker.validation import MAX_BATCH_EVENTS
from tests.support import with_settings
from tests.support.wire import metrics, post, post_json, refusals, session_info, stats, wait_until

SECRET = "limits-test-secret-of-a-decent-length-0123"








# -- helpers -------------------------------------------------------------------


async def refused_handshake(port: int, session_id: str, *, research: bool = False, **params: Any) -> str:
    """The handshake is answered HTTP 503 with a JSON `{"error"}`; return the error text."""
    if research:
        path = f"/ws/research/{session_id}"
    else:
        path, params["session_id"] = "/ws", session_id
    with pytest.raises(HTTPClientError) as refused:
        client = await WebSocketClient.connect(port, path, **params)
        client.close()
    assert refused.value.code == 503
    response = refused.value.response
    assert response is not None
    assert response.headers["Content-Type"].startswith("application/json")
    body = orjson.loads(response.body)
    assert list(body) == ["error"]
    assert isinstance(body["error"], str)
    assert body["error"]
    return body["error"]


async def rate_limited(http: Any) -> float:
    """Client messages dropped by max_client_rate, as /metrics counts them."""
    return (await metrics(http)).value("broker_client_messages_rate_limited_total")


async def ping_burst(client: WebSocketClient, count: int) -> list[dict[str, Any]]:
    """Send `count` pings at once, then read one answer per ping (a pong, or an error if it was dropped)."""
    for _ in range(count):
        await client.send({"type": "ping"})
    answers = []
    for _ in range(count):
        answer = await client.receive()
        assert answer is not None, f"closed {client.close_info()} after {answers}"
        answers.append(answer)
    return answers


def token(sub: str = "u1", sessions: Any = "*") -> str:
    return jwt.encode({"sub": sub, "sessions": sessions, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")


# -- max_connections -----------------------------------------------------------


@with_settings(max_connections=2)
async def test_max_connections_refuses_the_next_handshake_with_503(connect, port, http_server_client):
    first, _ = await connect("mc1")
    await connect("mc2", research=True)
    assert await refusals(http_server_client) == {}
    assert await refused_handshake(port, "mc1") == "too many connections"  # a known session
    assert await refused_handshake(port, "mc3", research=True) == "too many connections"  # a new one
    assert await refusals(http_server_client) == {"max_connections": 2}
    await first.send({"type": "ping"})
    await first.expect(type="pong")  # the open ones are untouched
    code, _ = await session_info(http_server_client, "mc3")
    assert code == 404, "a refused handshake creates no session"

    first.close()
    await wait_until(lambda: stats(http_server_client), lambda answer: answer["active_connections"] == 1)
    await connect("mc3")  # the slot was given back


# -- max_connections_per_session ---------------------------------------------------


@with_settings(max_connections_per_session=2)
async def test_max_connections_per_session_refuses_only_that_session(connect, port, http_server_client):
    await connect("ps1")
    await connect("ps1", research=True)
    error = await refused_handshake(port, "ps1")
    assert error == "too many connections for this session"
    await refused_handshake(port, "ps1", research=True)
    assert await refusals(http_server_client) == {"max_connections_per_session": 2}
    await connect("ps2")  # another session is not affected
    code, info = await session_info(http_server_client, "ps1")
    assert code == 200
    assert len(info["connections"]) == 2


# -- max_connections_per_user ----------------------------------------------------


@with_settings(max_connections_per_user=2)
async def test_max_connections_per_user_counts_one_user_across_sessions(connect, port, http_server_client):
    await connect("pu1", user_id="alice")
    await connect("pu2", research=True, user_id="alice")
    assert await refused_handshake(port, "pu3", user_id="alice") == "too many connections for this user"
    assert await refusals(http_server_client) == {"max_connections_per_user": 1}
    await connect("pu3", user_id="bob")  # other users, and clients that name no user, are not affected
    await connect("pu3")


@with_settings(max_connections_per_user=1)
async def test_a_users_slot_is_given_back_when_its_connection_closes(connect, port, http_server_client):
    first, _ = await connect("pu4", user_id="carol")
    await refused_handshake(port, "pu5", user_id="carol")
    await first.send({"type": "disconnect"})
    assert (await first.closed())[0] == 1000
    await wait_until(lambda: stats(http_server_client), lambda answer: answer["active_connections"] == 0)
    await wait_until(partial(session_info, http_server_client, "pu4"), lambda answer: answer[1]["connections"] == [])
    await connect("pu5", user_id="carol")
    assert await refusals(http_server_client) == {"max_connections_per_user": 1}


@with_settings(jwt_secret=SECRET, max_connections_per_user=2)
async def test_with_tokens_the_tokens_sub_is_the_user_that_is_counted(connect, port, http_server_client):
    """No user_id parameter: the token's `sub` counts towards max_connections_per_user."""
    await connect("pt1", token=token("dave"))
    await connect("pt2", research=True, token=token("dave"))
    error = await refused_handshake(port, "pt3", token=token("dave"))
    assert error == "too many connections for this user"
    assert await refusals(http_server_client) == {"max_connections_per_user": 1}
    for session_id in ("pt1", "pt2"):  # each session lists its one connection as the token's user
        code, info = await session_info(http_server_client, session_id)
        assert code == 200
        assert [c["user_id"] for c in info["connections"]] == ["dave"]
    await connect("pt3", token=token("erin"))


@with_settings(jwt_secret=SECRET, max_connections_per_user=2)
async def test_a_token_sent_as_a_subprotocol_counts_towards_the_user_limit_too(port, http_server_client):
    opened = []
    try:
        for session_id in ("sp1", "sp2"):
            request = HTTPRequest(f"ws://127.0.0.1:{port}/ws/research/{session_id}")
            conn = await websocket_connect(request, subprotocols=["bearer", token("frank")])
            opened.append(conn)
            assert orjson.loads(await conn.read_message())["type"] == "connection_established"
        with pytest.raises(HTTPClientError) as refused:
            request = HTTPRequest(f"ws://127.0.0.1:{port}/ws/research/sp3")
            opened.append(await websocket_connect(request, subprotocols=["bearer", token("frank")]))
        assert refused.value.code == 503
        assert await refusals(http_server_client) == {"max_connections_per_user": 1}
    finally:
        for conn in opened:
            conn.close()


# -- max_sessions -------------------------------------------------------------------

#: On a Redis node max_sessions bounds the session actors that node holds (mirrors, one per session it has
#: connections to); a publish or a research start keeps its session in Redis and creates nothing on the node.
PER_NODE_SESSIONS = "max_sessions counts the sessions one node holds; on Redis a publish creates no state on the node"


@pytest.mark.memory_only(PER_NODE_SESSIONS)
@with_settings(max_sessions=2)
async def test_max_sessions_refuses_publishing_to_a_new_session(http_server_client):
    started = {"type": "task_started", "task_id": "t"}
    for session_id in ("ms1", "ms2"):
        code, _ = await post_json(http_server_client, f"/api/sessions/{session_id}/events", started)
        assert code == 202
    code, body = await post_json(http_server_client, "/api/sessions/ms3/events", started)
    assert (code, body) == (503, {"error": "too many sessions"})
    assert await refusals(http_server_client) == {"max_sessions": 1}
    assert (await session_info(http_server_client, "ms3"))[0] == 404

    # a batch touching a new session is refused whole: nothing reaches the existing one either
    batch = [{"type": "task_started", "task_id": "t2", "session_id": sid} for sid in ("ms1", "ms3")]
    code, body = await post_json(http_server_client, "/api/events", batch)
    assert code == 503
    assert await refusals(http_server_client) == {"max_sessions": 2}
    assert (await session_info(http_server_client, "ms1"))[1]["last_seq"] == 1
    assert (await session_info(http_server_client, "ms3"))[0] == 404

    # existing sessions still accept
    code, body = await post_json(http_server_client, "/api/sessions/ms1/events", {**started, "task_id": "t3"})
    assert (code, body) == (202, {"accepted": 1, "seq": [2]})
    assert (await stats(http_server_client))["active_sessions"] == 2


@pytest.mark.memory_only(PER_NODE_SESSIONS)
@with_settings(max_sessions=2)
async def test_max_sessions_refuses_a_websocket_to_a_new_session(connect, port, http_server_client):
    code, _ = await post_json(http_server_client, "/api/sessions/mw1/events", {"type": "session_started"})
    assert code == 202
    await connect("mw2")  # a connection creates a session too: now there are two
    assert await refused_handshake(port, "mw3") == "too many sessions"
    assert await refused_handshake(port, "mw3", research=True) == "too many sessions"
    assert await refusals(http_server_client) == {"max_sessions": 2}
    assert (await session_info(http_server_client, "mw3"))[0] == 404
    client, _ = await connect("mw1", replay="all")  # existing sessions still accept connections
    await client.expect(type="session_started")


@pytest.mark.memory_only(PER_NODE_SESSIONS)
@with_settings(max_sessions=1)
async def test_max_sessions_refuses_a_research_start(http_server_client):
    code, _ = await post_json(http_server_client, "/api/sessions/rs1/events", {"type": "session_started"})
    assert code == 202
    code, body = await post_json(http_server_client, "/api/research/start", {"query": "q", "session_id": "rs2"})
    assert (code, body) == (503, {"error": "too many sessions"})
    assert await refusals(http_server_client) == {"max_sessions": 1}
    assert (await session_info(http_server_client, "rs2"))[0] == 404


# -- max_client_rate and max_client_errors -------------------------------------------


@with_settings(max_client_rate=1, max_client_errors=3)
async def test_rate_limited_messages_count_as_errors_and_close_1008(connect, http_server_client):
    healthy, _ = await connect("rl1")
    client, _ = await connect("rl1")
    answers = []
    for _ in range(10):  # far above one message a second; each answer is read before the next ping
        await client.send({"type": "ping"})
        answer = await client.receive()
        assert answer is not None, f"closed {client.close_info()} after {answers}"
        answers.append((answer["type"], answer.get("code")))
        if answers.count(("error", "rate_limited")) > 3:  # max_client_errors
            break
    assert await client.closed() == (1008, "too many invalid messages")  # right after the error past the limit
    assert answers[0] == ("pong", None), answers  # the bucket starts full
    assert set(answers) == {("pong", None), ("error", "rate_limited")}
    assert await rate_limited(http_server_client) == answers.count(("error", "rate_limited")) == 4

    await healthy.send({"type": "ping"})  # the others go on
    await healthy.expect(type="pong")


@with_settings(max_client_rate=3, max_client_errors=1000)
async def test_every_rate_limited_message_is_counted(connect, http_server_client):
    client, _ = await connect("rl2")
    answers = await ping_burst(client, 20)
    limited = [a for a in answers if a.get("code") == "rate_limited"]
    pongs = [a for a in answers if a["type"] == "pong"]
    assert len(limited) + len(pongs) == 20
    assert len(limited) >= 10
    assert await rate_limited(http_server_client) == len(limited)


class RawWebSocket:
    """A bare RFC 6455 client over a socket: it can keep sending after the server's close frame."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, target: str) -> RawWebSocket:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    def send(self, payload: bytes, opcode: int = 0x1) -> None:
        assert len(payload) < 126
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked)

    async def frame(self) -> tuple[int, bytes]:
        """The next frame from the server: (opcode, payload); (-1, b"") at end of stream."""
        try:
            b0, b1 = await asyncio.wait_for(self.reader.readexactly(2), 5)
        except asyncio.IncompleteReadError:
            return -1, b""
        size = b1 & 0x7F
        if size >= 126:
            size = int.from_bytes(await self.reader.readexactly(2 if size == 126 else 8), "big")
        return b0 & 0x0F, await self.reader.readexactly(size)


@with_settings(max_client_errors=1)
async def test_frames_after_a_1008_close_are_ignored_quietly(port, caplog):
    raw = await RawWebSocket.connect(port, "/ws?session_id=late1")
    assert (await raw.frame())[0] == 0x1  # connected
    raw.send(b"x")
    raw.send(b"x")  # the second error passes max_client_errors: error, then close 1008
    frames = [await raw.frame() for _ in range(3)]
    assert [opcode for opcode, _ in frames] == [0x1, 0x1, 0x8]
    assert int.from_bytes(frames[2][1][:2], "big") == 1008
    raw.send(b'{"type": "ping"}')  # already in flight when a real client reads the close
    raw.send((1000).to_bytes(2, "big"), opcode=0x8)
    while (await raw.frame())[0] != -1:  # the server has read everything once it hangs up
        pass
    raw.writer.close()
    uncaught = [r for r in caplog.records if r.name == "tornado.application" and r.levelno >= logging.ERROR]
    assert uncaught == [], [r.getMessage() for r in uncaught]


# -- publishing: batch size and body size ---------------------------------------------


async def test_a_batch_over_max_batch_events_is_400_and_publishes_nothing(http_server_client):
    event = {"type": "task_started", "task_id": "t"}
    code, body = await post_json(http_server_client, "/api/sessions/bb1/events", [event] * (MAX_BATCH_EVENTS + 1))
    assert code == 400
    assert f"{MAX_BATCH_EVENTS + 1}" in body["error"]
    assert f"{MAX_BATCH_EVENTS}" in body["error"]
    assert (await session_info(http_server_client, "bb1"))[0] == 404
    ndjson = b"".join(orjson.dumps({**event, "session_id": "bb1"}) + b"\n" for _ in range(MAX_BATCH_EVENTS + 1))
    response = await post(http_server_client, "/api/events", ndjson, "application/x-ndjson")
    assert response.code == 400
    assert (await session_info(http_server_client, "bb1"))[0] == 404
    code, body = await post_json(http_server_client, "/api/sessions/bb1/events", [event] * MAX_BATCH_EVENTS)
    assert code == 202
    assert body["accepted"] == MAX_BATCH_EVENTS


async def test_a_batch_over_max_batch_events_is_counted(http_server_client):
    event = {"type": "task_started", "task_id": "t"}
    code, _ = await post_json(http_server_client, "/api/sessions/bb2/events", [event] * (MAX_BATCH_EVENTS + 1))
    assert code == 400
    assert await refusals(http_server_client) == {"max_batch_events": 1}


@with_settings(max_body_size=256)
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/research/start", {"query": "q" * 300}),
        ("/api/broadcast", {"type": "system_notification", "message": "m" * 300}),
    ],
    ids=["research-start", "broadcast"],
)
async def test_other_state_changing_endpoints_answer_413_over_max_body_size(http_server_client, path, body):
    code, answer = await post_json(http_server_client, path, body)
    assert code == 413
    assert "max_body_size" in answer["error"]
    assert (await stats(http_server_client))["active_sessions"] == 0, "nothing was started"


@with_settings(max_body_size=256)
@pytest.mark.parametrize("path", ["/api/research/start", "/api/broadcast", "/no/such/endpoint"])
async def test_a_huge_declared_body_is_refused_without_waiting_for_it_on_every_path(port, path):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {64 * 1024 * 1024}\r\n\r\n".encode()
    )
    try:
        status_line = await asyncio.wait_for(reader.readline(), 1.0)  # the body never comes
    except TimeoutError:
        status_line = b"(no answer: the server waits for 64 MiB of body)"
    finally:
        writer.close()
    assert status_line.split()[1:2] in ([b"413"], [b"404"]), status_line


@with_settings(max_body_size=256)
async def test_a_body_over_max_body_size_is_counted(http_server_client):
    code, _ = await post_json(http_server_client, "/api/sessions/bs1/events", {"type": "x.y", "pad": "p" * 300})
    assert code == 413
    assert await refusals(http_server_client) == {"max_body_size": 1}


# -- operators can see the refusals --------------------------------------------------


@with_settings(max_connections_per_session=1)
async def test_metrics_expose_refusals_by_limit(connect, port, http_server_client):
    await connect("mx1")
    await refused_handshake(port, "mx1")
    by_limit = (await metrics(http_server_client)).refusals()
    assert by_limit.pop("max_connections_per_session") == 1.0
    # Every other limit is exported too, at zero (an operator can alert on any of them).
    assert set(by_limit) >= {"max_connections", "max_connections_per_user", "max_sessions", "max_body_size"}
    assert set(by_limit.values()) == {0.0}


@with_settings(max_client_rate=1, max_client_errors=1000)
async def test_metrics_expose_rate_limited_messages(connect, http_server_client):
    client, _ = await connect("mx2")
    answers = await ping_burst(client, 5)
    limited = [a for a in answers if a.get("code") == "rate_limited"]
    assert limited, answers
    samples = await metrics(http_server_client)
    assert samples.value("broker_client_messages_rate_limited_total") == len(limited)

