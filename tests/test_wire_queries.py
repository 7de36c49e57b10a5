"""Agent queries over real sockets (docs/protocol.md section 3.7).

The HTTP upstream is a real Tornado server started inside each test on the
same IOLoop, on a free port; its handlers stream NDJSON or text with a flush
per piece, fail in the ways an upstream fails, or stall. The demo backend
is exercised over the wire with several clients of one session.

Nothing here sleeps: every wait is on a message (bounded by the client's
timeout) or a bounded `asyncio.wait_for` on an event the upstream sets.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import orjson
import pytest
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.iostream import StreamClosedError
from tornado.testing import bind_unused_port

from broker.config import Settings
from broker.queries import DemoAgent, HttpUpstream
from broker.testing import WebSocketClient
from tests.support.wire import next_message

NDJSON_LINES = ["Hello", ", wörld", " and ", "good ☀ day!"]
TEXT_PIECES = [b"The sky ", b"looks blue ", b"caf\xc3", b"\xa9 style, ", b"because of Rayleigh scattering."]
TEXT_ANSWER = b"".join(TEXT_PIECES).decode()
STALL_LINES = ["one ", "two "]
OVERLOAD_LINES = ["partial ", "answer "]
IDLE = 0.3  # the stall test's idle timeout (seconds)


# -- the upstream: a real HTTP server on the test's loop ---------------------------------


class Upstream:
    """What the upstream saw, and the knobs its handlers share."""

    def __init__(self) -> None:
        self.port = 0
        self.requests: list[tuple[str, str | None, dict[str, Any]]] = []
        #: the stall handler waits on this; no test sets it (teardown does, to let the handler end)
        self.release = asyncio.Event()
        #: set when the connection of a stalled request is closed by its client (the broker)
        self.stalled_closed = asyncio.Event()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


class _UpstreamHandler(tornado.web.RequestHandler):
    def initialize(self, upstream: Upstream) -> None:
        self.upstream = upstream

    def prepare(self) -> None:
        self.upstream.requests.append(
            (self.request.path, self.request.headers.get("Content-Type"), orjson.loads(self.request.body))
        )

    async def send_pieces(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self.write(piece)
            await self.flush()

    async def send_lines(self, items: list[dict[str, Any]]) -> None:
        self.set_header("Content-Type", "application/x-ndjson")
        await self.send_pieces([orjson.dumps(item) + b"\n" for item in items])


class NdjsonHandler(_UpstreamHandler):
    """One line per flush, plus a line split over two flushes and a last line without a newline."""

    async def post(self) -> None:
        self.set_header("Content-Type", "application/x-ndjson; charset=utf-8")
        first, second, third, last = (orjson.dumps({"content": text}) for text in NDJSON_LINES)
        await self.send_pieces([first + b"\n", b"\n", second[:7], second[7:] + b"\n", third + b"\n", last])


class TextHandler(_UpstreamHandler):
    """Plain text in pieces, with a UTF-8 character split across two of them."""

    async def post(self) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        await self.send_pieces(TEXT_PIECES)


class StallHandler(_UpstreamHandler):
    async def post(self) -> None:
        await self.send_lines([{"content": text} for text in STALL_LINES])
        await self.upstream.release.wait()  # a stalled model: nothing more, the connection stays open
        with contextlib.suppress(StreamClosedError):
            self.finish()

    def on_connection_close(self) -> None:
        self.upstream.stalled_closed.set()


class OverloadHandler(_UpstreamHandler):
    async def post(self) -> None:
        await self.send_lines([{"content": text} for text in OVERLOAD_LINES] + [{"error": "model overloaded"}])


class MalformedHandler(_UpstreamHandler):
    async def post(self) -> None:
        self.set_header("Content-Type", "application/x-ndjson")
        await self.send_pieces([b'{"content": "fine "}\n', b"this is not json\n", b'{"content": "never shown"}\n'])


class WrongShapeHandler(_UpstreamHandler):
    async def post(self) -> None:
        await self.send_lines([{"content": "fine "}, {"text": "not a content line"}, {"content": "never shown"}])


class FailHandler(_UpstreamHandler):
    def post(self) -> None:
        self.set_status(500)
        self.finish('{"content": "this body must not become a chunk"}\n')


def start_server(io_loop: Any, routes: list[tuple[str, type, dict[str, Any]]]) -> tuple[HTTPServer, int]:
    sock, port = bind_unused_port()
    server = HTTPServer(tornado.web.Application(routes))
    server.add_socket(sock)
    return server, port


def refused_url() -> str:
    """An address where nothing listens: a port bound and closed again."""
    sock, port = bind_unused_port()
    sock.close()
    return f"http://127.0.0.1:{port}/answer"


@pytest.fixture
def upstream(io_loop):
    up = Upstream()
    deps = {"upstream": up}
    server, up.port = start_server(
        io_loop,
        [
            (r"/ndjson", NdjsonHandler, deps),
            (r"/text", TextHandler, deps),
            (r"/stall", StallHandler, deps),
            (r"/overload", OverloadHandler, deps),
            (r"/malformed", MalformedHandler, deps),
            (r"/wrong-shape", WrongShapeHandler, deps),
            (r"/fail", FailHandler, deps),
        ],
    )
    yield up
    up.release.set()  # let a stalled handler end, so nothing is left pending
    server.stop()
    io_loop.run_sync(server.close_all_connections, timeout=5)


@pytest.fixture
def settings(request, upstream) -> Settings:
    """The HTTP backend at the upstream's /ndjson, or the demo agent with `@demo`."""
    if getattr(request, "param", None) == "demo":
        return Settings()
    return Settings(query_backend="http", query_upstream_url=upstream.url("/ndjson"))


demo = pytest.mark.parametrize("settings", ["demo"], ids=["demo"], indirect=True)


def use_upstream(broker: Any, url: str, **options: Any) -> None:
    broker.directory.query_backend = HttpUpstream(url, **options)


# -- reading and checking answers -----------------------------------------------------


async def read_answer(client: WebSocketClient) -> list[dict[str, Any]]:
    """Session messages up to and including the `complete` or `error` (with a seq) that ends a query."""
    messages = []
    while True:
        message = await next_message(client)
        assert "seq" in message, f"expected session messages only, got {message!r}"
        messages.append(message)
        if message["type"] in ("complete", "error"):
            return messages


async def ask(client: WebSocketClient, query: str = "why is the sky blue", **extra: Any) -> list[dict[str, Any]]:
    await client.send({"type": "query", "query": query, **extra})
    return await read_answer(client)


def check_answer(messages: list[dict[str, Any]], query: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """query_start, chunk 1..n, then one end message; consecutive seqs. Returns (chunks, end)."""
    start, *chunks, end = messages
    assert start["type"] == "query_start" and start["query"] == query
    assert [m["type"] for m in chunks] == ["chunk"] * len(chunks)
    assert [c["chunk_number"] for c in chunks] == list(range(1, len(chunks) + 1))
    assert all(isinstance(c["content"], str) and c["content"] for c in chunks)
    seqs = [m["seq"] for m in messages]
    assert seqs == list(range(seqs[0], seqs[0] + len(messages))), seqs
    assert len({m["epoch"] for m in messages}) == 1
    if end["type"] == "complete":
        assert end["full_response"] == "".join(c["content"] for c in chunks)
        assert end["total_chunks"] == len(chunks)
    else:
        assert end["type"] == "error" and isinstance(end["error"], str) and end["error"]
    return chunks, end


async def recovers(broker: Any, upstream: Upstream, client: WebSocketClient) -> None:
    """A new query in the same session runs to `complete`: the failed one left nothing busy."""
    use_upstream(broker, upstream.url("/ndjson"))
    messages = await ask(client, "and now?")
    _, end = check_answer(messages, "and now?")
    assert end["type"] == "complete" and end["full_response"] == "".join(NDJSON_LINES)


# -- 1. streaming from the HTTP upstream ---------------------------------------------------


async def test_ndjson_upstream_streams_chunks_then_complete(broker, connect, upstream):
    assert isinstance(broker.directory.query_backend, HttpUpstream)  # built from the settings
    client, hello = await connect("q1", user_id="alice")
    messages = await ask(client, "say hello", include_context=True, system_prompt="be brief")
    chunks, end = check_answer(messages, "say hello")
    assert [c["content"] for c in chunks] == NDJSON_LINES  # one chunk per line, however the bytes were split
    assert end["type"] == "complete" and end["full_response"] == "".join(NDJSON_LINES)
    assert end["total_chunks"] == len(NDJSON_LINES)
    assert messages[0]["seq"] == hello["last_seq"] + 1 == 1
    assert all(m["session_id"] == "q1" for m in messages)
    assert upstream.requests == [
        (
            "/ndjson",
            "application/json",
            {
                "type": "query",
                "query": "say hello",
                "include_context": True,
                "system_prompt": "be brief",
                "session_id": "q1",
                "user_id": "alice",
            },
        )
    ]


async def test_the_upstream_gets_a_null_user_id_and_the_query_message_as_sent(broker, connect, upstream):
    client, _ = await connect("q1b")
    messages = await ask(client, "no user here", session_id="q1b")
    assert messages[-1]["type"] == "complete"
    assert upstream.requests[0][2] == {"type": "query", "query": "no user here", "session_id": "q1b", "user_id": None}


async def test_the_upstream_gets_the_connections_user_not_one_the_client_claims(broker, connect, upstream):
    client, _ = await connect("q1c", user_id="alice")
    messages = await ask(client, "who am i", user_id="mallory")
    assert messages[-1]["type"] == "complete" and messages[0]["user_id"] == "alice"
    assert upstream.requests[0][2]["user_id"] == "alice"


async def test_plain_text_upstream_streams_each_piece_as_a_chunk(broker, connect, upstream):
    use_upstream(broker, upstream.url("/text"))
    client, _ = await connect("q2", user_id="bob")
    messages = await ask(client, "why blue")
    chunks, end = check_answer(messages, "why blue")
    assert end["type"] == "complete"
    # TCP may join pieces, so n is what arrived; the text is exact, the split character intact.
    assert end["full_response"] == TEXT_ANSWER
    assert 1 <= end["total_chunks"] == len(chunks) <= len(TEXT_PIECES)
    assert "\ufffd" not in end["full_response"]
    assert upstream.requests[0][0] == "/text" and upstream.requests[0][2]["user_id"] == "bob"


async def test_every_connection_of_the_session_sees_the_upstream_stream(broker, connect, upstream):
    asker, _ = await connect("q3", user_id="u1")
    watcher, _ = await connect("q3", user_id="u2")
    mine = await ask(asker, "shared")
    theirs = await read_answer(watcher)
    assert theirs == mine


# -- 2. failures of the upstream end the query with an error session message --------------


async def test_a_stalled_upstream_ends_the_query_with_an_error_within_the_idle_timeout(broker, connect, upstream):
    use_upstream(broker, upstream.url("/stall"), idle_timeout=IDLE)
    client, _ = await connect("q4", user_id="u1")
    watcher, _ = await connect("q4", user_id="u2")
    loop = asyncio.get_running_loop()
    await client.send({"type": "query", "query": "stall please"})
    messages = []
    while not messages or messages[-1]["type"] != "chunk" or messages[-1]["chunk_number"] < len(STALL_LINES):
        messages.append(await next_message(client))
    last_chunk_at = loop.time()
    end = await next_message(client)
    waited = loop.time() - last_chunk_at
    messages.append(end)
    chunks, end = check_answer(messages, "stall please")
    assert [c["content"] for c in chunks] == STALL_LINES
    assert end["type"] == "error" and "seq" in end and "0.3" in end["error"]
    assert IDLE * 0.8 <= waited < IDLE + 2.0, waited
    assert await read_answer(watcher) == messages  # a session message: every connection gets it
    assert not upstream.release.is_set()  # the upstream never resumed: the broker gave up on its own
    await recovers(broker, upstream, client)


@pytest.mark.parametrize(
    ("path", "contents", "error"),
    [
        ("/overload", OVERLOAD_LINES, "model overloaded"),
        ("/malformed", ["fine "], "not JSON"),
        ("/wrong-shape", ["fine "], "neither"),
        ("/fail", [], "500"),
        (None, [], "failed"),
    ],
    ids=["error-line", "malformed-line", "wrong-shape-line", "http-500", "connection-refused"],
)
async def test_an_upstream_failure_ends_the_query_with_an_error_and_the_session_recovers(
    broker, connect, upstream, path, contents, error
):
    use_upstream(broker, upstream.url(path) if path else refused_url())
    client, _ = await connect("q5", user_id="u1")
    watcher, _ = await connect("q5", user_id="u2")
    messages = await ask(client, "will fail")
    chunks, end = check_answer(messages, "will fail")
    assert [c["content"] for c in chunks] == contents
    assert end["type"] == "error" and error in end["error"], end
    assert end["query_id"] == messages[0]["query_id"]
    assert "never shown" not in orjson.dumps(messages).decode()
    assert await read_answer(watcher) == messages
    if path:
        assert upstream.requests[0][2]["query"] == "will fail"
    await recovers(broker, upstream, client)


async def test_a_stalled_upstream_connection_is_closed_when_the_query_gives_up(broker, connect, upstream):
    """The idle timeout must not leave the upstream request open (a leaked socket per stalled query)."""
    use_upstream(broker, upstream.url("/stall"), idle_timeout=IDLE)
    client, _ = await connect("q6")
    messages = await ask(client, "stall please")
    assert messages[-1]["type"] == "error"
    await asyncio.wait_for(upstream.stalled_closed.wait(), 5)


async def test_deleting_the_session_closes_its_running_upstream_request(broker, connect, upstream, http_server_client):
    use_upstream(broker, upstream.url("/stall"), idle_timeout=60)
    client, _ = await connect("q7")
    await client.send({"type": "query", "query": "stall please"})
    seen = [await next_message(client) for _ in range(1 + len(STALL_LINES))]
    assert [m["type"] for m in seen] == ["query_start", "chunk", "chunk"]
    response = await http_server_client.fetch("/api/sessions/q7", method="DELETE")
    assert response.code == 200
    await client.expect(type="session_closed")
    await asyncio.wait_for(upstream.stalled_closed.wait(), 5)


# -- 3. the demo agent over the wire ------------------------------------------------------------


@demo
async def test_demo_answer_reaches_every_connection_and_busy_only_its_sender(broker, connect):
    assert isinstance(broker.directory.query_backend, DemoAgent)
    asker, _ = await connect("d1", user_id="u1")
    watcher, _ = await connect("d1", user_id="u2")
    third, _ = await connect("d1", user_id="u3")
    await asker.send({"type": "query", "query": "why is the sky blue"})
    first = await next_message(watcher)
    assert first["type"] == "query_start"
    await third.send({"type": "query", "query": "me too"})
    third_seen = []
    while not third_seen or third_seen[-1]["type"] != "error":
        third_seen.append(await next_message(third))
    busy = third_seen.pop()
    assert busy["code"] == "busy" and "seq" not in busy and "epoch" not in busy
    answer = [first, *await read_answer(watcher)]
    pieces = DemoAgent.answer("why is the sky blue")
    chunks, end = check_answer(answer, "why is the sky blue")
    assert [c["content"] for c in chunks] == pieces
    assert end["type"] == "complete" and end["total_chunks"] == len(pieces)
    assert await read_answer(asker) == answer  # the asker saw it all too, and no busy
    assert third_seen + await read_answer(third) == answer  # the busy client still got the whole stream
    # nobody else got the busy: the next thing each of the others receives is the pong
    for client in (asker, watcher):
        await client.send({"type": "ping"})
        assert (await next_message(client))["type"] == "pong"
    # and the session is free again
    again = await ask(third, "me too")
    assert again[-1]["type"] == "complete"


@demo
async def test_demo_essential_client_sees_only_complete(broker, connect):
    asker, _ = await connect("d2")
    essential, hello = await connect("d2", events="essential")
    assert "complete" in hello["events"] and "chunk" not in hello["events"]
    answer = await ask(asker, "short")
    assert answer[-1]["type"] == "complete"
    got = await next_message(essential)
    assert got == answer[-1]
    await essential.send({"type": "ping"})
    assert (await next_message(essential))["type"] == "pong"  # nothing else was queued before it


@demo
async def test_demo_client_that_leaves_mid_answer_gets_the_rest_with_last_seq(broker, connect):
    client, hello = await connect("d3", user_id="u1")
    await client.send({"type": "query", "query": "interrupted"})
    before = [await next_message(client) for _ in range(3)]  # query_start and two chunks
    assert [m["type"] for m in before] == ["query_start", "chunk", "chunk"]
    client.close()
    back, hello_again = await connect("d3", user_id="u1", last_seq=before[-1]["seq"], epoch=hello["epoch"])
    assert hello_again["epoch"] == hello["epoch"]
    rest = await read_answer(back)
    answer = before + rest
    chunks, end = check_answer(answer, "interrupted")  # consecutive seqs: no hole, no duplicate
    assert end["type"] == "complete"
    assert [c["content"] for c in chunks] == DemoAgent.answer("interrupted")
    await back.send({"type": "ping"})
    assert (await next_message(back))["type"] == "pong"  # nothing delivered twice after the end


def test_refused_url_really_refuses():
    """The helper's port is closed: a connection attempt fails at once."""
    url = refused_url()
    port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(("127.0.0.1", port))
