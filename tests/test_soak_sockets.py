"""Soak with hostile sockets: tests/test_soak.py's traffic against a real daemon under socket attacks.

For SOAK_SECONDS (default 8; `SOAK_SECONDS=180 pytest tests/test_soak_sockets.py`
is the long run) a daemon with a 512-descriptor limit, `header_timeout` 1 s
and `idle_timeout` 2 s gets, all at once:

* the soak's well-behaved traffic (tests/test_soak.py): a publisher, readers
  on every session and both endpoints that must see every seq once and in
  order (some reconnect with `last_seq`), churners that connect, ping and
  leave, and slow readers that never read and are closed 4008;
* slowloris connections that send a request line and then a header line
  every quarter second, never finishing, reconnecting each time the daemon
  closes them (`header_timeout`);
* idle connections that send nothing, reconnecting likewise;
* publishes whose body stops half-way (`idle_timeout`), reconnecting likewise.

The attackers stay below the descriptor budget, so every well-behaved
handshake must be admitted: the point is that hostile sockets coming and
going for minutes leave nothing behind. Afterwards (sessions deleted): no
connection or session actor lives in the daemon, its descriptors are back
to where they were before the run, and its RSS grew by less than 50 MB.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson

from tests import test_sockets
from tests.test_daemon import WAIT
from tests.test_soak import (
    CHURNERS,
    FIREHOSE,
    RSS_GROWTH_LIMIT_KIB,
    SESSIONS,
    SLOW_READERS,
    SOAK_SECONDS,
    _close_clients,  # noqa: F401 - the soak's clean-up fixture (autouse), for this module too
    churner,
    finish_slow_reader,
    open_slow_reader,
    publisher,
    well_behaved_readers,
)
from tests.test_sockets import LimitedDaemon, Sockets, closed_by_server, send, until

#: The limited-daemon fixture of tests/test_sockets.py.
start = test_sockets.start

NOFILE = 512
SLOWLORIS = 80
IDLE = 80
STALLED_BODIES = 20
#: Well below the budget (NOFILE - 64) with the well-behaved clients added.
assert SLOWLORIS + IDLE + STALLED_BODIES + 40 < NOFILE - 64


class DaemonHttp:
    """What the soak's helpers call `http`: `fetch(path, ...)` against the daemon."""

    def __init__(self, daemon: LimitedDaemon) -> None:
        self.daemon = daemon

    async def fetch(self, path: str, **kwargs: Any) -> Any:
        return await self.daemon.fetch(path, **kwargs)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def attacker(port: int, deadline: float, opening: bytes, trickle: bytes | None) -> int:
    """Open a connection, send `opening`, then `trickle` every quarter second (or nothing),
    until the daemon closes it; again until the deadline. How many the daemon closed."""
    closed = 0
    while time.monotonic() < deadline:
        with Sockets() as sockets:
            [sock] = await sockets.connect(port)
            await send(sock, opening)
            close = asyncio.ensure_future(closed_by_server(sock))
            while trickle is not None and not close.done():
                await send(sock, trickle)
                await asyncio.wait([close], timeout=0.25)  # the attacker's pace, or the close
            await close
            closed += 1
    return closed


async def test_hostile_sockets_mixed_into_the_soak_lose_no_event_and_leave_nothing_behind(start):
    daemon = await start(
        nofile=NOFILE,
        BROKER_HEADER_TIMEOUT="1",
        BROKER_IDLE_TIMEOUT="2",
        BROKER_MAX_QUEUE_BYTES=str(64 * 1024),
        BROKER_BUFFER_SIZE="1000",
        BROKER_DEDUP_WINDOW="5",
    )
    http = DaemonHttp(daemon)
    port = daemon.port
    descriptors_before = daemon.open_descriptors()
    rss_before = rss_kib(daemon.process.pid)
    deadline = time.monotonic() + SOAK_SECONDS

    slow = [await open_slow_reader(port) for _ in range(SLOW_READERS)]
    readers = well_behaved_readers(port)
    for reader in readers:
        await reader.connect()

    slowloris = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    stalled = (
        b"POST /api/sessions/soak.a/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n[{"type":'
    )
    try:
        async with asyncio.TaskGroup() as group:
            publishing = group.create_task(publisher(http, deadline))
            churning = [group.create_task(churner(port, deadline, i)) for i in range(CHURNERS)]
            for reader in readers:
                group.create_task(reader.run())
            hostile = [
                *(group.create_task(attacker(port, deadline, slowloris, b"X-Slow: 1\r\n")) for _ in range(SLOWLORIS)),
                *(group.create_task(attacker(port, deadline, b"", None)) for _ in range(IDLE)),
                *(group.create_task(attacker(port, deadline, stalled, None)) for _ in range(STALLED_BODIES)),
            ]
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from failed
    published = publishing.result()
    churns = sum(task.result() for task in churning)
    closed_hostile = sum(task.result() for task in hostile)
    slow_codes = [await finish_slow_reader(conn) for conn in slow]

    assert published["batches"] > 0 and churns > 0
    assert all(reader.received > 0 for reader in readers)
    assert closed_hostile >= SLOWLORIS + IDLE + STALLED_BODIES  # every attacker was closed at least once
    assert set(slow_codes) <= {4008, None}, slow_codes

    # Everyone has left: delete the sessions (they keep history for session_ttl), then nothing lives.
    await until_stats(http, lambda body: body["active_connections"] == 0, "every connection gone")
    for session_id in (*SESSIONS, FIREHOSE):
        assert (await http.fetch(f"/api/sessions/{session_id}", method="DELETE")).code == 200
    await until_stats(http, lambda body: body["active_sessions"] == 0, "every session deleted")
    deadline = time.monotonic() + WAIT
    while True:
        metrics = await daemon.metrics()
        if metrics['broker_actors{kind="connection"}'] == 0 and metrics['broker_actors{kind="session"}'] == 0:
            break
        assert time.monotonic() < deadline, metrics
    assert metrics["broker_accept_failures_total"] == 0
    assert metrics['broker_connection_timeouts_total{phase="headers"}'] >= SLOWLORIS + IDLE
    assert metrics['broker_connection_timeouts_total{phase="body"}'] >= STALLED_BODIES
    await until(lambda: daemon.open_descriptors() <= descriptors_before, "descriptors back to where they were")
    growth = rss_kib(daemon.process.pid) - rss_before
    assert growth < RSS_GROWTH_LIMIT_KIB, f"the daemon's RSS grew by {growth} KiB"
    print(  # shown with -s: what one run did
        f"socket soak {SOAK_SECONDS:g}s: {published['batches']} batches, {churns} churns, "
        f"{closed_hostile} hostile connections closed by the daemon, "
        f"{sum(r.received for r in readers)} messages read, RSS +{growth} KiB, "
        f"descriptors {descriptors_before} -> {daemon.open_descriptors()}"
    )


async def until_stats(http: DaemonHttp, done: Any, what: str) -> None:
    """Fetch /api/websocket/stats until `done(stats)`; bounded by WAIT."""
    deadline = time.monotonic() + WAIT
    while True:
        body = orjson.loads((await http.fetch("/api/websocket/stats")).body)
        if done(body):
            return
        assert time.monotonic() < deadline, f"{what}: last stats {body!r}"

