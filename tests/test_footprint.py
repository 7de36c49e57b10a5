"""Per-connection memory: what an idle connection holds stays small, and nothing of its handshake.

A connection's actor and its WebSocket handler live as long as the client
does, 50 000 of them in a full process. Their state sits in `__slots__`, and
the handler's instance dict (Tornado's own attributes) shares its keys with
every other handler's; an attribute added outside the slots, or a key Tornado
adds after a burst of handshakes, would cost each connection a private dict
of ~1 KiB. Once the handshake is answered the handler forgets the request
(headers, arguments, Tornado's HTTP/1.1 objects) and no frame keeps them.
bench/footprint.py measures the memory itself, by allocation site and type;
these tests keep the layout that result relies on.
"""

from __future__ import annotations

import asyncio
import gc
import socket
from collections.abc import Iterator

import pytest
import tornado.http1connection
import tornado.httputil
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port

from broker.app import make_app
from broker.descriptors import DescriptorBudget
from broker.listener import GuardedHTTPServer, GuardedStream
from broker.testing import WebSocketClient
from handlers.ws import BrokerWebSocket

#: CPython 3.11 shares an instance dict's keys among the instances of a class
#: up to this many keys; past it every instance has its own, ~1.5 KiB table.
SHARED_KEYS_LIMIT = 30
#: Tornado's per-request objects: none may stay alive for an idle WebSocket.
HANDSHAKE_TYPES = (
    tornado.httputil.HTTPServerRequest,
    tornado.httputil.HTTPHeaders,
    tornado.http1connection.HTTP1Connection,
    tornado.http1connection.HTTP1ServerConnection,
)


async def open_connection(broker, port):
    client = await WebSocketClient.connect(port, "/ws/research/footprint")
    await client.expect(type="connection_established")
    session = broker.directory.get("footprint")._actor_weakref()
    (member,) = session.members.values()
    return client, member.ref._actor_weakref()


def has_private_dict(handler: object) -> bool:
    """Whether the handler's attributes live in a dict of its own rather than in shared-key values.

    A materialized instance dict is what the garbage collector sees as the
    object's referent (inline values are seen one by one), so this looks
    without materializing one (`vars()` would).
    """
    return any(type(r) is dict and "application" in r for r in gc.get_referents(handler))


async def raw_websocket(port: int, path: str) -> socket.socket:
    """A WebSocket handshake on a bare socket, read up to the greeting: no Tornado objects on this side."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nUser-Agent: footprint\r\n"
        "Accept-Language: en\r\nCache-Control: no-cache\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    received = b""
    while b"\r\n\r\n" not in received or received.endswith(b"\r\n\r\n"):  # the 101, then the greeting frame
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
        assert chunk, f"closed during the handshake: {received!r}"
        received += chunk
    assert received.startswith(b"HTTP/1.1 101"), received
    return sock


def live(kinds: tuple[type, ...]) -> dict[str, int]:
    gc.collect()
    counts = dict.fromkeys((k.__name__ for k in kinds), 0)
    for obj in gc.get_objects():
        if isinstance(obj, kinds):
            counts[type(obj).__name__] += 1
    return counts


def handlers() -> list[BrokerWebSocket]:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, BrokerWebSocket)]


@pytest.fixture
def guarded_port(broker, io_loop) -> Iterator[int]:
    """The application behind the daemon's own server (broker.listener), on a port of its own."""
    sock, port = bind_unused_port()
    server = GuardedHTTPServer(
        make_app(broker), settings=lambda: broker.settings, budget=DescriptorBudget(100_000, lambda: 64)
    )
    server.add_sockets([sock])
    yield port
    server.stop()
    io_loop.run_sync(server.close_all_connections)


async def test_a_connection_actor_keeps_its_state_in_slots(broker, port):
    client, actor = await open_connection(broker, port)
    try:
        assert vars(actor) == {}, f"attributes outside __slots__: {sorted(vars(actor))}"
        assert vars(actor.actor_ref) == {}, f"ref attributes outside __slots__: {sorted(vars(actor.actor_ref))}"
    finally:
        client.close()


async def test_a_websocket_handler_dict_stays_within_the_shared_keys_limit(broker, port):
    client, actor = await open_connection(broker, port)
    try:
        handler = actor.transport.handler
        assert not has_private_dict(handler)
        # Tornado's own upgrade shadows seven methods with instance attributes; this one does not.
        assert not {"write", "finish", "set_header", "flush"} & set(vars(handler))
        assert len(vars(handler)) <= SHARED_KEYS_LIMIT, sorted(vars(handler))
    finally:
        client.close()


async def test_a_burst_of_handshakes_still_shares_the_handlers_key_table(broker):
    """Forty handshakes at once on a class no handler was built from yet (as at start-up, in a reconnect
    storm): CPython stops adding keys to the shared table once ~30 instances exist, so every attribute
    must be there from the first handler on. None of the forty may have a private dict."""

    class Fresh(BrokerWebSocket):
        __slots__ = ()

    app = tornado.web.Application([(r"/ws", Fresh, {"broker": broker})])
    sock, port = bind_unused_port()
    server = HTTPServer(app)
    server.add_sockets([sock])
    clients = await asyncio.gather(
        *(WebSocketClient.connect(port, "/ws", session_id=f"burst-{i % 4}", replay="none") for i in range(40))
    )
    try:
        await asyncio.gather(*(c.expect(type="connected") for c in clients))
        fresh = [h for h in handlers() if type(h) is Fresh]
        assert len(fresh) == 40
        assert [h for h in fresh if has_private_dict(h)] == []
    finally:
        for client in clients:
            client.close()
        server.stop()
        await server.close_all_connections()


async def test_an_idle_websocket_keeps_nothing_of_its_handshake(broker, guarded_port):
    """Five more idle connections, and not one more request, header table or HTTP/1.1 connection object."""
    first = await raw_websocket(guarded_port, "/ws?session_id=forget&replay=none&user_id=u1&events=all")
    more: list[socket.socket] = []
    try:
        before = live(HANDSHAKE_TYPES)
        for i in range(5):
            more.append(await raw_websocket(guarded_port, f"/ws/research/forget-{i}?replay=none"))
        after = live(HANDSHAKE_TYPES)
        assert after == before, f"with 5 more idle WebSockets: {before} -> {after}"
        opened = [h for h in handlers() if h.connection is not None]
        assert len(opened) == 6
        for handler in opened:
            assert handler.request is None
            assert handler.connection.ref.is_alive()  # forgotten, yet the connection lives
    finally:
        for sock in [first, *more]:
            sock.close()


async def test_an_idle_websocket_keeps_no_timer_or_queue_of_the_http_layer(broker, guarded_port):
    """The listener's header timer goes with the upgrade; the stream's write queues are short lists."""
    sock = await raw_websocket(guarded_port, "/ws?session_id=timers&replay=none")
    try:
        (handler,) = [h for h in handlers() if h.connection is not None]
        stream = handler.ws_connection.stream
        assert isinstance(stream, GuardedStream)
        assert stream.clock.timer is None
        assert isinstance(stream._write_futures, list) and isinstance(stream._write_buffer._buffers, list)
        assert len(stream._write_futures) == 0 and len(stream._write_buffer._buffers) == 0
    finally:
        sock.close()


async def test_a_frame_after_the_handshake_is_still_answered(broker, port):
    """What was forgotten is not needed later: a ping is answered, a bad frame gets its error, the close its code."""
    client = await WebSocketClient.connect(port, "/ws", session_id="after", replay="none")
    try:
        await client.expect(type="connected")
        await client.send({"type": "ping"})
        await client.expect(type="pong")
        await client.send("not json")
        await client.expect(type="error", code="bad_json")
        await client.send({"type": "disconnect"})
        await client.expect(type="disconnected")
        assert await client.closed() == (1000, "client disconnect")
    finally:
        client.close()


async def test_an_event_stream_forgets_its_arguments_and_headers_once_it_started(broker, port):
    """SSE keeps its request (the response goes on through it) but not what the handshake read;
    the stream still delivers what is published and ends as it should."""
    from handlers.sse import EventStreamHandler

    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(
        sock, f"GET /sse?session_id=sse-forget&replay=none HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    )

    async def read_until(marker: bytes, received: bytes = b"") -> bytes:
        while marker not in received:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
            assert chunk, f"closed before {marker!r}: {received!r}"
            received += chunk
        return received

    try:
        await read_until(b'"type":"connected"')
        gc.collect()
        (handler,) = [h for h in gc.get_objects() if isinstance(h, EventStreamHandler) and h.connection is not None]
        assert len(handler.request.headers) == 0
        assert handler.request.query_arguments == {} and handler.request.arguments == {}
        await broker.publish_events({"type": "sse.tick", "session_id": "sse-forget"})
        await read_until(b'"type":"sse.tick"')
    finally:
        sock.close()
