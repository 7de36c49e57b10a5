"""The node's pub/sub Subscriber against a real redis-server: confirmed subscriptions, losing them, the canary.

Each fault is made for real: `CLIENT KILL TYPE pubsub`, Redis killed and
started again on its port, Redis stopped with SIGSTOP, Redis dropping the
subscriber for its output-buffer limit (python-socketio#1581), and a
half-open connection (a proxy that stops forwarding what Redis sends while
the TCP connection stays up: Redis believes it delivered, the node hears
nothing). What is asserted is what the node relies on: a PUBLISH made after
subscribe() returned is received, every session is subscribed again after
any loss (PUBSUB NUMSUB), on_restored tells the node to catch up, `healthy`
reports a deaf connection, and the log says so once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator

import pytest
import structlog
from redis.asyncio import Redis

from broker.cluster.store import BackendUnavailable
from broker.cluster.subscriber import Subscriber
from tests.support.redis import RedisServer

#: check_interval of the canary tests (seconds); the others use 1 s, so that a canary slowed down
#: by a busy machine does not count as deafness where a test counts reconnects
CHECK = 0.2


class Recorder:
    """The node's side: what the Subscriber's callbacks were called with."""

    def __init__(self) -> None:
        self.events: list[tuple[str, bytes]] = []
        self.broadcasts: list[bytes] = []
        self.restored = 0
        self.explode_on: bytes | None = None

    def on_events(self, session_id: str, payload: bytes) -> None:
        if payload == self.explode_on:
            raise RuntimeError("the node's bug")
        self.events.append((session_id, payload))

    def on_broadcast(self, payload: bytes) -> None:
        if payload == self.explode_on:
            raise RuntimeError("the node's bug")
        self.broadcasts.append(payload)

    def on_restored(self) -> None:
        self.restored += 1


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> float:
    """Poll `condition` until it holds; fail with `what` after `timeout`. Returns the seconds it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not condition():
        if loop.time() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.01)  # noqa: sleep - bounded poll of a condition
    return loop.time() - started


def channel(session_id: str) -> str:
    return f"ab:{{{session_id}}}:events"


class Nodes:
    """Subscribers made by a test (each with its Recorder); all stopped at teardown."""

    def __init__(self, redis_server: RedisServer) -> None:
        self.redis_server = redis_server
        self.made: list[Subscriber] = []

    def __call__(
        self, node_id: str = "n1", *, url: str | None = None, check_interval: float = 1.0, timeout: float = 0.5
    ) -> tuple[Subscriber, Recorder]:
        recorder = Recorder()
        subscriber = Subscriber(
            url or self.redis_server.url,
            node_id,
            on_events=recorder.on_events,
            on_broadcast=recorder.on_broadcast,
            on_restored=recorder.on_restored,
            check_interval=check_interval,
            timeout=timeout,
        )
        self.made.append(subscriber)
        return subscriber, recorder


@pytest.fixture
def nodes(io_loop, redis_server) -> Iterator[Nodes]:
    made = Nodes(redis_server)
    yield made
    for subscriber in made.made:
        io_loop.run_sync(subscriber.stop)


@pytest.fixture
def redis(io_loop, redis_server) -> Iterator[Redis]:
    """The test's own client: publishes and asks Redis what it sees (never the Subscriber's)."""
    client = Redis.from_url(redis_server.url)
    yield client
    io_loop.run_sync(client.aclose)


async def numsub(redis: Redis, *session_ids: str) -> dict[str, int]:
    """How many subscribers Redis itself counts on each session's channel."""
    counts = await redis.pubsub_numsub(*(channel(sid) for sid in session_ids))
    return {name.decode().split("{")[1].split("}")[0]: count for name, count in counts}


async def healthy_soon(subscriber: Subscriber, timeout: float = 10.0) -> None:
    await until(lambda: subscriber.healthy, "the subscriber is healthy", timeout)


async def delivered(redis: Redis, recorder: Recorder, session_id: str, payload: bytes) -> None:
    """Publish on a session's channel as another node would, and see it reach on_events."""
    await redis.publish(channel(session_id), payload)
    await until(lambda: (session_id, payload) in recorder.events, f"{payload!r} reaches {session_id}")


# -- subscribing ---------------------------------------------------------------------


async def test_a_publish_right_after_subscribe_returns_is_received(io_loop, nodes, redis):
    subscriber, recorder = nodes()
    await subscriber.start()
    expected = []
    for i in range(100):
        session_id = f"s{i}"
        await subscriber.subscribe(session_id)
        receivers = await redis.publish(channel(session_id), b"first %d" % i)
        assert receivers == 1, f"Redis had no subscriber on {session_id} when subscribe() returned"
        expected.append((session_id, b"first %d" % i))
    await until(lambda: len(recorder.events) == len(expected), "every first message arrives")
    assert recorder.events == expected
    assert subscriber.sessions == {f"s{i}" for i in range(100)}


async def test_subscribe_waits_for_the_confirmation_over_a_slow_network(io_loop, nodes, redis, redis_server):
    """The node's commands take 20 ms to reach Redis: a subscribe() that only sent SUBSCRIBE would return too early."""
    proxy = MutingProxy(redis_server.port, upstream_delay=0.02)
    await proxy.start()
    try:
        subscriber, recorder = nodes(url=f"redis://127.0.0.1:{proxy.port}/0")
        await subscriber.start()
        for i in range(15):
            await subscriber.subscribe(f"slow{i}")
            receivers = await redis.publish(channel(f"slow{i}"), b"right after")
            assert receivers == 1, f"subscribe() returned before Redis subscribed slow{i}"
        await until(lambda: len(recorder.events) == 15, "every message arrives")
    finally:
        await proxy.close()


async def test_messages_reach_their_session_byte_for_byte_and_broadcasts_their_callback(io_loop, nodes, redis):
    subscriber, recorder = nodes()
    await subscriber.start()
    await subscriber.subscribe("alpha")
    await subscriber.subscribe("beta")
    payloads = [
        b'E e-0123456789abcdef\n1\ttask_started\t\t{"type":"task_started","seq":1}',
        b"\x00\xff\r\n\t binary \xc3\x28",
        b"x" * 100_000,
    ]
    for payload in payloads:
        await redis.publish(channel("alpha"), payload)
    await redis.publish(channel("beta"), b"for beta")
    await redis.publish("ab:broadcast", b'{"type":"notice"}')
    await redis.publish(channel("gamma"), b"nobody here asked for gamma")
    await until(lambda: len(recorder.events) == 4 and recorder.broadcasts, "all messages arrive")
    assert recorder.events == [*(("alpha", p) for p in payloads), ("beta", b"for beta")]
    assert recorder.broadcasts == [b'{"type":"notice"}']
    assert subscriber.messages_received == 5


async def test_unsubscribe_stops_delivery_once_it_returns(io_loop, nodes, redis):
    subscriber, recorder = nodes()
    await subscriber.start()
    await subscriber.subscribe("gone")
    await subscriber.subscribe("stays")
    await delivered(redis, recorder, "gone", b"before")
    await subscriber.unsubscribe("gone")
    assert await redis.publish(channel("gone"), b"after") == 0, "Redis still delivers to the node"
    await delivered(redis, recorder, "stays", b"still here")
    assert ("gone", b"after") not in recorder.events
    assert subscriber.sessions == {"stays"}
    await subscriber.unsubscribe("never subscribed")  # nothing to do, no error
    assert await numsub(redis, "gone", "stays") == {"gone": 0, "stays": 1}


async def test_subscribe_and_unsubscribe_of_one_session_in_quick_turns_end_as_last_asked(io_loop, nodes, redis):
    subscriber, recorder = nodes()
    await subscriber.start()
    for _ in range(20):
        await asyncio.gather(subscriber.unsubscribe("flip"), subscriber.subscribe("flip"))
        assert await redis.publish(channel("flip"), b"on") == 1
        await subscriber.unsubscribe("flip")
        assert await redis.publish(channel("flip"), b"off") == 0
    await subscriber.subscribe("flip")
    await delivered(redis, recorder, "flip", b"last")


# -- losing the connection -------------------------------------------------------------


async def test_client_kill_pubsub_resubscribes_every_session_and_calls_on_restored(io_loop, nodes, redis, redis_server):
    subscriber, recorder = nodes()
    await subscriber.start()
    sessions = [f"k{i}" for i in range(10)]
    for session_id in sessions:
        await subscriber.subscribe(session_id)
    await healthy_soon(subscriber)

    redis_server.command("CLIENT", "KILL", "TYPE", "pubsub")
    await until(lambda: recorder.restored == 1, "on_restored after the kill")
    assert subscriber.reconnects == 1
    assert await numsub(redis, *sessions) == dict.fromkeys(sessions, 1)
    for session_id in sessions:
        await delivered(redis, recorder, session_id, b"after the kill")
    await healthy_soon(subscriber)


async def test_redis_killed_and_started_again_resubscribes_and_calls_on_restored(io_loop, nodes, redis, redis_server):
    subscriber, recorder = nodes()
    await subscriber.start()
    await subscriber.subscribe("r1")
    await subscriber.subscribe("r2")
    await healthy_soon(subscriber)

    redis_server.stop()
    await until(lambda: not subscriber.healthy, "unhealthy while Redis is down")
    redis_server.start()
    await until(lambda: recorder.restored == 1, "on_restored once Redis is back")
    assert await numsub(redis, "r1", "r2") == {"r1": 1, "r2": 1}
    await delivered(redis, recorder, "r1", b"back")
    await delivered(redis, recorder, "r2", b"back")
    await healthy_soon(subscriber)


async def test_a_session_subscribed_while_the_connection_is_down_is_confirmed_once_it_is_back(
    io_loop, nodes, redis, redis_server
):
    subscriber, recorder = nodes(timeout=3.0)
    await subscriber.start()
    redis_server.stop()
    await until(lambda: not subscriber.healthy, "unhealthy while Redis is down")
    waiting = asyncio.ensure_future(subscriber.subscribe("late"))
    await asyncio.sleep(CHECK)  # noqa: sleep - the outage lasts a while (not a synchronisation)
    assert not waiting.done()
    redis_server.start()
    await waiting
    assert await redis.publish(channel("late"), b"hello") == 1
    await until(lambda: ("late", b"hello") in recorder.events, "the late session's message arrives")


async def test_subscribe_gives_up_after_its_timeout_and_leaves_nothing_subscribed(io_loop, nodes, redis, redis_server):
    subscriber, _ = nodes(timeout=0.3)
    await subscriber.start()
    redis_server.stop()
    with pytest.raises(BackendUnavailable, match="did not confirm"):
        await subscriber.subscribe("abandoned")
    assert subscriber.sessions == frozenset()
    redis_server.start()
    await healthy_soon(subscriber)
    assert await numsub(redis, "abandoned") == {"abandoned": 0}


# -- deaf connections: the canary ----------------------------------------------------------


async def test_a_sigstopped_redis_is_reported_within_two_intervals_logged_once_and_repaired(
    io_loop, nodes, redis, redis_server
):
    with structlog.testing.capture_logs() as logs:
        subscriber, recorder = nodes(check_interval=CHECK)
        await subscriber.start()
        await subscriber.subscribe("p1")
        await healthy_soon(subscriber)

        before = len(logs)
        redis_server.pause()
        try:
            # noticed within 2 x check_interval (plus slack for a loaded machine)
            await until(lambda: not subscriber.healthy, "unhealthy while Redis hangs", timeout=2 * CHECK + 0.6)
            await asyncio.sleep(4 * CHECK)  # noqa: sleep - Redis stays stopped for a few intervals (the fault itself)
            assert not subscriber.healthy
        finally:
            redis_server.resume()
        await healthy_soon(subscriber)
    deaf = [entry for entry in logs[before:] if entry["event"] == "backend_deaf"]
    assert len(deaf) == 1, deaf
    assert deaf[0]["log_level"] == "warning"
    assert deaf[0]["node_id"] == "n1"
    assert subscriber.canary_failures >= 1
    await until(lambda: recorder.restored >= 1, "on_restored after the hang")
    await delivered(redis, recorder, "p1", b"after the hang")
    assert any(entry["event"] == "backend_deaf_repaired" for entry in logs)


async def test_a_half_open_pubsub_connection_is_caught_by_the_canary_and_repaired(io_loop, nodes, redis, redis_server):
    proxy = MutingProxy(redis_server.port)
    await proxy.start()
    try:
        with structlog.testing.capture_logs() as logs:
            subscriber, recorder = nodes(url=f"redis://127.0.0.1:{proxy.port}/0", check_interval=CHECK)
            await subscriber.start()
            await subscriber.subscribe("h1")
            await healthy_soon(subscriber)

            before = len(logs)
            assert proxy.mute_subscribers() == 1
            # Redis believes it delivered this one; the node never hears it: a deaf node.
            assert await redis.publish(channel("h1"), b"lost to the deaf connection") == 1
            await until(lambda: not subscriber.healthy, "unhealthy once deaf", timeout=2 * CHECK + 0.6)
            await until(lambda: recorder.restored == 1, "on_restored after the repair")
            await healthy_soon(subscriber)
        assert [entry["event"] for entry in logs[before:]].count("backend_deaf") == 1
        assert ("h1", b"lost to the deaf connection") not in recorder.events  # the node reads it from the stream
        await delivered(redis, recorder, "h1", b"heard again")
        # the subscriber closed the deaf connection: Redis is left with the new one alone
        assert await numsub_settles(redis, "h1", 1)
    finally:
        await proxy.close()


async def test_redis_dropping_the_subscriber_for_its_output_buffer_is_logged_and_repaired(
    io_loop, nodes, redis, redis_server
):
    """python-socketio#1581: Redis dropped its subscribers (output-buffer limit); one worker stayed deaf, silently."""
    default = redis_server.command("CONFIG", "GET", "client-output-buffer-limit")
    assert b"pubsub" in default
    with structlog.testing.capture_logs() as logs:
        subscriber, recorder = nodes()
        await subscriber.start()
        await subscriber.subscribe("big")
        await subscriber.subscribe("small")
        await healthy_soon(subscriber)

        assert redis_server.command("CONFIG", "SET", "client-output-buffer-limit", "pubsub 1024 1024 0") == b"+OK\r\n"
        try:
            await redis.publish(channel("big"), b"x" * 2_000_000)
        finally:
            redis_server.command("CONFIG", "SET", "client-output-buffer-limit", "pubsub 32mb 8mb 60")
        await until(lambda: recorder.restored == 1, "on_restored after Redis dropped the subscriber")
        await healthy_soon(subscriber)
    assert any(entry["event"] == "pubsub_lost" and entry["log_level"] == "warning" for entry in logs)
    assert "output buffer limits" in (redis_server.directory / "redis.log").read_text(), "Redis did not drop it"
    assert await numsub(redis, "big", "small") == {"big": 1, "small": 1}
    await delivered(redis, recorder, "big", b"normal size again")
    await delivered(redis, recorder, "small", b"still subscribed")


# -- the node's bugs, and stopping ------------------------------------------------------------


async def test_an_exception_in_a_callback_is_logged_and_delivery_goes_on(io_loop, nodes, redis):
    with structlog.testing.capture_logs() as logs:
        subscriber, recorder = nodes()
        recorder.explode_on = b"boom"
        await subscriber.start()
        await subscriber.subscribe("c1")
        await redis.publish(channel("c1"), b"boom")
        await redis.publish("ab:broadcast", b"boom")
        await delivered(redis, recorder, "c1", b"next")
    failures = [entry for entry in logs if entry["event"] == "subscriber_callback_failed"]
    assert [entry["callback"] for entry in failures] == ["on_events", "on_broadcast"]
    assert subscriber.healthy


async def test_start_fails_while_redis_is_down_and_succeeds_when_called_again(io_loop, nodes, redis_server):
    redis_server.stop()
    subscriber, _ = nodes(timeout=0.3)
    with pytest.raises(BackendUnavailable):
        await subscriber.start()
    assert not subscriber.healthy
    assert not [task for task in asyncio.all_tasks() if task.get_name().startswith("subscriber-")]
    redis_server.start()
    await subscriber.start()
    await healthy_soon(subscriber)


async def test_stop_ends_its_tasks_and_closes_its_connections(io_loop, nodes, redis, redis_server):
    subscriber, _ = nodes("stopper")
    await subscriber.start()
    await subscriber.subscribe("s1")
    await healthy_soon(subscriber)
    assert b"actor-broker:pubsub:stopper" in redis_server.command("CLIENT", "LIST")
    assert b"actor-broker:canary:stopper" in redis_server.command("CLIENT", "LIST")

    await subscriber.stop()
    assert not [task for task in asyncio.all_tasks() if task.get_name().startswith("subscriber-")]
    assert not subscriber.healthy
    await until(lambda: b"stopper" not in redis_server.command("CLIENT", "LIST"), "its connections are closed")
    assert await numsub(redis, "s1") == {"s1": 0}
    with pytest.raises(BackendUnavailable):
        await subscriber.subscribe("s2")


async def test_stop_fails_a_subscribe_still_waiting_for_its_confirmation(io_loop, nodes, redis_server):
    subscriber, _ = nodes(timeout=30.0)
    await subscriber.start()
    redis_server.stop()
    waiting = asyncio.ensure_future(subscriber.subscribe("s2"))
    await until(lambda: "s2" in subscriber.sessions, "the subscribe is waiting")
    await subscriber.stop()
    with pytest.raises(BackendUnavailable, match="stopped"):
        await asyncio.wait_for(waiting, 5)


async def test_stop_while_start_waits_on_a_hung_redis_ends_the_start(io_loop, nodes, redis_server):
    subscriber, _ = nodes(timeout=30.0)
    redis_server.pause()
    try:
        starting = asyncio.ensure_future(subscriber.start())
        await until(lambda: any(t.get_name().startswith("subscriber-") for t in asyncio.all_tasks()), "start began")
        await subscriber.stop()
        with pytest.raises(BackendUnavailable):
            await asyncio.wait_for(starting, 5)
    finally:
        redis_server.resume()
    assert not [task for task in asyncio.all_tasks() if task.get_name().startswith("subscriber-")]


async def numsub_settles(redis: Redis, session_id: str, count: int) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while (await numsub(redis, session_id))[session_id] != count:
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.01)  # noqa: sleep - bounded poll of a condition
    return True


# -- a half-open connection, made for real ----------------------------------------------------


class MutingProxy:
    """A TCP proxy in front of Redis that can stop forwarding what Redis sends to its subscribers.

    A muted connection stays open both ways, and what the client sends still
    reaches Redis: exactly a half-open connection, or a subscription that
    died without a word. Runs on the test's own loop.
    """

    def __init__(self, target_port: int, *, upstream_delay: float = 0.0) -> None:
        self.target_port = target_port
        #: seconds each chunk the client sends waits before it is forwarded (a slow network, in order)
        self.upstream_delay = upstream_delay
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: list[_Link] = []
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def mute_subscribers(self) -> int:
        """Stop forwarding Redis's bytes on every live connection that sent a SUBSCRIBE; how many."""
        links = [link for link in self._links if link.subscriber and not link.closed]
        for link in links:
            link.muted = True
        return len(links)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for link in self._links:
            link.close()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                client_writer.transport.abort()
                return
            link = _Link(client_writer, upstream_writer, self.upstream_delay)
            self._links.append(link)
            await asyncio.gather(
                link.pump(client_reader, upstream_writer, upstream=True),
                link.pump(upstream_reader, client_writer, upstream=False),
                return_exceptions=True,
            )
            link.close()
        finally:
            self._handlers.discard(task)


class _Link:
    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter, upstream_delay: float) -> None:
        self.client = client
        self.upstream_delay = upstream_delay
        self.upstream = upstream
        self.subscriber = False
        self.muted = False
        self.closed = False

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool) -> None:
        while not self.closed:
            data = await reader.read(65536)
            if not data:
                break
            if upstream and b"SUBSCRIBE" in data.upper():
                self.subscriber = True
            if not upstream and self.muted:
                continue  # swallowed: Redis thinks it was delivered
            if upstream and self.upstream_delay:
                await asyncio.sleep(self.upstream_delay)  # noqa: sleep - the latency the proxy simulates
            writer.write(data)
            await writer.drain()
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for writer in (self.client, self.upstream):
                with contextlib.suppress(Exception):
                    writer.transport.abort()
