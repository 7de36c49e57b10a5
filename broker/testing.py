"""Test harness for actors: deterministic dispatch, a manual clock, probes.

Anything written for actor-broker's runtime (`actors.runtime.LoopActor`)
runs unchanged under this harness, but messages are handled only when the
test says so and time moves only when the test moves it. No sleeps, no
flakes::

    from broker.testing import ActorHarness

    def test_greeter():
        with ActorHarness() as h:
            probe = h.probe()
            greeter = Greeter.start(reply_to=probe.ref)
            greeter.tell({"type": "hello"})
            h.run_until_idle()
            probe.expect(type="greeting", text="hello")
            h.advance(30)            # fires every timer due in the next 30 s
            probe.expect(type="reminder")
            probe.expect_nothing()

`ask` works too: a blocking `get()` on a reply runs the dispatcher until
the reply is there (under the IOLoop runtime the same call would deadlock
and raises instead; await it there).

The order is reproducible: actors run in the order they became ready, each
for at most `batch` messages per turn, exactly as the IOLoop dispatcher
does.
"""

from __future__ import annotations

import asyncio
import pprint
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pykka import ActorRef

from actors.clock import ManualClock
from actors.runtime import DEFAULT_BATCH, Dispatcher, LoopActor, LoopFuture, install_dispatcher

if TYPE_CHECKING:
    from tornado.websocket import WebSocketClientConnection

__all__ = [
    "ActorHarness",
    "ManualClock",
    "ManualDispatcher",
    "Probe",
    "RecordingTransport",
    "WebSocketClient",
    "matches",
]


class ManualDispatcher(Dispatcher):
    """A dispatcher that runs actors only inside `run_until_idle()`.

    Messages told from other threads are collected and handed to their
    actors, in arrival order, at the start of the next run.
    """

    clock: ManualClock  # the harness advances it

    def __init__(self, clock: ManualClock | None = None, *, batch: int = DEFAULT_BATCH) -> None:
        super().__init__(batch=batch)
        self.clock = clock or ManualClock()
        self.clock.after_fire = self.run_until_idle
        self._foreign: deque[Callable[[], None]] = deque()
        self._foreign_lock = threading.Lock()

    def _request_run(self) -> None:
        """Nothing: the test decides when actors run."""

    def submit_from_thread(self, callback: Callable[[], None]) -> None:
        with self._foreign_lock:
            self._foreign.append(callback)

    def _take_foreign(self) -> bool:
        with self._foreign_lock:
            callbacks = list(self._foreign)
            self._foreign.clear()
        for callback in callbacks:
            callback()
        return bool(callbacks)

    def run_until_idle(self, max_turns: int = 10_000_000) -> int:
        """Run actors until no message is left anywhere; return turns taken.

        Raises `RuntimeError` if actors keep each other busy for more than
        `max_turns` turns (a message loop that never settles).
        """
        total = 0
        while True:
            self._take_foreign()
            if self.idle:
                return total
            total += self.run_ready(max_turns=self.ready_count())
            if total > max_turns:
                msg = f"actors did not settle within {max_turns} turns"
                raise RuntimeError(msg)

    def wait_for(self, future: LoopFuture, timeout: float | None) -> None:
        """A blocking `get()` on the test thread runs the actors until they settle.

        The answer is there then, or never will be (the caller raises
        `pykka.Timeout`); from another thread it waits like any dispatcher.
        """
        if self.on_thread():
            self.run_until_idle()
        else:
            super().wait_for(future, timeout)


def matches(message: Any, expected: dict[str, Any]) -> bool:
    """True if `message` has every key/attribute in `expected` with that value.

    A value that is a class matches by isinstance; `type=` matches a dict's
    "type" key, or, for an object, its class (by class or by name).
    """
    for key, want in expected.items():
        if isinstance(message, dict):
            if key not in message:
                return False
            got = message[key]
        elif key == "type":
            if isinstance(want, type):
                if not isinstance(message, want):
                    return False
                continue
            got = type(message).__name__
        elif hasattr(message, key):
            got = getattr(message, key)
        else:
            return False
        if isinstance(want, type) and key != "type":
            if not isinstance(got, want):
                return False
        elif got != want:
            return False
    return True


class _Recorder(LoopActor):
    def __init__(self, record: list[Any]) -> None:
        super().__init__()
        self._record = record

    def on_receive(self, message: Any) -> None:
        self._record.append(message)


class Probe:
    """An actor that records every message it receives, with assertions.

    Pass `probe.ref` wherever an actor expects a ref to send to. Messages are
    consumed in order by `expect()`; `received` keeps them all.
    """

    def __init__(self, harness: ActorHarness, name: str = "probe") -> None:
        self._harness = harness
        self.name = name
        self.received: list[Any] = []
        self._next = 0
        self.ref: ActorRef[Any] = _Recorder.start(self.received)

    @property
    def pending(self) -> list[Any]:
        """Messages received and not yet consumed by `expect()`."""
        self._harness.run_until_idle()
        return self.received[self._next :]

    def expect(self, **fields: Any) -> Any:
        """Consume the next message and check it has `fields`; return it."""
        pending = self.pending
        if not pending:
            raise AssertionError(f"{self.name}: expected a message with {fields!r}, got nothing")
        message = pending[0]
        if not matches(message, fields):
            raise AssertionError(
                f"{self.name}: next message does not match\n"
                f"  expected fields: {fields!r}\n"
                f"  got:             {pprint.pformat(message)}\n"
                f"  still pending:   {len(pending) - 1} more"
            )
        self._next += 1
        return message

    def expect_nothing(self) -> None:
        """Fail if any message is waiting to be consumed."""
        pending = self.pending
        if pending:
            raise AssertionError(f"{self.name}: expected nothing, got {pprint.pformat(pending)}")


class ActorHarness:
    """Installs a `ManualDispatcher` for the duration of a `with` block.

    On exit every actor started on it is stopped, and the previously installed
    dispatcher is restored.
    """

    def __init__(self, *, batch: int = DEFAULT_BATCH, clock: ManualClock | None = None) -> None:
        self.dispatcher = ManualDispatcher(clock, batch=batch)
        self.clock = self.dispatcher.clock
        self._previous: Dispatcher | None = None

    def __enter__(self) -> ActorHarness:
        self._previous = install_dispatcher(self.dispatcher)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop_all()
        finally:
            install_dispatcher(self._previous)

    def run_until_idle(self) -> int:
        return self.dispatcher.run_until_idle()

    def advance(self, seconds: float) -> None:
        """Handle pending messages, then move the clock, firing due timers."""
        self.run_until_idle()
        self.clock.advance(seconds)
        self.run_until_idle()

    def probe(self, name: str = "probe") -> Probe:
        return Probe(self, name)

    def actors(self) -> list[ActorRef[Any]]:
        """Running actors that live on this harness's dispatcher."""
        return self.dispatcher.actors()

    def stop_all(self) -> None:
        for ref in reversed(self.actors()):
            if ref.is_alive():
                ref.stop(block=False)
        self.run_until_idle()


class RecordingTransport:
    """A fake socket for connection actors: records writes, flushes on demand.

    `auto_flush=True` (default) acknowledges every write at once, like a
    client that keeps up. With `auto_flush=False` writes stay in flight until
    `flush()`, like a client that stopped reading. `fail_writes=True` makes
    the next write raise, like a socket that closed under us.
    """

    kind = "recording"

    def __init__(self, *, auto_flush: bool = True) -> None:
        self.auto_flush = auto_flush
        self.fail_writes = False
        self.writes: list[list[bytes]] = []
        self.closed: tuple[int, str] | None = None
        #: set False to play a peer that went away without closing (no pongs)
        self.answers_pings = True
        self.pings = 0
        self._ponged = True
        self._pending: list[Callable[[], None]] = []

    def write(self, frames: list[Any], on_flushed: Callable[[], None]) -> bool:
        if self.fail_writes or self.closed is not None:
            raise ConnectionError("socket closed")
        self.writes.append([frame.data for frame in frames])
        if self.auto_flush:
            return True  # taken at once, as a socket with room in its buffer does
        self._pending.append(on_flushed)
        return False

    def probe(self) -> None:
        self.pings += 1
        self._ponged = self.answers_pings

    def probe_answered(self) -> bool:
        return self._ponged

    def flush(self) -> None:
        """The client read everything written so far."""
        pending, self._pending = self._pending, []
        for callback in pending:
            callback()

    def close(self, code: int, reason: str) -> None:
        if self.closed is None:
            self.closed = (code, reason)

    @property
    def messages(self) -> list[dict[str, Any]]:
        """Every message written, decoded, in order."""
        import orjson

        return [orjson.loads(data) for batch in self.writes for data in batch]

    def types(self) -> list[str]:
        return [m["type"] for m in self.messages]


class WebSocketClient:
    """A WebSocket client for wire tests, in the style of Channels' communicator.

    ::

        client = await WebSocketClient.connect(port, "/ws", session_id="s1")
        await client.expect(type="connected")
        await client.send({"type": "ping"})
        await client.expect(type="pong")
        assert await client.closed() == (1000, "client disconnect")

    Every wait is bounded by `timeout` seconds (a failure, not a hang).
    """

    def __init__(self, conn: WebSocketClientConnection, timeout: float) -> None:
        self.conn = conn
        self.timeout = timeout
        self.received: list[dict[str, Any]] = []

    @classmethod
    async def connect(
        cls, port: int, path: str, *, timeout: float = 5.0, headers: dict[str, str] | None = None, **params: Any
    ) -> WebSocketClient:
        import urllib.parse

        from tornado.httpclient import HTTPRequest
        from tornado.websocket import websocket_connect

        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        url = f"ws://127.0.0.1:{port}{path}" + (f"?{query}" if query else "")
        request = HTTPRequest(url, headers=headers or {})
        conn = await asyncio.wait_for(websocket_connect(request), timeout)
        return cls(conn, timeout)

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        import orjson

        if isinstance(message, dict):
            message = orjson.dumps(message).decode()
        await self.conn.write_message(message, binary=isinstance(message, bytes))

    async def receive(self) -> dict[str, Any] | None:
        """The next message, or None if the server closed the connection."""
        import orjson

        data = await asyncio.wait_for(self.conn.read_message(), self.timeout)
        if data is None:
            return None
        message: dict[str, Any] = orjson.loads(data)  # the server sends JSON objects only
        self.received.append(message)
        return message

    async def expect(self, **fields: Any) -> dict[str, Any]:
        message = await self.receive()
        if message is None:
            raise AssertionError(f"expected {fields!r}, but the server closed {self.close_info()}")
        if not matches(message, fields):
            raise AssertionError(f"expected fields {fields!r}\n got {pprint.pformat(message)}")
        return message

    async def receive_until(self, **fields: Any) -> list[dict[str, Any]]:
        """Read messages up to and including the first that matches `fields`."""
        seen: list[dict[str, Any]] = []
        while True:
            message = await self.receive()
            if message is None:
                raise AssertionError(f"closed {self.close_info()} before {fields!r}; got {seen!r}")
            seen.append(message)
            if matches(message, fields):
                return seen

    async def closed(self) -> tuple[int | None, str | None]:
        """Read until the server closes; return (code, reason). Messages read are kept."""
        while await self.receive() is not None:
            pass
        self.conn.close()  # the server closed it; release our side too
        return self.close_info()

    def close_info(self) -> tuple[int | None, str | None]:
        return self.conn.close_code, self.conn.close_reason

    def close(self) -> None:
        self.conn.close()
