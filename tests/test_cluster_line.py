"""broker/cluster/line.py against a real redis-server: calls that share one connection get their own replies.

The publish path sends every script call on one pipelined connection; a reply
handed to the wrong call would be another session's seqs in a 202, so each
test checks which reply reached which call, under concurrency and faults.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from redis import exceptions as rx
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import Connection

from broker.cluster.line import LineTimeout, PipelinedLine
from tests.support.wire import wait_until

pytestmark = pytest.mark.usefixtures("io_loop")


class CountingConnection(Connection):
    """A real connection that counts the connections made."""

    made = 0

    async def connect(self) -> None:  # type: ignore[override]
        type(self).made += 1
        await super().connect()


@pytest.fixture
def pool(redis_server):
    CountingConnection.made = 0
    return ConnectionPool(connection_class=CountingConnection, host="127.0.0.1", port=redis_server.port)


@pytest.fixture
def line(io_loop, pool):
    made = PipelinedLine(pool)
    yield made
    io_loop.run_sync(made.aclose)


async def test_concurrent_calls_share_one_connection_and_each_gets_its_own_reply(line):
    # a reply of its own per call: the script answers the argument it was given, after a varying amount of work
    script = "local n = 0; for i = 1, tonumber(ARGV[2]) do n = n + i end; return ARGV[1]"
    calls = [line.execute("EVAL", script, 0, f"call-{i}", (i * 7919) % 5000) for i in range(200)]
    replies = await asyncio.gather(*calls)
    assert replies == [f"call-{i}".encode() for i in range(200)]
    assert CountingConnection.made == 1


async def test_an_error_reply_goes_to_its_own_call_and_the_others_get_theirs(line):
    results = await asyncio.gather(
        line.execute("ECHO", "before"),
        line.execute("EVAL", "return redis.error_reply('ERR refused by the script')", 0),
        line.execute("ECHO", "after"),
        return_exceptions=True,
    )
    assert results[0] == b"before" and results[2] == b"after"
    assert isinstance(results[1], rx.ResponseError) and "refused by the script" in str(results[1])
    assert await line.execute("ECHO", "still") == b"still"
    assert CountingConnection.made == 1


async def test_a_killed_connection_fails_its_waiting_calls_and_the_next_call_reconnects(line, redis_server):
    assert await line.execute("SET", "k", "1")
    # a call waits on the line while Redis is busy; then the connection is cut under it
    client_id = await line.execute("CLIENT", "ID")
    waiting = asyncio.ensure_future(line.execute("BLPOP", "nothing-here", 10))
    killer = Redis(host="127.0.0.1", port=redis_server.port)
    try:
        await wait_until(lambda: killer.info("clients"), lambda info: info["blocked_clients"] == 1, what="BLPOP blocks")
        assert await killer.client_kill_filter(_id=client_id) == 1
    finally:
        await killer.aclose()
    with pytest.raises(rx.ConnectionError):
        await asyncio.wait_for(waiting, 5)
    assert await line.execute("GET", "k") == b"1"  # a new connection, its own reply
    assert CountingConnection.made == 2


async def test_a_call_cut_while_redis_hangs_drops_the_connection_and_no_late_reply_reaches_the_next(
    line, redis_server
):
    assert await line.execute("ECHO", "warm") == b"warm"
    redis_server.pause()
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await line.execute("ECHO", "cut")
        assert line.in_flight == 0  # dropped: nothing queues behind a Redis that does not answer
    finally:
        redis_server.resume()
    # the cut call's reply ("cut") may still be sent by Redis on the old connection: it must reach nobody
    assert await line.execute("ECHO", "next") == b"next"
    assert CountingConnection.made == 2


async def test_calls_redis_does_not_answer_within_the_deadline_fail_together_and_the_line_recovers(pool, redis_server):
    line = PipelinedLine(pool, deadline=0.3)
    try:
        assert await line.execute("ECHO", "warm") == b"warm"
        redis_server.pause()
        try:
            started = time.monotonic()
            calls = [line.execute("ECHO", f"hung-{n}") for n in range(3)]
            results = await asyncio.gather(*calls, return_exceptions=True)
            waited = time.monotonic() - started
        finally:
            redis_server.resume()
        assert all(isinstance(result, LineTimeout) for result in results), results
        assert 0.25 < waited < 2  # the deadline, once for all three
        assert await line.execute("ECHO", "next") == b"next"  # a new connection: no late reply reaches it
        assert CountingConnection.made == 2
    finally:
        await line.aclose()


async def test_a_redis_that_is_down_is_a_connection_error_and_the_line_recovers_when_it_is_back(line, redis_server):
    assert await line.execute("ECHO", "up") == b"up"
    redis_server.stop()
    with pytest.raises(rx.ConnectionError):
        await line.execute("ECHO", "down")
    redis_server.start()
    assert await line.execute("ECHO", "back") == b"back"


async def test_a_closed_line_refuses_calls(line):
    assert await line.execute("ECHO", "open") == b"open"
    await line.aclose()
    with pytest.raises(rx.ConnectionError, match="closed"):
        await line.execute("ECHO", "closed")
