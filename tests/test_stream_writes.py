"""The daemon's stream writes (broker/listener.py `GuardedStream.write`): straight to the socket, in order.

A write with nothing queued ahead of it goes to the kernel at once and is
answered with a future that is already done; what the kernel does not take
is queued by Tornado, and every later write waits behind it. On a real
socket pair, with the daemon's own server and clock behind the stream.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest
import tornado.web

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
