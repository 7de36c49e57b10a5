"""The lean publish path (handlers/fast_publish.py) as a publisher sees it.

A plain publish (a Content-Length body) is answered below Tornado's
RequestHandler; the same publish sent chunked goes through the route table's
streamed handler. A publisher cannot tell the two apart: same status line,
same headers in the same order, same body. The rest of the publish contract
(refusals, limits, auth, validation) is the wire suite's, which runs on this
path unchanged.
"""

from __future__ import annotations

import asyncio
import socket
import time

import orjson
import pytest

from broker.validation import normalize_events
from tests.support.wire import session_messages

ORIGIN = "http://localhost:3000"  # allowed by default (a localhost origin)
#: Every answer of the JSON API carries these, in this order (handlers/base.py ApiHandler).
API_HEADERS = [
    "Server",
    "Content-Type",
    "Date",
    "Cache-Control",
    "X-Content-Type-Options",
    "X-Request-Id",
    "Vary",
    "Access-Control-Allow-Origin",
    "Access-Control-Expose-Headers",
    "Content-Length",
]


def request(path: str, body: bytes, *, chunked: bool = False, extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nOrigin: {ORIGIN}\r\n{extra}"
    if chunked:
        return f"{head}Transfer-Encoding: chunked\r\n\r\n{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


async def read_answer(reader: asyncio.StreamReader) -> tuple[str, list[tuple[str, str]], bytes]:
    """One HTTP answer off a keep-alive connection: status line, headers in order, body."""
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode("latin-1")
    status, *lines = head.removesuffix("\r\n\r\n").split("\r\n")
    headers = [(name, value.strip()) for name, _, value in (line.partition(":") for line in lines)]
    length = int(dict(headers)["Content-Length"])
    return status, headers, await asyncio.wait_for(reader.readexactly(length), 10)


@pytest.mark.parametrize(
    ("path", "event"),
    [
        ("/api/sessions/lean1/events", {"type": "task_started", "task_id": "t1"}),
        ("/api/events", {"type": "task_started", "task_id": "t1", "session_id": "lean1"}),
    ],
    ids=["session-path", "api-events"],
)
async def test_a_plain_publish_is_answered_exactly_as_the_handler_answers_it(port, path, event):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        body = orjson.dumps(event)
        writer.write(request(path, body))  # the lean path
        lean = await read_answer(reader)
        writer.write(request(path, body, chunked=True))  # the route table's streamed handler
        handled = await read_answer(reader)
    finally:
        writer.close()
    for status, headers, _ in (lean, handled):
        assert status == "HTTP/1.1 202 Accepted"
        assert [name for name, _ in headers] == API_HEADERS
        values = dict(headers)
        assert values["Content-Type"] == "application/json"
        assert values["Cache-Control"] == "no-store"
        assert values["X-Content-Type-Options"] == "nosniff"
        assert values["Access-Control-Allow-Origin"] == ORIGIN
        assert values["Access-Control-Expose-Headers"] == "X-Request-ID"
        assert values["Vary"] == "Origin"
    assert orjson.loads(lean[2]) == {"accepted": 1, "seq": [1]}
    assert orjson.loads(handled[2]) == {"accepted": 1, "seq": [2]}
    differing = {"Date", "X-Request-Id"}  # a clock and a counter
    assert [h for h in lean[1] if h[0] not in differing] == [h for h in handled[1] if h[0] not in differing]
    assert dict(lean[1])["X-Request-Id"] != dict(handled[1])["X-Request-Id"]


async def test_a_refused_body_gets_the_handlers_answer_and_a_good_one_after_it_on_the_same_connection(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            request("/api/sessions/lean2/events", b'{"type": "task_started"}', extra="X-Request-ID: bad-1\r\n")
        )
        status, headers, body = await read_answer(reader)
        assert status == "HTTP/1.1 422 Unprocessable Entity"
        assert [name for name, _ in headers] == API_HEADERS
        assert dict(headers)["X-Request-Id"] == "bad-1"
        assert orjson.loads(body)["details"] == [{"index": 0, "field": "task_id", "error": "is required"}]
        writer.write(request("/api/sessions/lean2/events", b'{"type": "task_started", "task_id": "t1"}'))
        status, _, body = await read_answer(reader)
        assert status == "HTTP/1.1 202 Accepted"
        assert orjson.loads(body) == {"accepted": 1, "seq": [1]}  # the refused body published nothing
    finally:
        writer.close()


async def test_connection_close_is_announced_and_the_connection_closed_after_the_answer(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        body = orjson.dumps({"type": "task_started", "task_id": "t1"})
        writer.write(request("/api/sessions/lean3/events", body, extra="Connection: close\r\n"))
        status, headers, answer = await read_answer(reader)
        assert status == "HTTP/1.1 202 Accepted"
        assert headers[-1] == ("Connection", "close")
        assert orjson.loads(answer) == {"accepted": 1, "seq": [1]}
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
    finally:
        writer.close()


async def test_publishers_racing_on_one_session_get_every_seq_once_and_a_follower_sees_them_in_order(port, connect):
    follower, _ = await connect("lean4")
    connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(8)]

    async def publish_from(number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> list[int]:
        seqs = []
        for i in range(10):
            event = {"type": "test.tick", "publisher": number, "i": i}
            writer.write(request("/api/sessions/lean4/events", orjson.dumps(event)))
            status, _, body = await read_answer(reader)
            assert status == "HTTP/1.1 202 Accepted", body
            seqs += orjson.loads(body)["seq"]
        return seqs

    try:
        answered = await asyncio.gather(*(publish_from(n, *c) for n, c in enumerate(connections)))
    finally:
        for _, writer in connections:
            writer.close()
    for seqs in answered:
        assert seqs == sorted(seqs)  # one publisher's events keep their order
    assert sorted(s for seqs in answered for s in seqs) == list(range(1, 81))
    received = await session_messages(follower, 80)
    assert [m["seq"] for m in received] == list(range(1, 81))
    by_seq = {s: (n, i) for n, seqs in enumerate(answered) for i, s in enumerate(seqs)}
    assert all(by_seq[m["seq"]] == (m["publisher"], m["i"]) for m in received)


@pytest.mark.memory_only("on Redis a publish is a script call whose deliveries come by pub/sub, after its answer")
async def test_a_followers_socket_holds_the_event_before_the_publisher_is_answered(broker, connect):
    """The publish handlers answer after the deliveries (Broker.publish_now runs the connection actors at once):
    the answer's write never sits between a publish and its followers."""
    follower, _ = await connect("lean5")
    kernel = follower.conn.protocol.stream.socket
    peek = socket.MSG_PEEK | socket.MSG_DONTWAIT
    with pytest.raises(BlockingIOError):
        kernel.recv(1, peek)  # nothing waiting for the follower yet
    events = normalize_events([{"type": "test.tick", "session_id": "lean5"}], session_id=None, now=time.time())
    seqs = broker.publish_now(events)  # what the handler does before it writes the 202; no loop turn after it
    assert seqs is not None, "the idle session's actor did not take the publish at once"
    assert kernel.recv(65536, peek), "the frame was not written before publish_now returned"
    message = await follower.expect(type="test.tick")
    assert message["seq"] == seqs[0]
