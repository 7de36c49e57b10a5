"""The daemon's streams (broker/listener.py `GuardedStream`): writes straight to the socket, in order; reads
that keep their epoll registration across keep-alive requests and still stop when nothing is read.

A write with nothing queued ahead of it goes to the kernel at once and is
answered with a future that is already done; what the kernel does not take
is queued by Tornado, and every later write waits behind it. A request whose
body came with its headers no longer takes the socket out of epoll and puts
it back (`_LazyReadInterest`), yet a stream that reads nothing leaves what
its peer sends in the kernel, as Tornado's own does. On a real socket pair,
with the daemon's own server and clock behind the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import pytest
import tornado.web
from tornado.ioloop import IOLoop

from broker.config import Settings
from broker.descriptors import DescriptorBudget
from broker.listener import ConnectionClock, GuardedHTTPServer, GuardedStream


@pytest.fixture
def pair(io_loop) -> Iterator[tuple[GuardedStream, socket.socket]]:
    """A GuardedStream on one end of a socket pair (small send buffer), the bare peer socket on the other."""
    server = GuardedHTTPServer(
        tornado.web.Application(), settings=Settings, budget=DescriptorBudget(100_000, lambda: 64)
    )
    ours, peer = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ours.setblocking(False)
    peer.setblocking(False)
    server.budget.socket_opened()  # the clock's close counts it out again
    stream = GuardedStream(ours, ConnectionClock(server))
    yield stream, peer
    stream.close()
    peer.close()


async def read_exactly(peer: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    received = bytearray()
    while len(received) < size:
        chunk = await asyncio.wait_for(loop.sock_recv(peer, 65536), 5)
        assert chunk, "the stream closed before everything arrived"
        received += chunk
    return bytes(received)


async def test_a_write_the_kernel_takes_whole_is_done_at_once_and_arrives(pair):
    stream, peer = pair
    first, second = stream.write(b"hello "), stream.write(b"world")
    assert first.done() and second.done() and first.exception() is None
    assert first is second  # one shared done future: no future, callback or loop callback per write
    assert not stream._write_buffer  # nothing was queued
    assert await read_exactly(peer, 11) == b"hello world"


async def test_what_the_kernel_does_not_take_is_queued_and_later_writes_wait_behind_it(pair):
    stream, peer = pair
    big = bytes(range(256)) * 32_768  # 8 MiB: far more than the socket's buffers
    pending = stream.write(big)
    assert not pending.done()  # a partial send: the rest waits in Tornado's queue
    behind = stream.write(b"after")
    assert not behind.done()  # queued behind, not sent ahead of the rest of `big`
    assert await read_exactly(peer, len(big) + 5) == big + b"after"
    await asyncio.wait_for(behind, 5)
    assert pending.done() and pending.exception() is None
    assert stream.write(b"again").done()  # the queue is empty again: straight to the socket
    assert await read_exactly(peer, 5) == b"again"


async def test_keep_alive_requests_leave_the_sockets_epoll_registration_alone(pair, monkeypatch):
    stream, peer = pair
    loop = IOLoop.current()
    changes = []
    real_update = loop.update_handler
    monkeypatch.setattr(loop, "update_handler", lambda fd, events: (changes.append(events), real_update(fd, events)))
    for n in range(20):  # the server waits for a request, whose body arrives with its headers
        headers = stream.read_until(b"\n")  # nothing to read yet: the stream waits on epoll (at once, no loop turn)
        assert stream.socket.fileno() in loop.readers
        peer.send(b"POST /%d\nbody" % n)
        assert await asyncio.wait_for(headers, 5) == b"POST /%d\n" % n
        assert await asyncio.wait_for(stream.read_bytes(4), 5) == b"body"
    # Tornado alone takes the socket out of epoll after each header block and puts it back for the
    # next request: two changes a request (39 here)
    assert len(changes) <= 1


async def test_a_stream_that_reads_nothing_leaves_what_its_peer_sends_in_the_kernel(pair, monkeypatch):
    stream, peer = pair
    loop = IOLoop.current()
    dropped = asyncio.Event()  # the stream's socket left epoll's readers
    real_update = loop.update_handler

    def update(fd: object, events: int) -> None:
        real_update(fd, events)
        if not events & IOLoop.READ:
            dropped.set()

    monkeypatch.setattr(loop, "update_handler", update)
    first = stream.read_until(b"\n")  # waits on epoll, as a server waits for a request
    assert stream.socket.fileno() in loop.readers
    peer.send(b"first\nrest")
    assert await asyncio.wait_for(first, 5) == b"first\n"
    # nothing reads now and "rest" is buffered: the stream wants no more bytes
    flood = b"x" * 200_000
    sent = 0
    with contextlib.suppress(BlockingIOError):
        while sent < len(flood):
            sent += peer.send(flood[sent:])
    await asyncio.wait_for(dropped.wait(), 5)  # the unwanted bytes' read event takes the socket out of epoll
    assert stream.socket.fileno() not in loop.readers
    assert stream._read_buffer_size == len(b"rest")  # nothing taken that nobody asked for
    everything = await asyncio.wait_for(stream.read_bytes(len(b"rest") + sent), 5)
    assert everything == b"rest" + flood[:sent]  # reading again resumes where it stopped, in order
