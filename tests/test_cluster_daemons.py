"""Several real daemons on one real Redis, over real WebSockets (docs/protocol.md section 7; issue 12).

Every node is `python -m broker serve --port 0` with `BROKER_BACKEND=redis`,
its own `BROKER_NODE_ID` and a short `BROKER_BACKEND_CHECK_INTERVAL`; Redis is
a `redis-server` of the test's own (tests/support/redis.py). Nothing is
mocked: the faults are real signals (`kill -9` of a node, SIGSTOP / SIGKILL
of Redis), a real `CLIENT KILL`, and a real half-open subscription (a proxy
that swallows what Redis sends to one node's subscriber).

The tests that leave the cluster as they found it share one cluster of three
nodes (`trio`); the ones that kill or restart something start their own.
What a user would notice is what is checked: which messages each client
receives, in which order, how often, with which epoch; what each HTTP answer
says. Clients that lose their node reconnect to another one with `last_seq`
and `epoch` as PROTOCOL section 3 says (`Follower`); publishers retry a batch
with the same event ids after a 503 or a cut (`Publisher`), as section 7
tells them to.

Waiting is bounded everywhere. The daemons tell nothing but their HTTP
answers and their log files, so the waits on them are polls with a deadline
(marked); a reconnecting client's and a retrying publisher's pauses are
their backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from tornado.httpclient import HTTPClientError

from broker.testing import WebSocketClient
from tests.support.daemon import BrokerProcess, settings_env
from tests.support.redis import RedisServer
from tests.support.wire import get_json, metrics, post_events, post_json, session_info, stats

#: backend_check_interval of every node: heartbeat, canary and stats sync this often.
CHECK = 0.3
#: A node counts as live until it has been silent this long (PROTOCOL section 7).
SILENT = 3 * CHECK
#: max_interval_ms of the throttle (PROTOCOL section 4): long enough that a few publishes in a row
#: land before a trailing edge, even on a loaded machine.
MAX_INTERVAL_MS = 1000
#: Upper bound of any one wait on the cluster.
WAIT = 20.0
#: Pause between two polls of another process.
POLL = 0.05

BASE_SETTINGS: dict[str, Any] = {
    "backend": "redis",
    "backend_check_interval": CHECK,
    "max_interval_ms": MAX_INTERVAL_MS,
    "keepalive_interval": 0.5,
    "shutdown_timeout": 5,
    "log_format": "json",
    "buffer_size": 1000,
}


# -- nodes and clusters ---------------------------------------------------------------


class Node(BrokerProcess):
    """One daemon of a cluster; `node_id=None` leaves it to the default (host name and process id)."""

    def __init__(self, directory: Path, node_id: str | None, redis_url: str, **settings: Any) -> None:
        named = {} if node_id is None else {"node_id": node_id}
        super().__init__(directory, env=settings_env(**{**BASE_SETTINGS, **settings, "redis_url": redis_url, **named}))
        self.node_id = node_id or f"{socket.gethostname()}:{self.pid}"

    async def ready(self, timeout: float = WAIT) -> Node:
        """Wait until it listens and /readyz says 200 (Redis answers, the canary came back)."""
        await self.started()
        await poll(self.readyz, lambda code: code == 200, f"{self.node_id} ready", timeout)
        return self

    def ready_blocking(self, timeout: float = WAIT) -> Node:
        self.wait_started()
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url("/readyz"), timeout=5) as answer:
                    if answer.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() < deadline, f"{self.node_id} never ready: {self.output()}"
            time.sleep(POLL)  # noqa: sleep - bounded poll of another process

    async def readyz(self) -> int:
        return (await self.fetch("/readyz")).code

    async def ws(self, session_id: str, *, research: bool = False, **params: Any) -> WebSocketClient:
        """A WebSocket client of this node (closed by the cluster at teardown), greeting not read."""
        path = f"/ws/research/{session_id}" if research else "/ws"
        if not research:
            params["session_id"] = session_id
        return await WebSocketClient.connect(self.port, path, timeout=WAIT, **params)

    async def publish(self, session_id: str, *events: dict[str, Any]) -> list[int | None]:
        code, body = await post_json(self, f"/api/sessions/{session_id}/events", list(events))
        assert code == 202, (self.node_id, code, body)
        seqs: list[int | None] = body["seq"]
        return seqs


class Cluster:
    """Nodes on one Redis; every node (and every incarnation of one) is killed at teardown."""

    def __init__(self, directory: Path, redis: RedisServer, **settings: Any) -> None:
        self.directory = directory
        self.redis = redis
        self.settings = settings
        self.processes: list[Node] = []
        self.clients: list[WebSocketClient] = []
        self.followers: list[Follower] = []

    def spawn(self, node_id: str, **settings: Any) -> Node:
        """Start one node's process (not waited for); a restart is a new process under the same id."""
        directory = self.directory / f"{node_id}-{len(self.processes)}"
        node = Node(directory, node_id, settings.pop("redis_url", self.redis.url), **{**self.settings, **settings})
        self.processes.append(node)
        return node

    async def start(self, *node_ids: str, **settings: Any) -> list[Node]:
        """Start these nodes together and wait until every one is ready."""
        nodes = [self.spawn(node_id, **settings) for node_id in node_ids]
        for node in nodes:
            await node.ready()
        return nodes

    async def connect(self, node: Node, session_id: str, **params: Any) -> tuple[WebSocketClient, dict[str, Any]]:
        """A client of `node` and its greeting."""
        client = await node.ws(session_id, **params)
        self.clients.append(client)
        greeting = await client.receive()
        assert greeting is not None and greeting["type"] in {"connected", "connection_established"}, greeting
        return client, greeting

    def close_clients(self) -> None:
        for client in self.clients:
            client.close()
        self.clients.clear()

    async def stop_followers(self) -> None:
        for follower in self.followers:
            await follower.stop()

    def stop(self) -> None:
        self.close_clients()
        for node in self.processes:
            node.stop()


@pytest.fixture
def cluster(io_loop: Any, tmp_path: Path, redis_server: RedisServer) -> Iterator[Cluster]:
    """A cluster of the test's own (on the function's Redis); start its nodes with `await cluster.start(...)`."""
    nodes = Cluster(tmp_path / "nodes", redis_server)
    yield nodes
    io_loop.run_sync(nodes.stop_followers)
    nodes.stop()


@pytest.fixture
def durable_cluster(io_loop: Any, tmp_path: Path) -> Iterator[Cluster]:
    """A cluster of the test's own on a Redis with persistence (appendonly yes, appendfsync always)."""
    (tmp_path / "redis").mkdir()
    redis = RedisServer(tmp_path / "redis", persist=True).start()
    nodes = Cluster(tmp_path / "nodes", redis)
    yield nodes
    io_loop.run_sync(nodes.stop_followers)
    nodes.stop()
    redis.stop()


# -- the shared cluster ------------------------------------------------------------------


class HeldUpstream:
    """The query upstream (`query_backend = "http"`): answers one chunk, then holds the rest until `release()`.

    A query that is sure to still run while another node is asked for a
    second one: `busy` does not depend on how fast a demo answer streams.
    """

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.queries = 0
        gate = self.gate
        upstream = self

        class Answer(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # the body ends when the connection does

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                upstream.queries += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.end_headers()
                self.wfile.write(b'{"content": "first"}\n')
                self.wfile.flush()
                gate.wait(WAIT)
                with contextlib.suppress(OSError):  # the node that asked may have been killed meanwhile
                    self.wfile.write(b'{"content": " and last"}\n')

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                """Quiet. A traceback printed from this thread makes Python 3.11 parse source (for its
                carets) while the test's thread may be parsing too, and CPython 3.11 can fail that
                with "SystemError: AST constructor recursion depth mismatch" (python/cpython#106905)."""

        self.server = Server(("127.0.0.1", 0), Answer)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/answer"
        self.thread = threading.Thread(target=self.server.serve_forever, name="held-upstream", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def upstream() -> Iterator[HeldUpstream]:
    server = HeldUpstream()
    yield server
    server.close()


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory, upstream: HeldUpstream) -> Iterator[Cluster]:
    """Three nodes a, b, c on one Redis, for the tests that leave the cluster as they found it."""
    redis = RedisServer(tmp_path_factory.mktemp("redis")).start()
    cluster = Cluster(tmp_path_factory.mktemp("nodes"), redis, query_backend="http", query_upstream_url=upstream.url)
    try:
        nodes = [cluster.spawn(node_id) for node_id in ("a", "b", "c")]
        for node in nodes:
            node.ready_blocking()
        yield cluster
    finally:
        cluster.stop()
        redis.stop()


@pytest.fixture
def trio(io_loop: Any, shared_cluster: Cluster, upstream: HeldUpstream) -> Iterator[tuple[Node, Node, Node]]:
    """The shared cluster's nodes; after the test its clients are closed and every node has let go of them."""
    upstream.gate.clear()
    a, b, c = shared_cluster.processes[:3]
    yield a, b, c
    upstream.gate.set()
    shared_cluster.close_clients()

    async def settled() -> None:
        for node in (a, b, c):
            await poll(lambda node=node: stats(node), lambda s: s["active_connections"] == 0, "clients gone")

    io_loop.run_sync(settled, timeout=WAIT + 5)


# -- clients that follow a session across nodes, publishers that retry ------------------


class Follower:
    """A client that follows one session, moving to another node whenever it loses its own.

    It reconnects with `last_seq` and `epoch` (PROTOCOL section 3), to the
    next node of `nodes()` whose process is alive and that accepts the
    handshake. Everything it receives is kept: `seqs` (every session message's
    seq, in arrival order, duplicates included), `gaps`, `greetings`.
    """

    def __init__(self, cluster: Cluster, nodes: Callable[[], list[Node]], session_id: str, **params: Any) -> None:
        self.cluster = cluster
        self.nodes = nodes
        self.session_id = session_id
        self.params = params
        #: everything received but keepalives, in arrival order
        self.received: list[dict[str, Any]] = []
        self.messages: list[dict[str, Any]] = []
        self.seqs: list[int] = []
        self.gaps: list[dict[str, Any]] = []
        self.greetings: list[dict[str, Any]] = []
        self.closes: list[tuple[str, int | None]] = []
        self.keepalives: list[float] = []
        self.epoch: str | None = None
        self.last_seq: int | None = None
        self.node: Node | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        cluster.followers.append(self)

    def start(self, first: Node) -> Follower:
        self.node = first
        self._task = asyncio.ensure_future(self._run())
        return self

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def connected(self, count: int = 1, timeout: float = WAIT) -> dict[str, Any]:
        """Wait until it has been greeted `count` times; the latest greeting."""
        await self.until(lambda: len(self.greetings) >= count, f"greeting {count}", timeout)
        return self.greetings[-1]

    async def reached(self, seq: int, timeout: float = WAIT) -> None:
        """Wait until it received a session message with a seq of at least `seq`."""
        await self.until(lambda: (self.last_seq or 0) >= seq, f"seq {seq}", timeout)

    async def until(self, condition: Callable[[], bool], what: str, timeout: float) -> None:
        """Wait until `condition()` holds (checked whenever it receives something); fail after `timeout`."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self._task is not None and self._task.done():
                self._task.result()  # its failure, if it failed
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{self.session_id}: no {what} within {timeout} s; seqs {self.seqs[-20:]}"
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def _run(self) -> None:
        while not self._stopping:
            client = await self._connect()
            while True:
                try:
                    message = await client.receive()
                except TimeoutError:
                    continue
                if message is None:
                    self.closes.append((self.node.node_id if self.node else "?", client.close_info()[0]))
                    client.close()
                    break
                self._take(message)
            self._next_node()

    def _take(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind != "keepalive":
            self.received.append(message)
        if kind in {"connected", "connection_established"}:
            self.greetings.append(message)
            self.epoch = message["epoch"]
        elif kind == "gap":
            self.gaps.append(message)
            self.epoch = message["epoch"]
        elif kind == "keepalive":
            self.keepalives.append(time.monotonic())
        if "seq" in message:
            self.messages.append(message)
            self.seqs.append(message["seq"])
            self.last_seq = message["seq"]
            self.epoch = message["epoch"]
        self._changed.set()

    def _next_node(self) -> None:
        nodes = self.nodes()
        if self.node in nodes:
            nodes = nodes[nodes.index(self.node) + 1 :] + nodes[: nodes.index(self.node) + 1]
        self.node = next((n for n in nodes if n.alive), self.node)

    async def _connect(self) -> WebSocketClient:
        """A handshake with the current node, else the next live ones, until one greets (bounded)."""
        deadline = time.monotonic() + WAIT
        params = dict(self.params)
        while True:
            node = self.node
            assert node is not None
            if self.last_seq is not None:
                params.update(last_seq=self.last_seq, epoch=self.epoch)
            try:
                client = await node.ws(self.session_id, **params)
            except (HTTPClientError, OSError, TimeoutError):
                assert time.monotonic() < deadline, f"{self.session_id}: no node accepted a reconnect"
                self._next_node()
                await asyncio.sleep(0.1)  # noqa: sleep - a reconnecting client's backoff
                continue
            self.cluster.clients.append(client)
            return client


class Publisher:
    """Publishes numbered events `tick` (n = 1, 2, ...) in batches, round robin over the live nodes.

    A batch that is not answered 202 (a 503, a cut connection, a timeout) is
    sent again, unchanged (same event ids), to the next node: the retry PROTOCOL
    section 7 asks of publishers. `acked` maps each event id to the seq its
    202 gave it.
    """

    def __init__(self, nodes: Callable[[], list[Node]], session_id: str, batch: int = 3) -> None:
        self.nodes = nodes
        self.session_id = session_id
        self.batch = batch
        self.acked: dict[str, int | None] = {}
        self.sent = 0
        self.refusals: list[tuple[str, int]] = []
        self._turn = 0

    def event_id(self, n: int) -> str:
        return f"{self.session_id}-{n}"

    async def publish(self, count: int) -> None:
        """Publish the next `count` events, each batch until it is acknowledged."""
        end = self.sent + count
        while self.sent < end:
            numbers = range(self.sent + 1, min(self.sent + self.batch, end) + 1)
            events = [{"type": "tick", "n": n, "event_id": self.event_id(n)} for n in numbers]
            seqs = await self._until_acknowledged(events)
            for event, seq in zip(events, seqs, strict=True):
                self.acked[event["event_id"]] = seq
            self.sent = numbers[-1]

    async def _until_acknowledged(self, events: list[dict[str, Any]]) -> list[int | None]:
        deadline = time.monotonic() + 3 * WAIT
        while True:
            nodes = [n for n in self.nodes() if n.alive]
            node = nodes[self._turn % len(nodes)] if nodes else None
            self._turn += 1
            if node is not None:
                try:
                    response = await post_events(node, self.session_id, events)
                except (OSError, HTTPClientError) as exc:  # refused, cut in flight, timed out: unknown
                    self.refusals.append((node.node_id, getattr(exc, "code", 599)))
                else:
                    if response.code == 202:
                        seqs: list[int | None] = orjson.loads(response.body)["seq"]
                        return seqs
                    self.refusals.append((node.node_id, response.code))
            assert time.monotonic() < deadline, f"not acknowledged: {events[0]['event_id']}: {self.refusals[-5:]}"
            await asyncio.sleep(0.05)  # noqa: sleep - a retrying publisher's backoff


def numbers_of(follower: Follower) -> list[int]:
    return [m["n"] for m in follower.messages if m["type"] == "tick"]


def check_exactly_once(follower: Follower, publisher: Publisher) -> None:
    """Every acknowledged event reached the follower once, in seq order, with the seq its 202 gave it."""
    assert follower.seqs == list(range(1, len(follower.seqs) + 1)), f"out of order or doubled: {follower.seqs}"
    by_seq = {m["seq"]: m for m in follower.messages}
    for n in range(1, publisher.sent + 1):
        seq = publisher.acked[publisher.event_id(n)]
        assert seq is not None and seq in by_seq, f"event {n} (seq {seq}) never arrived"
        assert by_seq[seq]["n"] == n, (seq, by_seq[seq])
    assert sorted(numbers_of(follower)) == list(range(1, publisher.sent + 1))


async def caught_up(followers: list[Follower], publisher: Publisher, *, stayed: bool = True) -> None:
    """Every follower got every acknowledged event once, in seq order, with no gap;
    if `stayed`, on the connection it had from the start (it never had to reconnect)."""
    last = publisher.acked[publisher.event_id(publisher.sent)] or 0
    for follower in followers:
        await follower.reached(last)
        check_exactly_once(follower, publisher)
        assert follower.gaps == []
        if stayed:
            assert len(follower.greetings) == 1, follower.closes


async def poll(
    check: Callable[[], Awaitable[Any]], done: Callable[[Any], bool], what: str, timeout: float = WAIT
) -> Any:
    """Ask another process (`check`) until `done(answer)`; the answer, or a failure after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        answer = await check()
        if done(answer):
            return answer
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s; last answer {answer!r}"
        await asyncio.sleep(POLL)  # noqa: sleep - bounded poll of another process


async def session_messages_of(client: WebSocketClient, count: int) -> list[dict[str, Any]]:
    """The next `count` session messages (keepalives and other connection-level messages skipped)."""
    found: list[dict[str, Any]] = []
    while len(found) < count:
        message = await client.receive()
        assert message is not None, f"closed {client.close_info()} after {found}"
        if "seq" in message:
            found.append(message)
    return found


async def next_of(client: WebSocketClient, kind: str) -> dict[str, Any]:
    """The next message of this type, skipping keepalives; any other message first fails."""
    while True:
        message = await client.receive()
        assert message is not None, f"closed {client.close_info()} before {kind}"
        if message["type"] == "keepalive":
            continue
        assert message["type"] == kind, message
        return message


def ticks(start: int, count: int) -> list[dict[str, Any]]:
    return [{"type": "tick", "n": n} for n in range(start, start + count)]


# -- 1. any node serves any session ---------------------------------------------------------


async def test_events_published_on_every_node_reach_every_node_in_one_order(trio, shared_cluster):
    a, b, c = trio
    clients = [(await shared_cluster.connect(node, "one-order"))[0] for node in (a, b, c)]

    async def publish_from(node: Node, first: int) -> None:
        for n in range(first, first + 30, 3):
            await node.publish("one-order", {"type": "tick", "n": n, "by": node.node_id})

    # Three publishers at once, one per node: Redis decides one order for all of them.
    await asyncio.gather(publish_from(a, 1), publish_from(b, 2), publish_from(c, 3))
    received = [await session_messages_of(client, 30) for client in clients]
    orders = [[(m["seq"], m["n"]) for m in messages] for messages in received]
    assert orders[0] == orders[1] == orders[2]
    assert [seq for seq, _ in orders[0]] == list(range(1, 31))
    assert sorted(n for _, n in orders[0]) == list(range(1, 31))
    assert {m["epoch"] for messages in received for m in messages} == {received[0][0]["epoch"]}


async def test_a_client_moves_to_another_node_with_last_seq_and_misses_nothing(trio, shared_cluster):
    a, b, c = trio
    first, hello = await shared_cluster.connect(a, "move")
    await a.publish("move", *ticks(1, 3))
    assert [m["seq"] for m in await session_messages_of(first, 3)] == [1, 2, 3]
    first.close()
    await c.publish("move", *ticks(4, 2))
    await a.publish("move", *ticks(6, 2))
    again, greeting = await shared_cluster.connect(b, "move", last_seq=3, epoch=hello["epoch"])
    assert (greeting["epoch"], greeting["last_seq"]) == (hello["epoch"], 7)
    missed = await session_messages_of(again, 4)
    assert [(m["seq"], m["n"]) for m in missed] == [(4, 4), (5, 5), (6, 6), (7, 7)]
    await c.publish("move", *ticks(8, 1))
    assert [(m["seq"], m["type"]) for m in await session_messages_of(again, 1)] == [(8, "tick")]


# -- 3. cluster-wide rules -----------------------------------------------------------------


async def test_replay_missed_means_not_yet_sent_to_any_connection_on_any_node(trio, shared_cluster):
    a, b, c = trio
    on_a, _ = await shared_cluster.connect(a, "missed")  # /ws: replay=missed by default
    await b.publish("missed", *ticks(1, 2))  # sent to the connection on a
    assert [m["seq"] for m in await session_messages_of(on_a, 2)] == [1, 2]
    on_a.close()
    await poll(lambda: session_info(b, "missed"), lambda answer: answer[1]["connections"] == [], "a's client gone")
    await c.publish("missed", *ticks(3, 3))  # nobody connected anywhere: the offline buffer

    on_b, _ = await shared_cluster.connect(b, "missed")
    assert [(m["seq"], m["n"]) for m in await session_messages_of(on_b, 3)] == [(3, 3), (4, 4), (5, 5)]
    on_c, _ = await shared_cluster.connect(c, "missed")  # 3..5 were just sent to b's client: nothing missed
    await a.publish("missed", *ticks(6, 1))
    assert [m["seq"] for m in await session_messages_of(on_c, 1)] == [6]
    assert [m["seq"] for m in await session_messages_of(on_b, 1)] == [6]


async def test_one_event_id_is_one_event_whichever_nodes_take_it(trio, shared_cluster):
    a, b, c = trio
    watcher, _ = await shared_cluster.connect(c, "dedup")
    event = {"type": "task_started", "task_id": "t1", "event_id": "dedup-1"}
    assert await a.publish("dedup", event) == [1]
    assert await b.publish("dedup", event) == [1]  # the retry's answer carries the first one's seq
    assert await c.publish("dedup", event, {"type": "task_completed", "task_id": "t1", "event_id": "dedup-2"}) == [
        1,
        2,
    ]
    await a.publish("dedup", {"type": "tick", "n": 3})
    assert [(m["seq"], m["type"]) for m in await session_messages_of(watcher, 3)] == [
        (1, "task_started"),
        (2, "task_completed"),
        (3, "tick"),
    ]


async def test_progress_of_one_task_is_throttled_as_one_whichever_nodes_receive_it(trio, shared_cluster):
    a, b, c = trio
    watcher, _ = await shared_cluster.connect(c, "throttle")
    before = sum([(await stats(node))["throttled_events"] for node in trio])

    def progress(value: float, event_id: str) -> dict[str, Any]:
        return {"type": "task_progress", "task_id": "t1", "progress": value, "event_id": event_id}

    assert await a.publish("throttle", progress(10, "p10")) == [1]  # a task's first progress: delivered
    assert await b.publish("throttle", progress(12, "p12")) == [None]  # within min_delta: held
    assert await c.publish("throttle", progress(13, "p13")) == [None]  # held, in place of 12
    assert await a.publish("throttle", progress(13, "p13")) == [None]  # a retry while held: null, nothing new
    # The trailing edge: the newest held state, once, max_interval_ms after the last delivery.
    [first, trailing] = await session_messages_of(watcher, 2)
    assert (first["seq"], first["progress"], trailing["seq"], trailing["progress"]) == (1, 10, 2, 13)
    assert await b.publish("throttle", progress(13, "p13")) == [2]  # the retry now answers the seq it got
    assert await b.publish("throttle", progress(30, "p30")) == [3]  # min_delta or more: at once
    assert await a.publish("throttle", progress(31, "p31")) == [None]  # held ...
    assert await c.publish("throttle", {"type": "task_completed", "task_id": "t1"}) == [4]  # ... and discarded
    assert await b.publish("throttle", progress(50, "p50")) == [None]  # a finished task: discarded
    await a.publish("throttle", {"type": "tick", "n": 0})
    rest = await session_messages_of(watcher, 3)
    assert [(m["seq"], m["type"], m.get("progress")) for m in rest] == [
        (3, "task_progress", 30),
        (4, "task_completed", None),
        (5, "tick", None),
    ]
    after = sum([(await stats(node))["throttled_events"] for node in trio])
    assert after - before == 3  # 12 superseded, 31 discarded by the finish, 50 after it
    # Within min_delta, but a new current_action, or 100: delivered at once, whichever node takes it.
    assert await a.publish("throttle", {"type": "task_started", "task_id": "t1"}) == [6]  # t1 afresh
    assert await b.publish("throttle", progress(97, "q97")) == [7]
    assert await c.publish("throttle", progress(98, "q98") | {"current_action": "writing"}) == [8]
    assert await b.publish("throttle", progress(100, "q100") | {"current_action": "writing"}) == [9]
    rest = await session_messages_of(watcher, 4)
    assert [(m["seq"], m.get("progress")) for m in rest] == [(6, None), (7, 97), (8, 98), (9, 100)]


async def test_one_query_at_a_time_per_session_across_nodes(trio, shared_cluster, upstream):
    a, b, _ = trio
    asker, _ = await shared_cluster.connect(a, "busy")
    other, _ = await shared_cluster.connect(b, "busy")
    await asker.send({"type": "query", "query": "first"})
    await next_of(asker, "query_start")
    await next_of(asker, "chunk")  # the upstream holds the rest: the query runs
    await next_of(other, "query_start")
    await next_of(other, "chunk")
    await other.send({"type": "query", "query": "second"})
    refusal = await next_of(other, "error")
    assert refusal["code"] == "busy" and "seq" not in refusal  # to its sender alone
    upstream.gate.set()
    assert (await next_of(asker, "chunk"))["content"] == " and last"
    complete = await next_of(asker, "complete")
    assert complete["full_response"] == "first and last"
    await next_of(other, "chunk")
    await next_of(other, "complete")
    # The lock is free again, for any node.
    await other.send({"type": "query", "query": "third"})
    assert (await next_of(other, "query_start"))["query"] == "third"


async def test_research_start_is_409_on_every_node_for_a_session_that_exists(trio):
    a, b, c = trio
    start = {"query": "q", "session_id": "research-409"}
    assert (await post_json(a, "/api/research/start", start))[0] == 201
    for node in (b, c, a):
        code, body = await post_json(node, "/api/research/start", start)
        assert code == 409, (node.node_id, body)


async def test_delete_on_one_node_closes_the_session_on_every_node(trio, shared_cluster):
    a, b, c = trio
    clients = [(await shared_cluster.connect(node, "doomed"))[0] for node in trio]
    await a.publish("doomed", *ticks(1, 2))
    first_epoch = (await session_info(c, "doomed"))[1]["epoch"]
    assert (await b.fetch("/api/sessions/doomed", method="DELETE")).code == 200
    for client in clients:
        await session_messages_of(client, 2)
        notice = await next_of(client, "session_closed")
        assert notice["session_id"] == "doomed"
        assert await client.closed() == (1000, "session closed")
    for node in trio:
        assert (await session_info(node, "doomed"))[0] == 404
    # A later event starts it afresh: a new epoch, seq from 1.
    assert await c.publish("doomed", *ticks(1, 1)) == [1]
    assert (await session_info(a, "doomed"))[1]["epoch"] != first_epoch


async def test_a_broadcast_reaches_every_node_and_counts_the_nodes(trio, shared_cluster):
    a, b, c = trio
    clients = [(await shared_cluster.connect(node, f"cast-{node.node_id}"))[0] for node in trio]
    for node in trio:
        assert (await stats(node))["nodes"] == 3
    code, answer = await post_json(b, "/api/broadcast", {"message": "maintenance at noon"})
    assert (code, answer) == (202, {"delivered": 1, "nodes": 3})
    for client in clients:
        notice = await next_of(client, "system_notification")
        assert notice["message"] == "maintenance at noon" and "seq" not in notice
    code, answer = await post_json(a, "/api/broadcast", {"message": "again", "exclude": ["cast-c"]})
    assert (code, answer) == (202, {"delivered": 1, "nodes": 3})
    for client in clients[:2]:
        assert (await next_of(client, "system_notification"))["message"] == "again"
    await c.publish("cast-c", *ticks(1, 1))  # c's client got no broadcast before this message
    assert (await next_of(clients[2], "tick"))["seq"] == 1


async def test_session_stats_list_the_connections_of_every_node(trio, shared_cluster):
    a, b, c = trio
    on_a, _ = await shared_cluster.connect(a, "stats", user_id="ana", events="essential")
    on_b, _ = await shared_cluster.connect(b, "stats", user_id="bo")
    await shared_cluster.connect(c, "stats", user_id="cy", research=True)
    await b.publish("stats", *ticks(1, 2))
    await session_messages_of(on_b, 2)
    await on_b.send({"type": "ack", "seq": 2})

    def listed(answer: tuple[int, Any]) -> bool:
        rows = {row["user_id"]: row for row in answer[1]["connections"]}
        return answer[0] == 200 and rows.keys() == {"ana", "bo", "cy"} and rows["bo"]["acked_seq"] == 2

    for node in trio:  # figures of other nodes may be up to 2 s old
        code, session = await poll(lambda node=node: session_info(node, "stats"), listed, "every connection", 5)
        rows = {row["user_id"]: row for row in session["connections"]}
        assert {user: row["node_id"] for user, row in rows.items()} == {"ana": "a", "bo": "b", "cy": "c"}
        assert rows["ana"]["events"] == sorted(rows["ana"]["events"]) and "task_completed" in rows["ana"]["events"]
        assert rows["cy"]["events"] == ["*"]
        assert (session["last_seq"], session["buffered_messages"]) == (2, 2)
    for node in trio:
        for path in ("/api/websocket/stats", "/ws/health"):
            code, body = await get_json(node, path)
            assert (code, body["node_id"], body["nodes"]) == (200, node.node_id, 3)
    assert on_a.conn.close_code is None  # its filter admits no tick: it received nothing, and stays


async def test_a_session_is_idle_only_when_no_node_has_a_connection(cluster):
    ttl = 2.0
    a, b = await cluster.start("a", "b", session_ttl=ttl)
    await cluster.connect(a, "ttl-held")
    await b.publish("ttl-held", *ticks(1, 1))
    # Twice session_ttl after its last event, a connection on a keeps it alive for b too.
    deadline = time.monotonic() + 2 * ttl
    while time.monotonic() < deadline:
        code, session = await session_info(b, "ttl-held")
        assert (code, session["last_seq"]) == (200, 1), "expired while a node had a connection"
        await asyncio.sleep(POLL)  # noqa: sleep - checking another process over a window of time
    epoch = session["epoch"]
    cluster.close_clients()
    await poll(lambda: session_info(b, "ttl-held"), lambda answer: answer[0] == 404, "idle expiry", ttl + 3)
    # Expired: the next event starts it afresh, with a new epoch.
    assert await a.publish("ttl-held", *ticks(2, 1)) == [1]
    assert (await session_info(b, "ttl-held"))[1]["epoch"] != epoch


async def test_a_node_starts_before_redis_and_is_named_by_its_host_and_process(tmp_path):
    redis = RedisServer(tmp_path)  # its port is chosen; nothing listens there yet
    node = Node(tmp_path / "node", None, redis.url)
    try:
        await node.started()
        assert (await node.fetch("/healthz")).code == 200
        assert await node.readyz() == 503
        redis.start()
        await node.ready()
        assert (await stats(node))["node_id"] == node.node_id == f"{socket.gethostname()}:{node.pid}"
        assert (await node.wait_log(event="backend_reachable"))["node_id"] == node.node_id
    finally:
        node.stop()
        redis.stop()


# -- a node killed ----------------------------------------------------------------------------


async def test_a_held_progress_is_delivered_even_if_the_node_that_held_it_is_killed(cluster):
    a, b = await cluster.start("a", "b")
    watcher, _ = await cluster.connect(b, "edge")
    progress = {"type": "task_progress", "task_id": "t1"}
    assert await a.publish("edge", {**progress, "progress": 10}) == [1]
    assert await a.publish("edge", {**progress, "progress": 12}) == [None]
    held_at = time.monotonic()
    a.kill()  # before its own timer fires the trailing edge
    assert time.monotonic() - held_at < MAX_INTERVAL_MS / 1000
    first, trailing = await session_messages_of(watcher, 2)
    assert (first["progress"], trailing["progress"], trailing["seq"]) == (10, 12, 2)
    assert time.monotonic() - held_at < MAX_INTERVAL_MS / 1000 + 5.0  # PROTOCOL 7: max_interval_ms plus 5 s


async def test_kill_9_of_a_node_while_publishing_loses_nothing_that_was_acknowledged(cluster):
    a, b, c = await cluster.start("a", "b", "c")
    live = lambda: [n for n in (a, b, c) if n.alive]  # noqa: E731
    followers = [Follower(cluster, live, "crash").start(node) for node in (a, a, b, c)]
    followers.append(Follower(cluster, live, "crash", research=True).start(a))
    for follower in followers:
        await follower.connected()
    publisher = Publisher(live, "crash")
    await publisher.publish(60)
    killing = asyncio.ensure_future(publisher.publish(150))
    await followers[0].reached(90)
    a.kill()
    await killing
    await publisher.publish(30)
    await caught_up(followers, publisher, stayed=False)
    for follower in followers:
        assert {g["epoch"] for g in follower.greetings} == {followers[0].greetings[0]["epoch"]}
    moved = [f for f in followers if len(f.greetings) > 1]
    assert len(moved) == 3, "the clients of the killed node reconnected elsewhere"
    assert all(f.node is not a for f in moved)


async def test_stale_connections_of_a_killed_node_are_forgotten(cluster):
    ttl = 3.0
    a, b = await cluster.start("a", "b", session_ttl=ttl)
    await cluster.connect(a, "stale-ttl")  # its only connection is on a
    await b.publish("stale-ttl", *ticks(1, 1))
    await cluster.connect(a, "stale-missed", replay="none")
    on_b, _ = await cluster.connect(b, "stale-stats")
    await cluster.connect(a, "stale-stats")
    await poll(lambda: session_info(b, "stale-stats"), lambda s: len(s[1]["connections"]) == 2, "both listed")
    a.kill()
    await poll(lambda: stats(b), lambda s: s["nodes"] == 1, "a counted dead", 3 * SILENT + 5)
    # Session stats: a's connection is not listed any more.
    _, session = await poll(
        lambda: session_info(b, "stale-stats"), lambda s: len(s[1]["connections"]) == 1, "a's row gone", 5
    )
    assert [row["node_id"] for row in session["connections"]] == ["b"]
    # replay=missed: what is published now was sent to no live connection.
    await b.publish("stale-missed", *ticks(1, 2))
    late, _ = await cluster.connect(b, "stale-missed")
    assert [m["seq"] for m in await session_messages_of(late, 2)] == [1, 2]
    # session_ttl: the dead node's connection keeps nothing alive.
    await poll(lambda: session_info(b, "stale-ttl"), lambda s: s[0] == 404, "expired", ttl + 5)
    assert on_b.conn.close_code is None


# -- every node restarted ---------------------------------------------------------------------


async def test_restarting_every_node_keeps_the_epoch_and_the_history(cluster):
    a, b = await cluster.start("a", "b")
    current: dict[str, Node] = {"a": a, "b": b}
    live = lambda: [n for n in current.values() if n.alive]  # noqa: E731
    followers = [Follower(cluster, live, "restart", research=True).start(node) for node in (a, b)]
    followers.append(Follower(cluster, live, "restart").start(b))
    for follower in followers:
        await follower.connected()
    publisher = Publisher(live, "restart")
    await publisher.publish(20)
    epoch = followers[0].greetings[0]["epoch"]

    # One by one: each node drains (server_shutdown, 1001) and comes back; publishing goes on.
    for node_id in ("a", "b"):
        publishing = asyncio.ensure_future(publisher.publish(20))
        old = current[node_id]
        old.send(signal.SIGTERM)
        assert await old.exited() == 0, old.output()
        current[node_id] = (await cluster.start(node_id))[0]
        await publishing
    # All at once: nothing runs for a while; then both come back.
    for node in list(current.values()):
        node.kill()
    for node_id in ("a", "b"):
        current[node_id] = cluster.spawn(node_id)
    for node in current.values():
        await node.ready()
    await publisher.publish(20)

    await caught_up(followers, publisher, stayed=False)
    last = publisher.acked[publisher.event_id(publisher.sent)] or 0
    for follower in followers:
        assert {g["epoch"] for g in follower.greetings} == {epoch}
        assert len(follower.greetings) >= 3  # it did lose its node (twice at least)
    page, greeting = await cluster.connect(current["a"], "restart", research=True)  # a page reloaded now
    assert (greeting["epoch"], greeting["last_seq"]) == (epoch, last)
    history = await session_messages_of(page, last)
    assert [m["seq"] for m in history] == list(range(1, last + 1))
    assert sorted(m["n"] for m in history) == list(range(1, publisher.sent + 1))


# -- Redis unavailable ----------------------------------------------------------------------


async def readyz_everywhere(nodes: list[Node], code: int, what: str, timeout: float = WAIT) -> None:
    for node in nodes:
        await poll(node.readyz, lambda answer: answer == code, f"{node.node_id}: {what}", timeout)


async def handshake_refused(node: Node, session_id: str) -> int:
    """The status a new WebSocket handshake is refused with (the test fails if it is accepted)."""
    with pytest.raises(HTTPClientError) as refused:
        client = await node.ws(session_id)
        client.close()
    return refused.value.code


async def outage_checks(nodes: list[Node], followers: list[Follower]) -> None:
    """While Redis cannot be reached: /readyz 503, handshakes 503, open connections open with keepalives."""
    await readyz_everywhere(nodes, 503, "not ready without Redis")
    for node in nodes:
        assert await handshake_refused(node, "during-the-outage") == 503
        await poll(lambda node=node: metrics(node), lambda m: m.value("broker_redis_reachable") == 0, "unreachable")
        # Known unreachable: a publish is refused whole, at once, and nothing of it is published.
        response = await post_events(node, "refused-whole", ticks(1, 2))
        assert (response.code, orjson.loads(response.body)) == (503, {"error": "backend unavailable"})
    since = time.monotonic()
    for follower in followers:
        await follower.until(lambda f=follower: any(t > since for t in f.keepalives), "a keepalive meanwhile", 5)


async def under_load(cluster: Cluster, session_id: str) -> tuple[list[Node], list[Follower], Publisher, Any]:
    """Two nodes; three followers of the session (on each node, and a research page); 30 events
    published, 60 more on their way (retrying through whatever comes), 40 of them received."""
    nodes = await cluster.start("a", "b")
    followers = [Follower(cluster, lambda: nodes, session_id).start(node) for node in nodes]
    followers.append(Follower(cluster, lambda: nodes, session_id, research=True).start(nodes[1]))
    for follower in followers:
        await follower.connected()
    publisher = Publisher(lambda: nodes, session_id)
    await publisher.publish(30)
    publishing = asyncio.ensure_future(publisher.publish(60))
    await followers[0].reached(40)
    return nodes, followers, publisher, publishing


async def test_redis_stopped_while_clients_are_connected_and_publishers_retry(cluster, redis_server):
    [a, b], followers, publisher, publishing = await under_load(cluster, "hang")
    redis_server.pause()  # SIGSTOP: connections stay open, nothing answers
    try:
        await outage_checks([a, b], followers)
    finally:
        redis_server.resume()
    await readyz_everywhere([a, b], 200, "ready again")
    await publishing
    await publisher.publish(10)
    assert any(code == 503 for _, code in publisher.refusals), "the publisher never met the outage"
    await caught_up(followers, publisher)  # on the connection each had
    for node in (a, b):
        assert (await session_info(node, "refused-whole"))[0] == 404


async def test_redis_killed_and_restarted_with_persistence_loses_nothing_accepted(durable_cluster):
    redis = durable_cluster.redis
    [a, b], followers, publisher, publishing = await under_load(durable_cluster, "durable")
    epoch = followers[0].greetings[0]["epoch"]
    redis.stop()  # SIGKILL
    try:
        await outage_checks([a, b], followers)
    finally:
        redis.start()  # the same port and directory: the append-only file brings the data back
    await readyz_everywhere([a, b], 200, "ready again")
    await publishing
    await publisher.publish(10)
    await caught_up(followers, publisher)
    for follower in followers:
        assert {m["epoch"] for m in follower.messages} == {epoch}


async def test_redis_restarted_without_persistence_starts_the_session_afresh_for_open_connections(
    cluster, redis_server
):
    a, b = await cluster.start("a", "b")
    on_a, hello = await cluster.connect(a, "amnesia")
    page, _ = await cluster.connect(b, "amnesia", research=True)
    await a.publish("amnesia", *ticks(1, 3))
    for client in (on_a, page):
        assert [m["seq"] for m in await session_messages_of(client, 3)] == [1, 2, 3]
    redis_server.stop()
    await readyz_everywhere([a, b], 503, "not ready without Redis")
    redis_server.start()  # empty: without persistence Redis lost every session
    await readyz_everywhere([a, b], 200, "ready again")
    # Each open connection is told its seqs no longer apply (a gap from 1, the new epoch) and stays open.
    gaps = [await next_of(client, "gap") for client in (on_a, page)]
    new_epoch = gaps[0]["epoch"]
    assert new_epoch != hello["epoch"]
    assert [(g["from_seq"], g["to_seq"], g["epoch"]) for g in gaps] == [(1, None, new_epoch)] * 2
    assert await b.publish("amnesia", *ticks(4, 2)) == [1, 2]
    for client in (on_a, page):
        fresh = await session_messages_of(client, 2)
        assert [(m["seq"], m["n"], m["epoch"]) for m in fresh] == [(1, 4, new_epoch), (2, 5, new_epoch)]
    # A client coming back with the old epoch gets the same notice, then the new history.
    back, greeting = await cluster.connect(b, "amnesia", last_seq=3, epoch=hello["epoch"])
    assert greeting["epoch"] == new_epoch
    assert (await next_of(back, "gap"))["from_seq"] == 1
    assert [m["n"] for m in await session_messages_of(back, 2)] == [4, 5]


# -- a node that stops hearing Redis ------------------------------------------------------------


async def test_a_node_whose_subscription_is_cut_catches_up_in_order(cluster, redis_server):
    a, b = await cluster.start("a", "b")
    followers = [Follower(cluster, lambda: [b], "cut").start(b) for _ in range(2)]
    followers.append(Follower(cluster, lambda: [a], "cut").start(a))
    for follower in followers:
        await follower.connected()
    publisher = Publisher(lambda: [a], "cut")  # every publish enters through a, b hears them from Redis
    await publisher.publish(20)
    publishing = asyncio.ensure_future(publisher.publish(120))
    await followers[0].reached(30)
    # CLIENT KILL TYPE pubsub: both nodes lose their subscription at once, while a publishes.
    assert redis_server.command("CLIENT", "KILL", "TYPE", "pubsub", "SKIPME", "yes") == b":2\r\n"
    await publishing
    await publisher.publish(10)
    await caught_up(followers, publisher)
    for node in (a, b):
        await node.wait_log(event="pubsub_lost")
        await node.wait_log(event="pubsub_restored")
        assert (await metrics(node)).value("broker_redis_reconnects_total") >= 1
    await readyz_everywhere([a, b], 200, "ready after the cut")


class DeafeningProxy:
    """A TCP proxy between one node and Redis that can make the node deaf without a word.

    While `deaf`, whatever Redis sends on a connection that subscribed is
    swallowed; everything else flows (the node's commands, the canary's
    PUBLISH): a subscription that died silently, a half-open connection.
    New subscriptions made meanwhile are swallowed too, so the node stays
    deaf until the test lets go.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.deaf = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> DeafeningProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [client_writer, upstream_writer]
        subscribed = False

        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool) -> None:
            nonlocal subscribed
            while data := await reader.read(65536):
                subscribed = subscribed or (upstream and b"SUBSCRIBE" in data.upper())
                if not upstream and subscribed and self.deaf:
                    continue  # swallowed: Redis believes it delivered it
                writer.write(data)
                await writer.drain()
            writer.transport.abort()

        await asyncio.gather(
            pump(client_reader, upstream_writer, upstream=True),
            pump(upstream_reader, client_writer, upstream=False),
            return_exceptions=True,
        )


async def test_a_deaf_node_is_caught_by_its_canary_reported_and_catches_up(cluster, redis_server):
    proxy = await DeafeningProxy(redis_server.port).start()
    try:
        # A history of 15: what b misses while deaf (20 messages) is partly evicted before it hears again.
        [a] = await cluster.start("a", buffer_size=15)
        [b] = await cluster.start("b", redis_url=proxy.url, buffer_size=15)
        followers = [Follower(cluster, lambda: [b], "deaf").start(b) for _ in range(2)]
        for follower in followers:
            await follower.connected()
        publisher = Publisher(lambda: [a], "deaf")
        await publisher.publish(10)
        await followers[0].reached(10)

        proxy.deaf = True
        deafened = time.monotonic()
        await publisher.publish(10)  # b's subscription hears none of these
        deaf = await b.wait_log(event="backend_deaf", timeout=5)
        assert time.monotonic() - deafened < CHECK + 1.0  # within backend_check_interval (plus a loaded machine)
        assert deaf["node_id"] == "b" and deaf["level"] == "warning"
        await poll(b.readyz, lambda code: code == 503, "b reported not ready")
        window = time.monotonic() + 4 * CHECK
        while time.monotonic() < window:  # a deaf node is never reported ready
            assert await b.readyz() == 503
            await asyncio.sleep(POLL)  # noqa: sleep - checking another process over a window of time
        scrape = await metrics(b)
        assert scrape.value("broker_redis_subscription_healthy") == 0
        assert scrape.value("broker_redis_canary_failures_total") >= 1
        assert await a.readyz() == 200  # the other node hears fine
        await publisher.publish(10)

        proxy.deaf = False
        await poll(b.readyz, lambda code: code == 200, "b ready again")
        await publisher.publish(5)
        assert [publisher.acked[publisher.event_id(n)] for n in range(1, 36)] == list(range(1, 36))
        for follower in followers:
            await follower.reached(35)
            # In order, none twice, on the connection it had; a gap first for exactly what was evicted.
            assert follower.seqs == [*range(1, 11), *range(16, 36)]
            assert [m["n"] for m in follower.messages] == follower.seqs
            assert [(g["from_seq"], g["to_seq"]) for g in follower.gaps] == [(11, 15)]
            gap_at = follower.received.index(follower.gaps[0])
            assert [m.get("seq") for m in follower.received[gap_at - 1 : gap_at + 2]] == [10, None, 16]
            assert len(follower.greetings) == 1
        assert b.count_logs(event="backend_deaf") == 1  # once per episode, not once per failed canary
    finally:
        await proxy.close()


# -- a node killed while its query runs -------------------------------------------------------


async def test_a_query_of_a_killed_node_does_not_keep_its_session_busy(cluster, upstream):
    upstream.gate.clear()
    try:
        a, b = await cluster.start("a", "b", query_backend="http", query_upstream_url=upstream.url)
        asker, _ = await cluster.connect(a, "orphan")
        other, _ = await cluster.connect(b, "orphan")
        await asker.send({"type": "query", "query": "first"})
        await next_of(other, "query_start")
        await next_of(other, "chunk")  # the query runs on a, held by the upstream
        await other.send({"type": "query", "query": "too soon"})
        assert (await next_of(other, "error"))["code"] == "busy"
        a.kill()
        killed = time.monotonic()
        while True:  # the lock of a dead node's query expires: 3 x backend_check_interval
            await other.send({"type": "query", "query": "after the crash"})
            answer = await next_of_any(other, {"error", "query_start"})
            if answer["type"] == "query_start":
                break
            assert answer["code"] == "busy"
            assert time.monotonic() - killed < SILENT + 5, "the dead node's query kept the session busy"
            await asyncio.sleep(0.2)  # noqa: sleep - a client asking again after busy
        assert answer["query"] == "after the crash"
    finally:
        upstream.gate.set()


async def next_of_any(client: WebSocketClient, kinds: set[str]) -> dict[str, Any]:
    """The next message of one of these types, skipping keepalives; any other message first fails."""
    while True:
        message = await client.receive()
        assert message is not None, f"closed {client.close_info()} before {kinds}"
        if message["type"] != "keepalive":
            assert message["type"] in kinds, message
            return message
