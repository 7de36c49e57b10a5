"""Server-Sent Events over a real socket (docs/protocol.md section 8).

Every test runs the real application on a real port and reads the stream the
way an `EventSource` or `curl -N` does: the HTTP answer, then `retry:`,
`id:` and `data:` lines and comments, de-chunked from the raw socket. The
SSE client here is deliberately small and strict (one `data:` line per
event, no `event:` field), so a wrong byte on the wire fails a test. The last
test drains a real daemon with SIGTERM. Nothing sleeps: every wait is on
bytes from the socket, or a bounded poll of an HTTP answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jwt
import orjson
import pytest
from tornado.httpclient import AsyncHTTPClient
from tornado.httputil import HTTPHeaders

import handlers.sse
from actors.messages import Frame
from actors.wire import control_frame
from handlers.handshake import HandshakeError
from handlers.sse import event_stream_encoding, parse_last_event_id
from tests.support import with_settings
from tests.support.wire import post, publish, session_info, session_messages, stats, wait_until
from tests.test_daemon import DaemonProcess

SECRET = "sse-test-secret-of-a-decent-length-0123456789"
#: Fields an event of ours may have: no `event:` (EventSource.onmessage gets everything).
FIELDS = {"id", "data", "retry"}


# -- a strict SSE client on a raw socket --------------------------------------------


@dataclass
class Event:
    """One SSE block: its fields (each at most once) and its comment lines."""

    fields: dict[str, str] = field(default_factory=dict)
    comments: list[str] = field(default_factory=list)

    @property
    def id(self) -> str | None:
        return self.fields.get("id")

    @property
    def message(self) -> dict[str, Any]:
        assert "data" in self.fields, f"no data in {self}"
        decoded: dict[str, Any] = orjson.loads(self.fields["data"])
        return decoded


class SseClient:
    """`GET path` over a socket of its own; reads the answer's head at once, the body on demand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self.status = 0
        self.headers = HTTPHeaders()
        #: the de-chunked body so far, for tests of exact bytes
        self.body = b""
        self.ended = False
        self._unparsed = b""
        self._chunked = False

    @classmethod
    async def open(
        cls, port: int, path: str, *, headers: dict[str, str] | None = None, timeout: float = 5.0, **params: Any
    ) -> SseClient:
        query = urlencode({k: v for k, v in params.items() if v is not None})
        target = f"{path}?{query}" if query else path
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        lines = [f"GET {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Accept: text/event-stream"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        client = cls(reader, writer, timeout)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status_line, _, rest = head.decode("latin-1").partition("\r\n")
        client.status = int(status_line.split(" ", 2)[1])
        client.headers = HTTPHeaders.parse(rest)
        client._chunked = client.headers.get("Transfer-Encoding", "").lower() == "chunked"
        return client

    async def json(self) -> Any:
        """A refusal's JSON body (it has a Content-Length)."""
        assert self.headers.get("Content-Type", "").startswith("application/json"), self.headers
        size = int(self.headers["Content-Length"])
        return orjson.loads(await asyncio.wait_for(self.reader.readexactly(size), self.timeout))

    async def _more(self) -> bool:
        """Read the next piece of the body; False once the response has ended."""
        if self.ended:
            return False
        if self._chunked:
            size = int((await asyncio.wait_for(self.reader.readline(), self.timeout)).strip() or b"0", 16)
            if size == 0:
                self.ended = True
                return False
            data = await asyncio.wait_for(self.reader.readexactly(size + 2), self.timeout)
            data = data[:-2]
        else:
            data = await asyncio.wait_for(self.reader.read(65536), self.timeout)
            if not data:
                self.ended = True
                return False
        self.body += data
        self._unparsed += data
        return True

    async def event(self) -> Event | None:
        """The next block; None if the stream ended first."""
        while b"\n\n" not in self._unparsed:
            if not await self._more():
                assert not self._unparsed, f"the stream ended inside an event: {self._unparsed[:200]!r}"
                return None
        block, _, self._unparsed = self._unparsed.partition(b"\n\n")
        event = Event()
        for line in block.decode().split("\n"):
            if line.startswith(":"):
                event.comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            assert name in FIELDS, f"unexpected field {name!r} in {block[:200]!r}"
            assert name not in event.fields, f"{name} twice in one event: {block[:200]!r}"
            event.fields[name] = value.removeprefix(" ")
        return event

    async def next(self, what: str = "") -> Event:
        """The next event with data (keepalive comments skipped); fails if the stream ends first."""
        while True:
            event = await self.event()
            assert event is not None, f"{what + ': ' if what else ''}the stream ended; body tail {self.body[-300:]!r}"
            if "data" in event.fields:
                return event

    async def greeting(self) -> dict[str, Any]:
        """The retry line, then the greeting (which carries no id)."""
        first = await self.event()
        assert first is not None and first.fields == {"retry": "2000"}, first
        hello = await self.next("greeting")
        assert hello.id is None, hello
        return hello.message

    async def session_events(self, count: int) -> list[Event]:
        """The next `count` session messages (each must carry an id)."""
        events = []
        while len(events) < count:
            event = await self.next(f"after {len(events)} of {count}")
            assert event.id is not None, f"expected a session message, got {event}"
            events.append(event)
        return events

    async def rest(self) -> list[Event]:
        """Every event up to the end of the stream, which must come within the timeout."""
        events = []
        while (event := await self.event()) is not None:
            events.append(event)
        return events

    def close(self) -> None:
        self.writer.close()


class Streams:
    """Opens SSE clients to the application under test; all closed at teardown."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.opened: list[SseClient] = []

    async def plain(
        self, session_id: str | None = None, *, research: bool = False, headers: dict[str, str] | None = None,
        timeout: float = 5.0, **params: Any,
    ) -> SseClient:  # fmt: skip
        if research:
            path = f"/sse/research/{session_id}"
        else:
            path = "/sse"
            params["session_id"] = session_id
        client = await SseClient.open(self.port, path, headers=headers, timeout=timeout, **params)
        self.opened.append(client)
        return client

    async def __call__(self, session_id: str, **kwargs: Any) -> tuple[SseClient, dict[str, Any]]:
        """Open a stream that must be accepted; the client and its greeting."""
        client = await self.plain(session_id, **kwargs)
        assert client.status == 200, (client.status, await client.json())
        return client, await client.greeting()

    def close_all(self) -> None:
        for client in self.opened:
            client.close()


@pytest.fixture
def sse(port: int) -> Iterator[Streams]:
    streams = Streams(port)
    yield streams
    streams.close_all()


def tasks(*task_ids: str) -> list[dict[str, Any]]:
    """task_started events: never throttled."""
    return [{"type": "task_started", "task_id": t} for t in task_ids]


def seqs(events: list[Event]) -> list[int]:
    return [e.message["seq"] for e in events]


async def connections(http: Any, session_id: str) -> list[dict[str, Any]]:
    code, body = await session_info(http, session_id)
    return body["connections"] if code == 200 else []


def mint(**claims: Any) -> str:
    base = {"sub": "u1", "sessions": ["t1"], "exp": time.time() + 600}
    base.update(claims)
    return jwt.encode(base, SECRET, algorithm="HS256")


# -- the stream ----------------------------------------------------------------------


@pytest.mark.parametrize(("research", "greeting"), [(False, "connected"), (True, "connection_established")])
async def test_the_answer_is_an_event_stream_that_begins_with_retry_and_the_greeting(sse, research, greeting):
    client = await sse.plain("g1", research=research, user_id="user1")
    assert client.status == 200
    assert client.headers["Content-Type"] == "text/event-stream"
    assert client.headers["Cache-Control"] == "no-cache"
    assert client.headers["X-Request-ID"]
    hello = await client.greeting()
    assert client.body.startswith(b"retry: 2000\n\ndata: {")
    assert (hello["type"], hello["session_id"], hello["user_id"]) == (greeting, "g1", "user1")
    assert hello["epoch"].startswith("e-") and hello["last_seq"] == 0


async def test_session_messages_carry_epoch_slash_seq_and_connection_messages_no_id(sse, http_server_client):
    client, hello = await sse("m1")
    await publish(http_server_client, "m1", tasks("a", "b", "c"))
    events = await client.session_events(3)
    assert [e.id for e in events] == [f"{hello['epoch']}/{n}" for n in (1, 2, 3)]
    assert [(e.message["task_id"], e.message["seq"]) for e in events] == [("a", 1), ("b", 2), ("c", 3)]
    response = await post(http_server_client, "/api/broadcast", {"type": "system_notification", "message": "hi"})
    assert response.code == 202
    notice = await client.next()
    assert notice.id is None
    assert notice.message["type"] == "system_notification"
    assert b"\nevent:" not in client.body


async def test_the_events_filter_applies(sse, http_server_client):
    client, hello = await sse("f1", events="essential")
    assert "task_completed" in hello["events"] and "task_started" not in hello["events"]
    await publish(
        http_server_client, "f1",
        [*tasks("a"), {"type": "task_completed", "task_id": "a"}, {"type": "plan_generated", "plan": []},
         {"type": "session_completed"}],
    )  # fmt: skip
    events = await client.session_events(2)
    assert [(e.message["type"], e.message["seq"]) for e in events] == [("task_completed", 2), ("session_completed", 4)]


@pytest.mark.parametrize(
    ("research", "replay", "replayed"),
    [(False, None, [2]), (True, None, [1, 2]), (False, "all", [1, 2]), (True, "none", [])],
    ids=["sse-default-missed", "research-default-all", "replay-all", "replay-none"],
)
async def test_replay_modes_are_the_websockets(sse, connect, http_server_client, research, replay, replayed):
    watcher, _ = await connect("r1")
    await publish(http_server_client, "r1", tasks("seen"))
    await session_messages(watcher, 1)  # seq 1 was delivered to someone
    watcher.close()
    await wait_until(lambda: connections(http_server_client, "r1"), lambda c: c == [], what="the watcher leaving")
    await publish(http_server_client, "r1", tasks("missed"))  # seq 2 reached no one
    client, _ = await sse("r1", research=research, replay=replay)
    await publish(http_server_client, "r1", tasks("live"))
    events = await client.session_events(len(replayed) + 1)
    assert seqs(events) == [*replayed, 3]


async def test_last_event_id_resumes_after_exactly_that_event(sse, http_server_client):
    first, hello = await sse("l1", research=True)
    await publish(http_server_client, "l1", tasks("a", "b", "c"))
    seen = await first.session_events(3)
    first.close()
    await publish(http_server_client, "l1", tasks("d", "e"))
    # As a browser reconnects: the same URL (here one that asks for everything), plus the last id.
    again, rehello = await sse(
        "l1", research=True, replay="all", last_seq=0, epoch="e-other", headers={"Last-Event-ID": seen[-1].id}
    )
    assert rehello["last_seq"] == 5
    await publish(http_server_client, "l1", tasks("f"))
    resumed = await again.session_events(3)
    assert seqs(resumed) == [4, 5, 6]
    assert [e.id for e in resumed] == [f"{hello['epoch']}/{n}" for n in (4, 5, 6)]


async def test_last_event_id_of_another_epoch_gets_a_gap_from_1_then_everything(sse, http_server_client):
    await publish(http_server_client, "l2", tasks("a", "b"))
    client = await sse.plain("l2", headers={"Last-Event-ID": "e-0123456789abcdef/7"})
    await client.greeting()
    gap = await client.next()
    assert gap.id is None
    assert (gap.message["type"], gap.message["from_seq"], gap.message["to_seq"]) == ("gap", 1, None)
    assert seqs(await client.session_events(2)) == [1, 2]


@with_settings(buffer_size=5)
async def test_messages_evicted_from_history_are_announced_by_a_gap(sse, http_server_client):
    first, hello = await sse("l3")
    await publish(http_server_client, "l3", tasks("a", "b"))
    last = (await first.session_events(2))[-1]
    first.close()
    await publish(http_server_client, "l3", tasks(*"cdefghij"))  # seqs 3-10; history keeps 6-10
    client = await sse.plain("l3", headers={"Last-Event-ID": last.id})
    await client.greeting()
    gap = (await client.next()).message
    assert (gap["type"], gap["from_seq"], gap["to_seq"], gap["epoch"]) == ("gap", 3, 5, hello["epoch"])
    assert seqs(await client.session_events(5)) == [6, 7, 8, 9, 10]


@pytest.mark.parametrize("value", ["nonsense", "e-1/", "/3", "e-1/-1", "e-1/2.5", "e-1/x"])
async def test_a_last_event_id_not_of_the_form_epoch_slash_seq_is_refused_400(sse, value):
    client = await sse.plain("l4", headers={"Last-Event-ID": value})
    assert client.status == 400
    error = "Last-Event-ID must be <epoch>/<seq>, as in the id of an event"
    assert await client.json() == {"error": error, "code": 1008}


@with_settings(keepalive_interval=0.2)
async def test_an_idle_stream_gets_keepalive_comments(sse):
    client, hello = await sse("k1")
    assert hello["keepalive_interval"] == 0.2
    for _ in range(2):
        event = await client.event()
        assert event is not None and event.fields == {} and event.comments == ["keepalive"], event
    assert b"\n\n: keepalive\n\n" in client.body


async def test_task_progress_is_throttled_as_on_a_websocket(sse, connect, http_server_client):
    ws, _ = await connect("th1")
    client, _ = await sse("th1")
    answer = await publish(
        http_server_client, "th1",
        [*tasks("t"), *({"type": "task_progress", "task_id": "t", "progress": p} for p in (10, 12, 14)),
         {"type": "task_completed", "task_id": "t"}],
    )  # fmt: skip
    assert answer == [1, 2, None, None, 3]  # 12 and 14 are noise: held, then dropped by task_completed
    streamed = [(e.message["type"], e.message.get("progress")) for e in await client.session_events(3)]
    assert streamed == [("task_started", None), ("task_progress", 10), ("task_completed", None)]
    assert [(m["type"], m.get("progress")) for m in await session_messages(ws, 3)] == streamed


# -- refusals --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("research", "session_id", "params"),
    [
        (False, None, {}),
        (False, "bad id!", {}),
        (True, "x" * 129, {}),
        (False, "h1", {"user_id": "u" * 129}),
        (False, "h1", {"events": "Task Started"}),
        (False, "h1", {"replay": "sometimes"}),
        (False, "h1", {"last_seq": "-1"}),
    ],
    ids=["missing-session", "invalid-session", "long-path-session", "long-user", "bad-events", "bad-replay",
         "bad-last-seq"],
)  # fmt: skip
async def test_a_bad_parameter_is_400_with_the_websockets_close_reason(sse, connect, research, session_id, params):
    client = await sse.plain(session_id, research=research, **params)
    assert client.status == 400
    body = await client.json()
    ws = await connect.plain(session_id, research=research, **params)
    assert await ws.receive() is None
    assert body == {"error": ws.close_info()[1], "code": 1008}
    assert ws.close_info()[0] == 1008


async def test_last_seq_beyond_the_newest_is_400_before_any_data(sse, http_server_client):
    await publish(http_server_client, "h2", tasks("a"))
    client = await sse.plain("h2", last_seq=2)
    assert client.status == 400
    assert await client.json() == {"error": "last_seq is beyond the session's newest seq", "code": 1008}


@with_settings(max_connections_per_session=2)
async def test_sse_and_websocket_connections_count_together_and_a_closed_stream_frees_its_place(
    sse, connect, http_server_client
):
    ws, _ = await connect("lim1")
    stream, _ = await sse("lim1")
    refused = await sse.plain("lim1")
    assert refused.status == 503
    assert await refused.json() == {"error": "too many connections for this session"}
    with pytest.raises(Exception) as ws_refused:
        await connect.plain("lim1")
    assert getattr(ws_refused.value, "code", None) == 503
    stream.close()  # the client goes away: its actor stops and its place is free again
    await wait_until(lambda: connections(http_server_client, "lim1"), lambda c: len(c) == 1, what="the stream leaving")
    assert (await stats(http_server_client))["active_connections"] == 1
    await sse("lim1")
    assert ws.close_info() == (None, None)


async def test_session_stats_list_each_connections_transport(sse, connect, http_server_client):
    await connect("st1")
    _, hello = await sse("st1", user_id="viewer")
    listed = await connections(http_server_client, "st1")
    assert sorted(c["transport"] for c in listed) == ["sse", "websocket"]
    mine = next(c for c in listed if c["transport"] == "sse")
    assert (mine["connection_id"], mine["user_id"]) == (hello["connection_id"], "viewer")


async def test_deleting_the_session_sends_session_closed_then_ends_the_response(port, http_server_client):
    # A stock HTTP client: the response must end as HTTP says (the last chunk), not by a dropped socket.
    received: list[bytes] = []
    greeted = asyncio.Event()

    def on_chunk(chunk: bytes) -> None:
        received.append(chunk)
        if b'"type":"connected"' in b"".join(received):
            greeted.set()

    fetching = AsyncHTTPClient().fetch(
        f"http://127.0.0.1:{port}/sse?session_id=del1", streaming_callback=on_chunk, request_timeout=10
    )
    await asyncio.wait_for(greeted.wait(), 5)
    response = await http_server_client.fetch("/api/sessions/del1", method="DELETE")
    assert response.code == 200
    answer = await asyncio.wait_for(fetching, 5)
    assert answer.code == 200
    blocks = b"".join(received).decode().split("\n\n")
    assert blocks[-1] == ""
    assert orjson.loads(blocks[-2].removeprefix("data: "))["type"] == "session_closed"


@with_settings(allowed_origins=("https://app.example.com",))
async def test_cors_follows_allowed_origins(sse):
    allowed = await sse.plain("o1", headers={"Origin": "https://app.example.com"})
    assert allowed.status == 200
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "Origin" in allowed.headers["Vary"]
    await allowed.greeting()
    foreign = await sse.plain("o1", headers={"Origin": "https://evil.example"})
    assert foreign.status == 403
    assert "Access-Control-Allow-Origin" not in foreign.headers
    assert "allowed_origins" in (await foreign.json())["error"]


@with_settings(allowed_origins=("https://app.example.com",))
async def test_a_preflight_from_an_allowed_origin_may_send_last_event_id(http_server_client):
    headers = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "GET",
               "Access-Control-Request-Headers": "last-event-id"}  # fmt: skip
    response = await http_server_client.fetch("/sse?session_id=o2", method="OPTIONS", headers=headers)
    assert response.code == 204
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "Last-Event-ID" in response.headers["Access-Control-Allow-Headers"]


# -- tokens -------------------------------------------------------------------------------


@with_settings(jwt_secret=SECRET)
@pytest.mark.parametrize(
    ("token", "status", "code", "error"),
    [
        (None, 401, 4001, "a token is required"),
        ("not-a-jwt", 401, 4001, "invalid token"),
        ("expired", 401, 4001, "token expired"),
        ("other-session", 403, 4003, "token does not cover this session"),
    ],
)
async def test_a_refused_token_is_401_or_403_with_its_close_code(sse, token, status, code, error):
    if token == "expired":
        token = mint(exp=time.time() - 10)
    elif token == "other-session":
        token = mint(sessions=["elsewhere"])
    client = await sse.plain("t1", token=token)
    assert client.status == status
    assert await client.json() == {"error": error, "code": code}


@with_settings(jwt_secret=SECRET)
@pytest.mark.parametrize("where", ["query", "header"])
async def test_a_valid_token_in_the_query_or_a_bearer_header_is_accepted(sse, where):
    token = mint()
    if where == "query":
        _, hello = await sse("t1", token=token)
    else:
        _, hello = await sse("t1", headers={"Authorization": f"Bearer {token}"})
    assert hello["user_id"] == "u1"


@with_settings(jwt_secret=SECRET)
async def test_the_stream_ends_when_its_token_expires(sse, http_server_client):
    client, _ = await sse("t1", token=mint(exp=time.time() + 1.0), timeout=10)
    assert await client.rest() == []  # nothing more, then the end of the response
    # and the connection is closed, not kept alive: read() returns at the end of the stream (what is left of
    # the response's last chunk, if anything)
    assert (await asyncio.wait_for(client.reader.read(), 10)).strip() == b""
    await wait_until(lambda: connections(http_server_client, "t1"), lambda c: c == [], what="the stream leaving")


# -- slow consumers -----------------------------------------------------------------------


async def unread_stream(sse: Streams, http: Any, session_id: str) -> tuple[SseClient, socket.socket, int]:
    """A stream whose client never reads, fed until the broker counts it a slow consumer.

    Returns the client (not yet read from), its socket, and the seq last published.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the server's writes back up soon
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", sse.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    client = SseClient(reader, writer, 10.0)
    sse.opened.append(client)  # closed at teardown, whatever happens
    writer.write(f"GET /sse?session_id={session_id} HTTP/1.1\r\nHost: 127.0.0.1:{sse.port}\r\n\r\n".encode())
    await wait_until(lambda: connections(http, session_id), lambda c: len(c) == 1, what="the stream")
    blob = "x" * 20_000
    published = 0
    for _ in range(200):  # 45 events of 20 kB a request; a few MB fill the kernel's buffers
        answer = await publish(http, session_id, [{"type": "bulk", "blob": blob} for _ in range(45)])
        published = answer[-1] or published
        if (await stats(http))["slow_consumer_disconnects"]:
            return client, sock, published
    raise AssertionError("the stream never counted as a slow consumer")


def server_side_state(server_port: int, client: socket.socket) -> str | None:
    """The TCP state of the server's end of `client`'s connection, from /proc/net/tcp (Linux)."""
    client_port = client.getsockname()[1]
    states = {"01": "ESTABLISHED", "04": "FIN_WAIT1", "05": "FIN_WAIT2", "06": "TIME_WAIT", "07": "CLOSE"}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, state = line.split()[1:4]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
            return states.get(state, state)
    return None


@with_settings(max_queue_bytes=64 * 1024, buffer_size=1000)
async def test_a_stream_that_is_not_read_gets_slow_consumer_then_ends(sse, http_server_client):
    slow, _, published = await unread_stream(sse, http_server_client, "slow1")
    reader = slow.reader

    # Read now: the server gives an ended stream a few seconds for its last bytes.
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200"), head
    slow._chunked = b"chunked" in head.lower()
    events = [e for e in await slow.rest() if e.fields.get("retry") is None]
    last = events[-1].message
    assert (last["type"], last["code"]) == ("error", "slow_consumer")
    assert events[-1].id is None
    delivered = seqs([e for e in events if e.id is not None])
    assert delivered == list(range(1, len(delivered) + 1))  # in order, nothing skipped, then the end
    assert len(delivered) < published
    await wait_until(lambda: connections(http_server_client, "slow1"), lambda c: c == [], what="the slow one leaving")

    # It reconnects as a browser does and gets the rest, still held.
    again = await sse.plain("slow1", headers={"Last-Event-ID": events[-2].id}, timeout=10)
    await again.greeting()
    rest = await again.session_events(published - len(delivered))
    assert seqs(rest) == list(range(len(delivered) + 1, published + 1))


@with_settings(max_queue_bytes=64 * 1024, buffer_size=1000)
async def test_an_ended_stream_whose_client_never_reads_loses_its_socket(sse, http_server_client, monkeypatch):
    monkeypatch.setattr(handlers.sse, "CLOSE_GRACE", 0.3)
    _, sock, _ = await unread_stream(sse, http_server_client, "slow2")
    # Its last bytes wait behind what it never read (ESTABLISHED, until CLOSE_GRACE), or they already went
    # into the kernel's buffers and the server closed at once; either way the server ends up closing its end
    # (its kernel still holds data, so FIN_WAIT1), whether or not the client ever reads.
    assert server_side_state(sse.port, sock) in {"ESTABLISHED", "FIN_WAIT1"}
    await wait_until(
        lambda: stats(http_server_client),
        lambda _: server_side_state(sse.port, sock) not in {"ESTABLISHED", None},
        what="the server closing an unread stream",
    )


# -- the encoding ------------------------------------------------------------------------


def test_a_frames_encoding_is_made_once_and_shared():
    frame = Frame(orjson.dumps({"type": "x", "seq": 7, "epoch": "e-ab"}), "x", 7)
    encoded = event_stream_encoding(frame)
    assert encoded == b'id: e-ab/7\ndata: {"type":"x","seq":7,"epoch":"e-ab"}\n\n'
    assert event_stream_encoding(frame) is encoded
    assert frame.wire is None  # the WebSocket's slot is its own
    notice = control_frame({"type": "system_notification", "message": "a\nb"})
    assert event_stream_encoding(notice) == b'data: {"type":"system_notification","message":"a\\nb"}\n\n'


def test_last_event_id_parsing():
    assert parse_last_event_id("e-ab/12") == ("e-ab", 12)
    assert parse_last_event_id("a/b/3") == ("a/b", 3)
    for bad in ("12", "e-ab/", "/12", "e-ab/1e3", "e-ab/٣"):
        with pytest.raises(HandshakeError):
            parse_last_event_id(bad)


# -- the daemon ------------------------------------------------------------------------


async def test_an_open_stream_outlives_the_http_timeouts_and_sigterm_ends_it_after_server_shutdown(tmp_path):
    # Short header and idle timeouts (docs/protocol.md section 5, "Sockets") govern requests, not an open stream.
    env = {"BROKER_HEADER_TIMEOUT": "0.3", "BROKER_IDLE_TIMEOUT": "0.3", "BROKER_KEEPALIVE_INTERVAL": "0.4"}
    daemon = DaemonProcess(tmp_path, notify=False, **env)
    try:
        await daemon.started()
        client = await SseClient.open(daemon.port, "/sse/research/d1", timeout=15)
        assert client.status == 200
        await client.greeting()
        opened = time.monotonic()
        while time.monotonic() - opened < 2.5:  # past both timeouts and Tornado's own backstop (1.6 s)
            keepalive = await client.event()
            assert keepalive is not None and keepalive.comments == ["keepalive"], keepalive
        assert (await daemon.publish("d1", {"type": "task_started", "task_id": "late"})).code == 202
        assert (await client.next()).message["task_id"] == "late"
        daemon.send(signal.SIGTERM)
        events = [e for e in await client.rest() if e.fields]  # keepalive comments may come first
        assert [e.message["type"] for e in events] == ["server_shutdown"]
        assert events[0].message["reconnect_after_ms"] > 0
        assert events[0].id is None
        assert await daemon.exited() == 0, daemon.output()
        client.close()
    finally:
        with contextlib.suppress(Exception):
            daemon.stop()
