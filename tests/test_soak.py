"""Soak: connects, disconnects, publishes and slow readers, mixed, then nothing is left over.

For SOAK_SECONDS (default 8: what CI runs; `SOAK_SECONDS=120 pytest tests/test_soak.py`
is the long run) the real application on a real port gets, all at once:

* a publisher posting batches continuously to a few sessions (custom events
  and throttled `task_progress`), and large events to a "firehose" session;
* well-behaved readers on every session, on both endpoints: each must receive
  every `seq`, in order, with no duplicates and no gap. Some hang up every
  few dozen messages and come back with `last_seq` + `epoch`; any that the
  server closes as a slow consumer (4008) does the same, as docs/protocol.md section 3.9 says a
  client can;
* churners that connect, ping and leave (by `disconnect` or by closing);
* slow readers on the firehose session that never read, with
  `max_queue_bytes` at 64 KiB, so the server closes them as slow consumers.

After everyone leaves (and the sessions are deleted, since a session keeps
its history for `session_ttl` after its last client): no connection is
counted, no ConnectionActor is alive, the asyncio task count is back near
where it started, and the process's RSS grew by less than 50 MB (the tests
run in-process, so this bounds the broker and the clients together). History
and the dedup window are bounded in the settings, so RSS levels off (about
+20 MB) however long the run: growth past that is a leak.

The second test pins a race this soak found: a publish reaching a session
while a connection that just left has stopped but its Detach is still queued.

No sleeps: the loop is bounded by a deadline and by counts, every wait is a
message (bounded by the client's timeout) or a bounded number of awaited
HTTP requests.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from typing import Any

import orjson
import pytest
from pykka import ActorRegistry
from tornado.websocket import WebSocketClientConnection, websocket_connect

from actors.connection import ConnectionActor
from broker.config import Settings
from broker.testing import WebSocketClient

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "8"))
SESSIONS = ("soak.a", "soak.b", "soak.c")
FIREHOSE = "soak.firehose"
SLOW_READERS = 3
CHURNERS = 4
#: Count bounds next to the time bound.
MAX_BATCHES = 1_000_000
MAX_CHURNS = 1_000_000
#: A reader that reconnects does so after this many messages.
RECONNECT_EVERY = 37
BATCH = 10
PAD = "p" * 100
FIREHOSE_PAD = "f" * 8192
RSS_GROWTH_LIMIT_KIB = 50 * 1024
TASK_SLACK = 3


@pytest.fixture
def settings() -> Settings:
    # buffer_size: enough history that a reader coming back with last_seq never meets a gap
    # (it is gone for a few milliseconds); dedup_window: a few seconds of event ids. Both keep
    # what a session holds bounded however long the run, so RSS must level off.
    return Settings(max_queue_bytes=64 * 1024, buffer_size=1000, dedup_window=5.0)


#: Client connections open now; whatever is left is closed at teardown (a failure cancels
#: the tasks mid-way, and an unclosed client is a ResourceWarning, i.e. an error).
OPENED: set[WebSocketClientConnection] = set()


@pytest.fixture(autouse=True)
def _close_clients(io_loop):
    """Closes what a failed test left open, while the loop is still there."""
    OPENED.clear()
    yield
    for conn in OPENED:
        conn.close()
    OPENED.clear()


async def connect(port: int, path: str, **params: Any) -> WebSocketClient:
    client = await WebSocketClient.connect(port, path, timeout=10, **params)
    OPENED.add(client.conn)
    return client


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def live_connection_actors() -> int:
    return sum(1 for ref in ActorRegistry.get_all() if ref.actor_class is ConnectionActor and ref.is_alive())


async def post(http: Any, path: str, events: Any) -> dict[str, Any]:
    response = await http.fetch(
        path, method="POST", headers={"Content-Type": "application/json"}, body=orjson.dumps(events)
    )
    assert response.code == 202, response.body
    return orjson.loads(response.body)


async def stats(http: Any) -> dict[str, Any]:
    response = await http.fetch("/api/websocket/stats")
    return orjson.loads(response.body)


async def drain(client: WebSocketClient) -> None:
    """Close our side and read until the server has closed too (what it sent meanwhile is dropped)."""
    client.close()
    while await client.receive() is not None:
        pass
    OPENED.discard(client.conn)


class Reader:
    """A well-behaved client: every seq of its session from its first greeting on, in order, once."""

    def __init__(self, port: int, session_id: str, *, research: bool = False, reconnect: bool = False) -> None:
        self.port = port
        self.session_id = session_id
        self.research = research
        self.reconnect = reconnect
        self.client: WebSocketClient | None = None
        self.next_seq: int | None = None
        self.epoch: str | None = None
        self.received = 0
        self.reconnects = 0
        self.slow_closes = 0

    async def connect(self) -> None:
        params: dict[str, Any] = {"replay": "none"}
        if self.next_seq is not None:  # coming back: exactly what came after the last seq seen
            params = {"last_seq": self.next_seq - 1, "epoch": self.epoch}
        if self.research:
            path, greeting = f"/ws/research/{self.session_id}", "connection_established"
        else:
            path, greeting = "/ws", "connected"
            params["session_id"] = self.session_id
        self.client = await connect(self.port, path, **params)
        hello = await self.client.expect(type=greeting, session_id=self.session_id)
        if self.next_seq is None:
            self.next_seq, self.epoch = hello["last_seq"] + 1, hello["epoch"]
        else:
            assert hello["epoch"] == self.epoch, hello

    async def run(self) -> None:
        """Read until the publisher's end marker, checking every seq."""
        if self.client is None:
            await self.connect()
        while True:
            assert self.client is not None
            message = await self.client.receive()
            self.client.received.clear()  # keep nothing client-side: the RSS check is for the broker
            if message is None:
                code, reason = self.client.close_info()
                assert (code, reason) == (4008, "slow_consumer"), (self.session_id, code, reason)
                self.slow_closes += 1
                self.client.close()
                OPENED.discard(self.client.conn)
                await self.connect()
                continue
            if message["type"] == "keepalive":
                continue
            where = f"{self.session_id}{' (research)' if self.research else ''}"
            assert message["type"] != "gap", (where, message)
            assert message.get("seq") == self.next_seq, (where, message.get("seq"), self.next_seq, message["type"])
            assert message["epoch"] == self.epoch, (where, message)
            self.next_seq += 1
            self.received += 1
            if message["type"] == "soak.end":
                break
            if self.reconnect and self.received % RECONNECT_EVERY == 0:
                await drain(self.client)
                self.reconnects += 1
                await self.connect()
        await drain(self.client)


def well_behaved_readers(port: int) -> list[Reader]:
    """Three readers per session: on /ws, on /ws/research, and one that keeps reconnecting."""
    return [
        reader
        for session_id in SESSIONS
        for reader in (
            Reader(port, session_id),
            Reader(port, session_id, research=True),
            Reader(port, session_id, reconnect=True),
        )
    ]


async def publisher(http: Any, deadline: float) -> dict[str, int]:
    """Batches to the sessions in turn until the deadline; large ones to the firehose until the
    slow readers are gone; then end each task (dropping held progress) and publish the end marker."""
    batches = firehose = 0
    firehose_on = True
    while time.monotonic() < deadline and batches < MAX_BATCHES:
        session_id = SESSIONS[batches % len(SESSIONS)]
        events = [
            {"type": "task_progress", "task_id": "t", "progress": (batches + i) % 101}
            if i % 5 == 4
            else {"type": "soak.tick", "n": batches * BATCH + i, "pad": PAD}
            for i in range(BATCH)
        ]
        answer = await post(http, f"/api/sessions/{session_id}/events", events)
        assert answer["accepted"] == BATCH, answer
        batches += 1
        if firehose_on and batches % 3 == 0:
            await post(http, f"/api/sessions/{FIREHOSE}/events", [{"type": "soak.big", "pad": FIREHOSE_PAD}] * 8)
            firehose += 1
            if firehose % 10 == 0:
                firehose_on = (await stats(http))["slow_consumer_disconnects"] < SLOW_READERS
    for session_id in SESSIONS:
        await post(
            http,
            f"/api/sessions/{session_id}/events",
            [{"type": "task_completed", "task_id": "t"}, {"type": "soak.end"}],
        )
    return {"batches": batches, "firehose": firehose}


async def churner(port: int, deadline: float, index: int) -> int:
    """Connect, ping, leave; again and again, on both endpoints, leaving both ways."""
    churns = 0
    while time.monotonic() < deadline and churns < MAX_CHURNS:
        session_id = SESSIONS[(index + churns) % len(SESSIONS)]
        research = churns % 3 == 0
        params = {"replay": "none" if churns % 2 else "missed", "user_id": f"churn{index}"}
        if research:
            path, greeting = f"/ws/research/{session_id}", "connection_established"
        else:
            path, greeting = "/ws", "connected"
            params["session_id"] = session_id
        client = await connect(port, path, **params)
        await client.expect(type=greeting)
        await client.send({"type": "ping"})
        await client.receive_until(type="pong")
        if churns % 2:
            await client.send({"type": "disconnect"})
            await client.receive_until(type="disconnected")
            assert await client.closed() == (1000, "client disconnect")
            OPENED.discard(client.conn)
        else:
            await drain(client)
        churns += 1
    return churns


async def open_slow_reader(port: int) -> WebSocketClientConnection:
    """A client that never reads (tornado's client stops reading the socket once a message waits)."""
    conn = await asyncio.wait_for(websocket_connect(f"ws://127.0.0.1:{port}/ws?session_id={FIREHOSE}&replay=none"), 10)
    OPENED.add(conn)
    return conn


async def finish_slow_reader(conn: WebSocketClientConnection) -> int | None:
    """Read what it was sent until the close; its close code (None: the server gave up waiting
    for the close handshake and dropped it, as it must for a peer that does not read)."""
    while await asyncio.wait_for(conn.read_message(), 10) is not None:
        pass
    code = conn.close_code
    conn.close()
    OPENED.discard(conn)
    return code


async def poll(http: Any, done: Any, what: str, attempts: int = 1000) -> dict[str, Any]:
    """Fetch the stats until `done(stats)`; a bounded number of awaited requests, no sleeps."""
    current: dict[str, Any] = {}
    for _ in range(attempts):
        current = await stats(http)
        if done(current):
            return current
    raise AssertionError(f"{what}: never reached; last stats {current!r}")


async def test_soak_loses_no_event_for_well_behaved_clients_and_leaves_nothing_behind(http_server_client, port):
    http = http_server_client
    gc.collect()
    tasks_before = len(asyncio.all_tasks())
    rss_before = rss_kib()
    deadline = time.monotonic() + SOAK_SECONDS

    slow = [await open_slow_reader(port) for _ in range(SLOW_READERS)]
    readers = well_behaved_readers(port)
    for reader in readers:  # connected before the first publish: each expects every seq from its greeting on
        await reader.connect()

    try:
        async with asyncio.TaskGroup() as group:  # the first failure cancels the rest
            publishing = group.create_task(publisher(http, deadline))
            churning = [group.create_task(churner(port, deadline, i)) for i in range(CHURNERS)]
            for reader in readers:
                group.create_task(reader.run())
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from failed
    published = publishing.result()
    churns = sum(task.result() for task in churning)
    slow_codes = [await finish_slow_reader(conn) for conn in slow]

    # Everyone did something, and the slow readers were closed as slow consumers.
    assert published["batches"] > 0
    assert churns > 0
    assert all(reader.received > 0 for reader in readers)
    assert sum(reader.reconnects for reader in readers) > 0
    assert set(slow_codes) <= {4008, None}, slow_codes

    # Everyone has left: nothing is counted, no connection actor lives.
    after = await poll(http, lambda s: s["active_connections"] == 0, "active_connections back to 0")
    assert after["slow_consumer_disconnects"] >= SLOW_READERS, after
    for session_id in (*SESSIONS, FIREHOSE):
        response = await http.fetch(f"/api/sessions/{session_id}", method="DELETE")
        assert response.code == 200
    await poll(http, lambda s: s["active_sessions"] == 0, "every session deleted")
    for _ in range(1000):
        if live_connection_actors() == 0:
            break
        await stats(http)
    assert live_connection_actors() == 0
    for _ in range(1000):  # server-side handler tasks end once their sockets are closed
        if len(asyncio.all_tasks()) <= tasks_before + TASK_SLACK:
            break
        await stats(http)
    assert len(asyncio.all_tasks()) <= tasks_before + TASK_SLACK, [t.get_coro() for t in asyncio.all_tasks()]
    gc.collect()
    growth = rss_kib() - rss_before
    assert growth < RSS_GROWTH_LIMIT_KIB, f"RSS grew by {growth} KiB"
    print(  # shown with -s: what one run did
        f"soak {SOAK_SECONDS:g}s: {published['batches']} batches ({published['batches'] * BATCH} events), "
        f"{published['firehose']} firehose batches, {churns} churns, "
        f"{sum(r.received for r in readers)} messages read, {sum(r.reconnects for r in readers)} reconnects, "
        f"{sum(r.slow_closes for r in readers)} well-behaved 4008s, slow readers {slow_codes}, "
        f"RSS +{growth} KiB, tasks {tasks_before} -> {len(asyncio.all_tasks())}"
    )


async def test_a_publish_racing_a_connection_that_just_left_still_reaches_the_others(broker, http_server_client, port):
    """The soak's failure, made deterministic: the leaving connection's actor stops (its socket
    closed) in the same loop turn as a publish reaches the session, so the session handles the
    publish before the Detach that the stopped actor sent. The publish must succeed and the
    connection that stays must get the event."""
    from actors.messages import TransportClosed
    from broker.validation import normalize_events

    leaving = await connect(port, "/ws", session_id="race.s", replay="none")
    await leaving.expect(type="connected")
    [leaving_actor] = [ref for ref in ActorRegistry.get_all() if ref.actor_class is ConnectionActor]
    staying = await connect(port, "/ws", session_id="race.s", replay="none")
    await staying.expect(type="connected")
    events = normalize_events([{"type": "race.x"}], session_id="race.s", now=time.time())
    leaving_actor.tell(TransportClosed())  # what the handler tells it when the socket closes
    seqs = await broker.publish(events)  # before the dispatcher has run anything of the above
    assert seqs == [1]
    message = await staying.receive()
    assert message is not None
    assert (message["type"], message["seq"]) == ("race.x", 1)
