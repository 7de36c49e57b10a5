"""Every limit of docs/protocol.md section 5 over real sockets: refused as documented, and counted.

The real application on a real port (pytest-tornasync). Each test sets one
limit small, goes past it, and checks three things: the refusal a client
sees (HTTP 503 with a JSON `{"error"}` at the handshake or on publishing,
`error` `rate_limited` then close 1008, 400, 413), that the refusal changed
nothing (nothing published, nothing opened, the others still served), and
that the broker counted it (`broker.stats.refusals[limit]`,
`broker.stats.rate_limited_messages`, and their /metrics families) so an
operator can see it.

Token rules themselves are in tests/test_tokens.py, origins in
tests/test_origins.py and tests/test_wire_ws.py, the 413 details of the
publish endpoints in tests/test_wire_http.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import jwt
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from broker.testing import WebSocketClient
from broker.validation import MAX_BATCH_EVENTS
from tests.support import with_settings

JSON = {"Content-Type": "application/json"}
SECRET = "limits-test-secret-of-a-decent-length-0123"








# -- helpers -------------------------------------------------------------------


@pytest.fixture
def connect(broker, port):
    """Open a WebSocket on `/ws` (or `path`) and read its greeting; every client is closed at teardown."""
    opened: list[WebSocketClient] = []

    async def connect(session_id: str, *, path: str | None = None, **params: Any) -> WebSocketClient:
        if path is None:
            path, params["session_id"] = "/ws", session_id
        client = await WebSocketClient.connect(port, path, **params)
        opened.append(client)
        greeting = await client.receive()
        assert greeting is not None, f"closed {client.close_info()} instead of greeting"
        assert greeting["type"] in {"connected", "connection_established"}, greeting
        return client

    yield connect
    for client in opened:
        client.close()


async def refused_handshake(port: int, session_id: str, *, path: str | None = None, **params: Any) -> str:
    """The handshake is answered HTTP 503 with a JSON `{"error"}`; return the error text."""
    if path is None:
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


async def post_json(http: Any, path: str, body: Any) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    response = await http.fetch(path, method="POST", headers=JSON, body=data, raise_error=False)
    return response.code, orjson.loads(response.body)


async def session_info(http: Any, session_id: str) -> tuple[int, dict[str, Any]]:
    response = await http.fetch(f"/api/sessions/{session_id}", raise_error=False)
    return response.code, orjson.loads(response.body)


async def wait_until(http: Any, done: Any, attempts: int = 500) -> None:
    """Until `done()`: each try waits for one HTTP round trip (no sleeps), a bounded number of times."""
    for _ in range(attempts):
        if done():
            return
        await http.fetch("/healthz")
    raise AssertionError("the broker never reached the expected state")


def token(sub: str = "u1", sessions: Any = "*") -> str:
    return jwt.encode({"sub": sub, "sessions": sessions, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")


async def scrape(http: Any) -> list[Any]:
    response = await http.fetch("/metrics")
    assert response.code == 200
    return [s for family in text_string_to_metric_families(response.body.decode()) for s in family.samples]


# -- max_connections -----------------------------------------------------------


@with_settings(max_connections=2)
async def test_max_connections_refuses_the_next_handshake_with_503(connect, port, broker, http_server_client):
    first = await connect("mc1")
    await connect("mc2", path="/ws/research/mc2")
    assert broker.stats.refusals == {}
    for path in (None, "/ws/research/mc3"):  # both endpoints, new and known sessions alike
        assert await refused_handshake(port, "mc1", path=path) == "too many connections"
    assert broker.stats.refusals == {"max_connections": 2}
    await first.send({"type": "ping"})
    await first.expect(type="pong")  # the open ones are untouched
    code, _ = await session_info(http_server_client, "mc3")
    assert code == 404, "a refused handshake creates no session"

    first.close()
    await wait_until(http_server_client, lambda: broker.open_connections == 1)
    await connect("mc3")  # the slot was given back


# -- max_connections_per_session ---------------------------------------------------


@with_settings(max_connections_per_session=2)
async def test_max_connections_per_session_refuses_only_that_session(connect, port, broker, http_server_client):
    await connect("ps1")
    await connect("ps1", path="/ws/research/ps1")
    error = await refused_handshake(port, "ps1")
    assert error == "too many connections for this session"
    await refused_handshake(port, "ps1", path="/ws/research/ps1")
    assert broker.stats.refusals == {"max_connections_per_session": 2}
    await connect("ps2")  # another session is not affected
    code, info = await session_info(http_server_client, "ps1")
    assert code == 200
    assert len(info["connections"]) == 2


# -- max_connections_per_user ----------------------------------------------------


@with_settings(max_connections_per_user=2)
async def test_max_connections_per_user_counts_one_user_across_sessions(connect, port, broker):
    await connect("pu1", user_id="alice")
    await connect("pu2", path="/ws/research/pu2", user_id="alice")
    assert await refused_handshake(port, "pu3", user_id="alice") == "too many connections for this user"
    assert broker.stats.refusals == {"max_connections_per_user": 1}
    await connect("pu3", user_id="bob")  # other users, and clients that name no user, are not affected
    await connect("pu3")


@with_settings(max_connections_per_user=1)
async def test_a_users_slot_is_given_back_when_its_connection_closes(connect, port, broker, http_server_client):
    first = await connect("pu4", user_id="carol")
    await refused_handshake(port, "pu5", user_id="carol")
    await first.send({"type": "disconnect"})
    assert (await first.closed())[0] == 1000
    await wait_until(http_server_client, lambda: "carol" not in broker.user_counts)
    await connect("pu5", user_id="carol")
    assert broker.stats.refusals == {"max_connections_per_user": 1}


@with_settings(jwt_secret=SECRET, max_connections_per_user=2)
async def test_with_tokens_the_tokens_sub_is_the_user_that_is_counted(connect, port, broker):
    """No user_id parameter: the token's `sub` counts towards max_connections_per_user."""
    await connect("pt1", token=token("dave"))
    await connect("pt2", path="/ws/research/pt2", token=token("dave"))
    error = await refused_handshake(port, "pt3", token=token("dave"))
    assert error == "too many connections for this user"
    assert broker.stats.refusals == {"max_connections_per_user": 1}
    assert broker.user_counts == {"dave": 2}
    await connect("pt3", token=token("erin"))


@with_settings(jwt_secret=SECRET, max_connections_per_user=2)
async def test_a_token_sent_as_a_subprotocol_counts_towards_the_user_limit_too(port, broker):
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
        assert broker.stats.refusals == {"max_connections_per_user": 1}
    finally:
        for conn in opened:
            conn.close()


# -- max_sessions -------------------------------------------------------------------


@with_settings(max_sessions=2)
async def test_max_sessions_refuses_publishing_to_a_new_session(http_server_client, broker):
    started = {"type": "task_started", "task_id": "t"}
    for session_id in ("ms1", "ms2"):
        code, _ = await post_json(http_server_client, f"/api/sessions/{session_id}/events", started)
        assert code == 202
    code, body = await post_json(http_server_client, "/api/sessions/ms3/events", started)
    assert (code, body) == (503, {"error": "too many sessions"})
    assert broker.stats.refusals == {"max_sessions": 1}
    assert (await session_info(http_server_client, "ms3"))[0] == 404

    # a batch touching a new session is refused whole: nothing reaches the existing one either
    batch = [{"type": "task_started", "task_id": "t2", "session_id": sid} for sid in ("ms1", "ms3")]
    code, body = await post_json(http_server_client, "/api/events", batch)
    assert code == 503
    assert broker.stats.refusals == {"max_sessions": 2}
    assert (await session_info(http_server_client, "ms1"))[1]["last_seq"] == 1
    assert (await session_info(http_server_client, "ms3"))[0] == 404

    # existing sessions still accept
    code, body = await post_json(http_server_client, "/api/sessions/ms1/events", {**started, "task_id": "t3"})
    assert (code, body) == (202, {"accepted": 1, "seq": [2]})
    assert len(broker.directory) == 2


@with_settings(max_sessions=2)
async def test_max_sessions_refuses_a_websocket_to_a_new_session(connect, port, http_server_client, broker):
    code, _ = await post_json(http_server_client, "/api/sessions/mw1/events", {"type": "session_started"})
    assert code == 202
    await connect("mw2")  # a connection creates a session too: now there are two
    assert await refused_handshake(port, "mw3") == "too many sessions"
    assert await refused_handshake(port, "mw3", path="/ws/research/mw3") == "too many sessions"
    assert broker.stats.refusals == {"max_sessions": 2}
    assert (await session_info(http_server_client, "mw3"))[0] == 404
    client = await connect("mw1", replay="all")  # existing sessions still accept connections
    await client.expect(type="session_started")


@with_settings(max_sessions=1)
async def test_max_sessions_refuses_a_research_start(http_server_client, broker):
    code, _ = await post_json(http_server_client, "/api/sessions/rs1/events", {"type": "session_started"})
    assert code == 202
    code, body = await post_json(http_server_client, "/api/research/start", {"query": "q", "session_id": "rs2"})
    assert (code, body) == (503, {"error": "too many sessions"})
    assert broker.stats.refusals == {"max_sessions": 1}
    assert (await session_info(http_server_client, "rs2"))[0] == 404


# -- max_client_rate and max_client_errors -------------------------------------------


@with_settings(max_client_rate=1, max_client_errors=3)
async def test_rate_limited_messages_count_as_errors_and_close_1008(connect, broker):
    healthy = await connect("rl1")
    client = await connect("rl1")
    answers = []
    for _ in range(10):  # far above one message a second; each answer is read before the next ping
        await client.send({"type": "ping"})
        answer = await client.receive()
        assert answer is not None, f"closed {client.close_info()} after {answers}"
        answers.append((answer["type"], answer.get("code")))
        if answers.count(("error", "rate_limited")) > broker.settings.max_client_errors:
            break
    assert await client.closed() == (1008, "too many invalid messages")  # right after the error past the limit
    assert answers[0] == ("pong", None), answers  # the bucket starts full
    assert set(answers) == {("pong", None), ("error", "rate_limited")}
    assert broker.stats.rate_limited_messages == answers.count(("error", "rate_limited")) == 4

    await healthy.send({"type": "ping"})  # the others go on
    await healthy.expect(type="pong")


@with_settings(max_client_rate=3, max_client_errors=1000)
async def test_every_rate_limited_message_is_counted(connect, broker):
    client = await connect("rl2")
    for _ in range(20):
        await client.send({"type": "ping"})
    answers = [await client.receive() for _ in range(20)]  # one answer per ping: pong, or error if dropped
    limited = [a for a in answers if a is not None and a.get("code") == "rate_limited"]
    pongs = [a for a in answers if a is not None and a["type"] == "pong"]
    assert len(limited) + len(pongs) == 20
    assert len(limited) >= 10
    assert broker.stats.rate_limited_messages == len(limited)


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


async def test_a_batch_over_max_batch_events_is_400_and_publishes_nothing(http_server_client, broker):
    event = {"type": "task_started", "task_id": "t"}
    code, body = await post_json(http_server_client, "/api/sessions/bb1/events", [event] * (MAX_BATCH_EVENTS + 1))
    assert code == 400
    assert f"{MAX_BATCH_EVENTS + 1}" in body["error"]
    assert f"{MAX_BATCH_EVENTS}" in body["error"]
    assert (await session_info(http_server_client, "bb1"))[0] == 404
    ndjson = b"".join(orjson.dumps({**event, "session_id": "bb1"}) + b"\n" for _ in range(MAX_BATCH_EVENTS + 1))
    response = await http_server_client.fetch(
        "/api/events", method="POST", headers={"Content-Type": "application/x-ndjson"}, body=ndjson, raise_error=False
    )
    assert response.code == 400
    assert (await session_info(http_server_client, "bb1"))[0] == 404
    code, body = await post_json(http_server_client, "/api/sessions/bb1/events", [event] * MAX_BATCH_EVENTS)
    assert code == 202
    assert body["accepted"] == MAX_BATCH_EVENTS


async def test_a_batch_over_max_batch_events_is_counted(http_server_client, broker):
    event = {"type": "task_started", "task_id": "t"}
    code, _ = await post_json(http_server_client, "/api/sessions/bb2/events", [event] * (MAX_BATCH_EVENTS + 1))
    assert code == 400
    refusals = {
        s.labels["limit"]: s.value for s in await scrape(http_server_client) if s.name == "broker_limit_refusals_total"
    }
    assert refusals["max_batch_events"] == 1.0
    assert sum(refusals.values()) == 1.0


@with_settings(max_body_size=256)
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/research/start", {"query": "q" * 300}),
        ("/api/broadcast", {"type": "system_notification", "message": "m" * 300}),
    ],
    ids=["research-start", "broadcast"],
)
async def test_other_state_changing_endpoints_answer_413_over_max_body_size(http_server_client, broker, path, body):
    code, answer = await post_json(http_server_client, path, body)
    assert code == 413
    assert "max_body_size" in answer["error"]
    assert len(broker.directory) == 0, "nothing was started"


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
async def test_a_body_over_max_body_size_is_counted(http_server_client, broker):
    code, _ = await post_json(http_server_client, "/api/sessions/bs1/events", {"type": "x.y", "pad": "p" * 300})
    assert code == 413
    refusals = {
        s.labels["limit"]: s.value for s in await scrape(http_server_client) if s.name == "broker_limit_refusals_total"
    }
    assert refusals["max_body_size"] == 1.0
    assert sum(refusals.values()) == 1.0


# -- operators can see the refusals --------------------------------------------------


@with_settings(max_connections_per_session=1)
async def test_metrics_expose_refusals_by_limit(connect, port, broker, http_server_client):
    await connect("mx1")
    await refused_handshake(port, "mx1")
    assert broker.stats.refusals == {"max_connections_per_session": 1}
    refusals = {
        s.labels["limit"]: s.value for s in await scrape(http_server_client) if s.name == "broker_limit_refusals_total"
    }
    assert refusals.pop("max_connections_per_session") == 1.0
    # Every other limit is exported too, at zero (an operator can alert on any of them).
    assert set(refusals) >= {"max_connections", "max_connections_per_user", "max_sessions", "max_body_size"}
    assert set(refusals.values()) == {0.0}


@with_settings(max_client_rate=1, max_client_errors=1000)
async def test_metrics_expose_rate_limited_messages(connect, broker, http_server_client):
    client = await connect("mx2")
    for _ in range(5):
        await client.send({"type": "ping"})
    await client.receive_until(code="rate_limited")
    samples = await scrape(http_server_client)
    limited = [s.value for s in samples if s.name == "broker_client_messages_rate_limited_total"]
    assert limited == [float(broker.stats.rate_limited_messages)]
    assert limited[0] >= 1
