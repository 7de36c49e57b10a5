"""Two nodes on one real Redis, over real sockets, in one process (docs/protocol.md section 7).

Both nodes are Brokers with their own application and HTTP server on the
test's loop, sharing one redis-server of the test's own: quick to start, and
able to look inside a node. The same rules with separate daemon processes,
kill -9, restarts and Redis faults under load are tests/test_cluster_daemons.py.
"""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from actors.runtime import LoopDispatcher, install_dispatcher
from broker.app import make_app
from broker.config import Settings
from broker.core import Broker
from broker.testing import WebSocketClient
from tests.support.redis import RedisServer
from tests.support.wire import wait_until
from tests.test_daemon import spawn, terminate  # noqa: F401 - spawn is a fixture


class Node:
    def __init__(self, broker: Broker, server: HTTPServer, port: int) -> None:
        self.broker = broker
        self.server = server
        self.port = port
        self.clients: list[WebSocketClient] = []

    async def fetch(self, path: str, **kwargs: Any) -> HTTPResponse:
        return await AsyncHTTPClient().fetch(f"http://127.0.0.1:{self.port}{path}", raise_error=False, **kwargs)

    async def publish(self, session_id: str, *events: dict[str, Any]) -> HTTPResponse:
        return await self.fetch(
            f"/api/sessions/{session_id}/events",
            method="POST",
            headers={"Content-Type": "application/json"},
            body=orjson.dumps(list(events)),
        )

    async def client(self, path: str = "/ws", **params: Any) -> WebSocketClient:
        client = await WebSocketClient.connect(self.port, path, **params)
        self.clients.append(client)
        return client


async def start_node(redis_url: str, node_id: str, **settings: Any) -> Node:
    settings.setdefault("backend_check_interval", 0.5)
    settings = Settings(backend="redis", redis_url=redis_url, node_id=node_id, **settings)
    broker = Broker(settings)
    broker.ready = True
    await broker.start()
    [sock] = bind_sockets(0, "127.0.0.1")
    server = HTTPServer(make_app(broker))
    server.add_sockets([sock])
    deadline = time.monotonic() + 10
    while not broker.ready:
        assert time.monotonic() < deadline, "the node did not become ready"
        await asyncio.sleep(0.01)  # noqa: sleep - bounded wait for the node's first canary
    return Node(broker, server, sock.getsockname()[1])


async def stop_node(node: Node) -> None:
    for client in node.clients:
        client.close()
    node.server.stop()
    node.broker.close_all(1001, "server shutdown")
    await node.broker.stop_actors(5)
    await node.broker.close()
    await node.server.close_all_connections()


@pytest.fixture
def dispatcher(io_loop: Any) -> Iterator[LoopDispatcher]:
    """Both nodes' actors run on the test's loop, as one daemon's do."""
    dispatcher = LoopDispatcher(io_loop)
    previous = install_dispatcher(dispatcher)
    yield dispatcher
    install_dispatcher(previous)


@pytest.fixture
def nodes(io_loop: Any, dispatcher: LoopDispatcher, redis_server: Any) -> Iterator[tuple[Node, Node]]:
    a = io_loop.run_sync(lambda: start_node(redis_server.url, "node-a"))
    b = io_loop.run_sync(lambda: start_node(redis_server.url, "node-b"))
    yield a, b
    for node in (a, b):
        io_loop.run_sync(lambda node=node: stop_node(node))


async def seqs_of(client: WebSocketClient, count: int) -> list[int]:
    seqs = []
    while len(seqs) < count:
        message = await client.receive()
        if "seq" in message:
            seqs.append(message["seq"])
    return seqs


async def test_an_event_published_on_one_node_reaches_every_node_in_one_order(nodes):
    a, b = nodes
    on_a = await a.client(session_id="c1")
    on_b = await b.client(session_id="c1")
    hello_a, hello_b = await on_a.expect(type="connected"), await on_b.expect(type="connected")
    assert hello_a["epoch"] == hello_b["epoch"]
    for n in range(10):
        node = a if n % 2 else b
        response = await node.publish("c1", {"type": "task_started", "task_id": f"t{n}"})
        assert response.code == 202, response.body
    assert await seqs_of(on_a, 10) == list(range(1, 11))
    assert await seqs_of(on_b, 10) == list(range(1, 11))


class HeldCopies:
    """A node's pub/sub callback held back (a slow subscription): the copies wait until `release()`."""

    def __init__(self, node: Node) -> None:
        cluster = node.broker.cluster
        assert cluster is not None
        self.subscriber = cluster.subscriber
        self.deliver = self.subscriber._on_events
        self.held: list[tuple[str, bytes]] = []
        self._arrived = asyncio.Event()
        self.subscriber._on_events = self._hold

    def _hold(self, session_id: str, payload: bytes) -> None:
        self.held.append((session_id, payload))
        self._arrived.set()

    async def until(self, count: int) -> None:
        """Wait until Redis has sent `count` copies (Redis sends them all the same)."""
        while len(self.held) < count:
            self._arrived.clear()
            await asyncio.wait_for(self._arrived.wait(), 10)

    def release(self) -> int:
        self.subscriber._on_events = self.deliver
        held, self.held = self.held, []
        for session_id, payload in held:
            self.deliver(session_id, payload)
        return len(held)


async def followed_on_both(a: Node, b: Node, session_id: str) -> WebSocketClient:
    """A follower of the session on A, and one on B (so that A's publishes are PUBLISHed: B hears them)."""
    follower = await a.client(session_id=session_id)
    await follower.expect(type="connected")
    await (await b.client(session_id=session_id)).expect(type="connected")
    return follower


async def test_a_nodes_own_publish_reaches_its_followers_from_the_reply_and_its_copy_is_not_sent_again(nodes):
    a, b = nodes
    follower = await followed_on_both(a, b, "e1")
    copies = HeldCopies(a)
    for n in range(3):
        response = await a.publish("e1", {"type": "task_started", "task_id": f"t{n}"})
        assert response.code == 202, response.body
    assert await seqs_of(follower, 3) == [1, 2, 3]  # with every pub/sub copy still held
    await copies.until(3)
    assert copies.release() == 3
    await a.publish("e1", {"type": "task_started", "task_id": "after"})
    assert await seqs_of(follower, 1) == [4]  # the copies of 1-3 were not delivered again


async def test_the_copy_of_a_publish_sent_from_its_reply_is_dropped_unparsed_and_other_copies_are_not(
    nodes, monkeypatch
):
    from broker.cluster import node as node_module

    a, b = nodes
    follower = await followed_on_both(a, b, "e3")
    parsed: list[bytes] = []
    parse = node_module.parse_payload
    monkeypatch.setattr(node_module, "parse_payload", lambda payload: parsed.append(payload) or parse(payload))
    copies = HeldCopies(a)
    assert (await a.publish("e3", {"type": "task_started", "task_id": "from-a"})).code == 202
    assert await seqs_of(follower, 1) == [1]  # from the reply
    await copies.until(1)
    parsed.clear()  # the reply's own
    assert copies.release() == 1  # A's own copy: its mirror sent seq 1 already
    assert (await b.publish("e3", {"type": "task_started", "task_id": "from-b"})).code == 202
    assert await seqs_of(follower, 1) == [2]  # another node's publish comes by pub/sub, parsed as ever
    assert not any(b"from-a" in payload for payload in parsed)  # A's own copy was dropped unparsed
    assert sum(b"from-b" in payload for payload in parsed) == 2  # B's reply, and its copy on A, parsed as ever


def stream_reads(node: Node, monkeypatch: Any) -> list[Any]:
    """The node's reads of a session's stream from now on (its mirrors' loads and hole fills), as they are made."""
    assert node.broker.cluster is not None
    store = node.broker.cluster.store
    reads: list[Any] = []
    read = store.read

    async def counted_read(*args: Any, **kwargs: Any) -> Any:
        reads.append(args)
        return await read(*args, **kwargs)

    monkeypatch.setattr(store, "read", counted_read)
    return reads


async def test_a_reply_that_overtakes_another_nodes_publish_waits_for_pub_sub_order(nodes, monkeypatch):
    a, b = nodes
    follower = await followed_on_both(a, b, "e2")
    holes_read = stream_reads(a, monkeypatch)
    copies = HeldCopies(a)
    assert (await b.publish("e2", {"type": "task_started", "task_id": "from-b"})).code == 202  # seq 1, not heard on A
    assert (await a.publish("e2", {"type": "task_started", "task_id": "from-a"})).code == 202  # seq 2, A's reply
    await copies.until(2)
    copies.release()
    first, second = await follower.expect(type="task_started"), await follower.expect(type="task_started")
    assert [(first["seq"], first["task_id"]), (second["seq"], second["task_id"])] == [(1, "from-b"), (2, "from-a")]
    assert holes_read == []  # A's early reply was dropped, not kept as a hole to read back: pub/sub filled it


async def test_a_publish_no_other_node_hears_is_not_published_and_its_followers_get_it_from_the_reply(nodes):
    a, b = nodes
    follower = await a.client(session_id="q1")
    await follower.expect(type="connected")
    copies = HeldCopies(a)
    for n in range(3):
        assert (await a.publish("q1", {"type": "task_started", "task_id": f"a{n}"})).code == 202
    assert await seqs_of(follower, 3) == [1, 2, 3]  # from the replies: no copy is held back
    # B does not hear q1, so A does: B's publish is PUBLISHed. Redis sends one connection's
    # messages in order, so had A's three been PUBLISHed, their copies would come first.
    assert (await b.publish("q1", {"type": "task_started", "task_id": "from-b"})).code == 202
    await copies.until(1)
    [(_, payload)] = copies.held
    assert b'"task_id":"from-b"' in payload and b'"task_id":"a0"' not in payload
    copies.release()
    assert await seqs_of(follower, 1) == [4]


async def test_a_node_that_starts_to_follow_hears_a_session_whose_publisher_was_alone(nodes):
    a, b = nodes
    on_a = await a.client(session_id="q2")
    await on_a.expect(type="connected")
    for n in range(2):
        assert (await a.publish("q2", {"type": "task_started", "task_id": f"a{n}"})).code == 202  # not PUBLISHed
    assert await seqs_of(on_a, 2) == [1, 2]
    on_b = await b.client(session_id="q2", last_seq=0)
    await on_b.expect(type="connected")
    assert await seqs_of(on_b, 2) == [1, 2]  # from the stream, read after B marked itself
    assert (await a.publish("q2", {"type": "task_started", "task_id": "after"})).code == 202
    assert await seqs_of(on_b, 1) == [3]  # PUBLISHed now: B hears q2
    assert await seqs_of(on_a, 1) == [3]


async def test_an_unpublished_reply_that_overtakes_another_nodes_publish_fills_the_hole_from_the_stream(
    nodes, monkeypatch
):
    a, b = nodes
    follower = await a.client(session_id="q3")
    await follower.expect(type="connected")
    holes_read = stream_reads(a, monkeypatch)
    copies = HeldCopies(a)
    assert (await b.publish("q3", {"type": "task_started", "task_id": "from-b"})).code == 202  # seq 1, held on A
    assert (await a.publish("q3", {"type": "task_started", "task_id": "from-a"})).code == 202  # seq 2, unpublished
    first, second = await follower.expect(type="task_started"), await follower.expect(type="task_started")
    assert [(first["seq"], first["task_id"]), (second["seq"], second["task_id"])] == [(1, "from-b"), (2, "from-a")]
    assert len(holes_read) == 1  # no copy of seq 2 will come: the hole before it was read back
    await copies.until(1)
    assert copies.release() == 1  # seq 1's late copy: sent already, not again
    assert (await a.publish("q3", {"type": "task_started", "task_id": "last"})).code == 202
    assert await seqs_of(follower, 1) == [3]


async def test_a_node_whose_mark_lapsed_reads_what_was_not_published_to_it(nodes, redis_server):
    a, b = nodes
    on_b = await b.client(session_id="q5")
    await on_b.expect(type="connected")
    # B's mark as if B had not restamped it for longer than 3 x backend_check_interval (an overloaded node)
    redis_server.command("HSET", "ab:{q5}:listeners", "node-b", "1")
    assert (await a.publish("q5", {"type": "task_started", "task_id": "while-stale"})).code == 202  # not PUBLISHed
    # B's next check marks it again, sees the mark had lapsed, and reads the stream: nothing else would bring seq 1
    assert await seqs_of(on_b, 1) == [1]


async def test_a_node_marks_itself_again_after_its_subscription_is_restored(io_loop, dispatcher, redis_server):
    # A long check interval: only the restore can mark B again within the test.
    a = await start_node(redis_server.url, "node-a", backend_check_interval=30.0)
    b = await start_node(redis_server.url, "node-b", backend_check_interval=30.0)
    try:
        on_b = await b.client(session_id="q4")
        await on_b.expect(type="connected")
        assert b.broker.cluster is not None
        subscriber = b.broker.cluster.subscriber
        key = "ab:{q4}:listeners"

        def marked() -> bool:
            return redis_server.command("HEXISTS", key, "node-b").startswith(b":1")  # the raw reply

        assert marked()
        redis_server.command("DEL", key)  # what a Redis restarted without persistence has lost
        redis_server.command("CLIENT", "KILL", "TYPE", "pubsub")

        async def marked_and_healthy() -> bool:
            await b.fetch("/healthz")  # an HTTP round trip: the node's loop runs between tries
            return subscriber.reconnects >= 1 and subscriber.healthy and marked()

        await wait_until(marked_and_healthy, timeout=10, what="node B's mark, written again after the restore")
        assert (await a.publish("q4", {"type": "task_started", "task_id": "after"})).code == 202
        assert await seqs_of(on_b, 1) == [1]
    finally:
        for node in (a, b):
            await stop_node(node)


class HeldRecords:
    """A node's connection records held back (a slow writer): Redis does not know its followers yet."""

    def __init__(self, node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
        assert node.broker.cluster is not None
        store = node.broker.cluster.store
        self.released = asyncio.Event()
        write = store.write_connections

        async def held(*args: Any, **kwargs: Any) -> Any:
            await self.released.wait()
            return await write(*args, **kwargs)

        monkeypatch.setattr(store, "write_connections", held)


async def first_seq_of(client: WebSocketClient) -> int:
    return (await seqs_of(client, 1))[0]


async def test_a_publish_on_the_node_of_a_follower_taking_everything_counts_as_sent_before_its_record_is_in_redis(
    nodes, monkeypatch
):
    a, b = nodes
    records = HeldRecords(a, monkeypatch)
    follower = await a.client(session_id="m1")  # /ws: every type, replay=missed
    await follower.expect(type="connected")
    assert (await a.publish("m1", {"type": "session_started"})).code == 202
    assert await seqs_of(follower, 1) == [1]
    records.released.set()
    newcomer = await b.client(session_id="m1")  # replay=missed: what no connection anywhere was sent
    await newcomer.expect(type="connected")
    assert (await b.publish("m1", {"type": "task_started", "task_id": "t"})).code == 202
    assert await first_seq_of(newcomer) == 2  # seq 1 reached the follower on A: not missed


async def test_a_follower_that_narrows_its_filter_no_longer_counts_as_taking_everything(nodes):
    a, b = nodes
    follower = await a.client(session_id="m2")
    await follower.expect(type="connected")
    await follower.send({"type": "unsubscribe", "events": ["session_started"]})
    assert (await follower.expect(type="subscribed"))["events"] == ["*", "-session_started"]
    assert (await a.publish("m2", {"type": "session_started"})).code == 202  # seq 1: the follower refuses it
    assert (await a.publish("m2", {"type": "task_started", "task_id": "t"})).code == 202
    assert await seqs_of(follower, 1) == [2]
    newcomer = await b.client(session_id="m2")
    await newcomer.expect(type="connected")
    assert await first_seq_of(newcomer) == 1  # nobody was sent it: missed


async def test_a_client_reconnecting_to_the_other_node_gets_exactly_what_it_missed(nodes):
    a, b = nodes
    first = await a.client(session_id="c2")
    hello = await first.expect(type="connected")
    await a.publish("c2", *({"type": "chunk", "content": str(n), "chunk_number": n + 1} for n in range(3)))
    assert await seqs_of(first, 3) == [1, 2, 3]
    first.close()
    await b.publish("c2", *({"type": "chunk", "content": str(n), "chunk_number": n + 1} for n in range(4)))
    again = await b.client(session_id="c2", last_seq=3, epoch=hello["epoch"])
    greeting = await again.expect(type="connected")
    assert greeting["epoch"] == hello["epoch"] and greeting["last_seq"] == 7
    assert await seqs_of(again, 4) == [4, 5, 6, 7]


async def test_a_retried_event_id_is_one_event_whichever_node_takes_it(nodes):
    a, b = nodes
    watcher = await b.client(session_id="c3")
    await watcher.expect(type="connected")
    event = {"type": "task_started", "task_id": "t1", "event_id": "ev-retry-1"}
    first, second = await a.publish("c3", event), await b.publish("c3", event)
    assert orjson.loads(first.body)["seq"] == orjson.loads(second.body)["seq"] == [1]
    await b.publish("c3", {"type": "task_completed", "task_id": "t1"})
    assert await seqs_of(watcher, 2) == [1, 2]  # the retry was not delivered again


async def test_restarting_a_node_keeps_the_epoch_and_the_history(dispatcher, redis_server):
    a = await start_node(redis_server.url, "node-a")
    await a.publish("c4", {"type": "session_started"}, {"type": "task_started", "task_id": "t1"})
    info = orjson.loads((await a.fetch("/api/sessions/c4")).body)
    await stop_node(a)
    again = await start_node(redis_server.url, "node-a2")
    try:
        client = await again.client(path="/ws/research/c4")
        hello = await client.expect(type="connection_established")
        assert (hello["epoch"], hello["last_seq"]) == (info["epoch"], 2)
        assert await seqs_of(client, 2) == [1, 2]
    finally:
        await stop_node(again)


async def test_session_rules_hold_across_nodes(nodes):
    a, b = nodes
    json = {"Content-Type": "application/json"}
    start = orjson.dumps({"query": "q", "session_id": "c5"})
    assert (await a.fetch("/api/research/start", method="POST", headers=json, body=start)).code == 201
    assert (await b.fetch("/api/research/start", method="POST", headers=json, body=start)).code == 409
    on_b = await b.client(session_id="c6")
    await on_b.expect(type="connected")
    broadcast = await a.fetch("/api/broadcast", method="POST", headers=json, body=orjson.dumps({"message": "hi"}))
    assert orjson.loads(broadcast.body) == {"delivered": 0, "nodes": 2}
    await on_b.expect(type="system_notification", message="hi")
    session = orjson.loads((await a.fetch("/api/sessions/c6")).body)
    assert [(c["node_id"], c["user_id"]) for c in session["connections"]] == [("node-b", None)]
    deleted = await a.fetch("/api/sessions/c6", method="DELETE")
    assert deleted.code == 200
    await on_b.expect(type="session_closed")
    assert (await on_b.closed())[0] == 1000


async def test_with_redis_stopped_publishes_and_handshakes_are_503_and_clients_catch_up_after(nodes, redis_server):
    a, b = nodes
    watcher = await b.client(session_id="c7")
    await watcher.expect(type="connected")
    await a.publish("c7", {"type": "task_started", "task_id": "t1"})
    assert await seqs_of(watcher, 1) == [1]
    redis_server.stop()
    refused = await a.publish("c7", {"type": "task_started", "task_id": "t2"})
    assert refused.code == 503 and orjson.loads(refused.body) == {"error": "backend unavailable"}
    deadline = time.monotonic() + 10
    while (await a.fetch("/readyz")).code != 503:
        assert time.monotonic() < deadline, "readyz stayed 200 without Redis"
        await asyncio.sleep(0.05)  # noqa: sleep - polling an HTTP answer with a deadline
    redis_server.start()
    while (await a.fetch("/readyz")).code != 200 or (await b.fetch("/readyz")).code != 200:
        assert time.monotonic() < deadline + 20, "the nodes did not come back"
        await asyncio.sleep(0.05)  # noqa: sleep - polling an HTTP answer with a deadline
    # Without persistence Redis came back empty: the session starts afresh (a new epoch);
    # the open connection is still open and hears what is published now.
    assert (await a.publish("c7", {"type": "task_started", "task_id": "t3"})).code == 202
    message = await watcher.receive()
    while message.get("type") == "keepalive":
        message = await watcher.receive()
    assert message["type"] in {"task_started", "session_closed", "gap"}


async def test_a_daemon_starts_while_redis_is_down_and_is_ready_once_it_answers(spawn, tmp_path):  # noqa: F811 - the fixture imported above
    """Two real daemon processes on one Redis that comes up after them (docs/protocol.md section 7, start-up)."""
    redis = RedisServer(tmp_path)  # its port is chosen; nothing listens there yet
    env = {"BROKER_BACKEND": "redis", "BROKER_REDIS_URL": redis.url, "BROKER_BACKEND_CHECK_INTERVAL": "0.3"}
    first = await spawn(BROKER_NODE_ID="p1", **env).started()
    second = await spawn(BROKER_NODE_ID="p2", **env).started()
    try:
        assert (await first.fetch("/healthz")).code == 200
        assert (await first.fetch("/readyz")).code == 503
        redis.start()
        deadline = time.monotonic() + 15
        for daemon in (first, second):
            while (await daemon.fetch("/readyz")).code != 200:
                assert time.monotonic() < deadline, daemon.output()
                await asyncio.sleep(0.05)  # noqa: sleep - polling another process with a deadline
        watcher = await second.client("p-1")
        await watcher.expect(type="connected")
        assert (await first.publish("p-1", {"type": "task_started", "task_id": "t1"})).code == 202
        assert (await watcher.expect(type="task_started"))["seq"] == 1
        stats = orjson.loads((await first.fetch("/api/websocket/stats")).body)
        assert stats["node_id"] == "p1"
        await terminate(first)
        await terminate(second)
    finally:
        redis.stop()


async def test_a_node_keeps_nothing_of_a_session_once_its_last_follower_left(nodes):
    """The node's own per-session notes (the connections taking every type, what the mirror sent from a
    publish's reply) go with the mirror: under churn they would otherwise grow with every session and connection."""
    a, b = nodes
    cluster = a.broker.cluster
    assert cluster is not None
    client = await followed_on_both(a, b, "kept")  # B hears it: A's publish is PUBLISHed, its copy noted
    await a.publish("kept", {"type": "task_started", "task_id": "t"})
    await client.expect(type="task_started")
    assert "kept" in cluster._taking_all and "kept" in cluster._sent_from_reply
    client.close()
    await wait_until(lambda: _nothing_kept(a, "kept"), what="the mirror ended and its notes went")
    assert "kept" not in cluster._taking_all and "kept" not in cluster._sent_from_reply


async def _nothing_kept(node: Node, session_id: str) -> bool:
    cluster = node.broker.cluster
    assert cluster is not None
    await node.fetch("/healthz")  # an HTTP round trip: the node's loop runs between tries
    return node.broker.directory.get(session_id) is None and session_id not in cluster._taking_all


async def test_a_session_mirror_is_freed_when_its_last_follower_leaves_without_a_collection(nodes):
    # A node on Redis ends a session's mirror whenever the last follower on it leaves. A
    # mirror in a reference cycle waits for a full collection, and the daemon's GC set-up
    # (broker/gc_tuning.py) freezes long-lived objects out of those until the next thaw:
    # under churn that was ~400 bytes held per connection. Freed by reference counting, it
    # goes the moment it stops.
    a, _ = nodes
    client = await a.client(session_id="freed")
    await client.expect(type="connected")
    await a.publish("freed", {"type": "task_started", "task_id": "t"})
    await client.expect(type="task_started")
    ref = a.broker.directory.get("freed")
    assert ref is not None
    watch = weakref.ref(ref._actor_weakref())
    del ref
    gc.disable()
    try:
        client.close()
        for _ in range(100_000):  # loop turns, not time: until the mirror has stopped and gone
            if watch() is None:
                break
            await asyncio.sleep(0)  # noqa: sleep - yields one loop turn
        assert watch() is None, "the stopped mirror is still alive: something holds it in a cycle"
    finally:
        gc.enable()
