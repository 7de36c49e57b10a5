"""PipelinedLine: one Redis connection that many calls share at once (the publish path).

Redis answers the commands of one connection in the order they were sent, so
calls can share a connection without waiting for each other: each call writes
its command and queues a future, and the replies, read in order, go to the
oldest waiting call. Whoever reads does so for everyone: a call that finds
nobody reading reads itself until its own reply came (alone on the line,
as a publish usually is, it reads just that one, in its own task, with no
hand-over: one loop turn from the reply to the caller, as with redis-py's
own call); a call that leaves others waiting hands the reading to a task
of the line's. centrifuge's Redis broker does the
same (pipelining through one connection), for the same reason: on the publish
path redis-py's per-command machinery (pool checkout and return under an
asyncio.Condition, a timeout context, the retry wrapper, observability hooks)
cost about as much of the node's CPU as the script call's own I/O
(bench/store_publish.py compares the two).

The connection itself is redis-py's: made by the pool's own factory (so its
host, timeouts, parser and retry settings are the pool's), connected by
redis-py with its retry and backoff, packed and parsed by it (hiredis).
What is here is only the matching of replies to calls.

Failures: a broken connection fails every call waiting on it with redis-py's
ConnectionError (the caller retries or answers 503) and the next call makes a
new one. A call that Redis has not answered within the line's `deadline`
fails with LineTimeout, and so does every call behind it: the connection is
dropped, since the next call must not queue behind a Redis that does not
answer. One timer watches the oldest call, re-armed at most once per
deadline, instead of a timeout context per call (asyncio.timeout is a timer
scheduled and cancelled each time: a few per cent of a node's CPU on the
publish path). A call cut from outside (a cancel) drops the connection too,
as redis-py does for a cut command.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from redis import exceptions as rx
from redis.asyncio.connection import AbstractConnection, ConnectionPool

__all__ = ["LineTimeout", "PipelinedLine"]


class LineTimeout(Exception):  # noqa: N818 - a condition, named as redis-py names its TimeoutError
    """Redis did not answer a call on the line within its deadline.

    Not a redis-py ConnectionError or TimeoutError on purpose: redis-py's retry
    would send the call again and wait out the deadline a second time.
    """


class _Connection:
    """One connection of the line and the calls waiting on its replies (a dropped one's late replies stay its own)."""

    __slots__ = ("conn", "reader", "reading", "waiting")

    def __init__(self, conn: AbstractConnection) -> None:
        self.conn = conn
        #: the calls sent and not answered, oldest first, with the loop time each was sent at
        self.waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        #: a call or the reader task is reading replies (never two: the replies would be split between them)
        self.reading = False
        self.reader: asyncio.Task[None] | None = None


class PipelinedLine:
    """Calls share one connection; replies go to them in the order they were sent."""

    def __init__(self, pool: ConnectionPool, deadline: float | None = None) -> None:
        self._pool = pool
        #: seconds Redis has to answer a call (None: no limit of the line's own)
        self.deadline = deadline
        self._watchdog: asyncio.TimerHandle | None = None
        self._current: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None
        self._closing: set[asyncio.Task[Any]] = set()
        self._closed = False

    @property
    def connected(self) -> bool:
        """A connection is up: a call goes out at once, and only the deadline bounds its wait."""
        line = self._current
        return line is not None and line.conn.is_connected

    @property
    def in_flight(self) -> int:
        """Calls sent and not answered yet."""
        return 0 if self._current is None else len(self._current.waiting)

    async def execute(self, *args: Any) -> Any:
        """Send one command and return its reply (an error reply is raised, as redis-py raises it)."""
        line = self._current
        if line is None or not line.conn.is_connected:
            line = await self._connected()
        conn = line.conn
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        line.waiting.append((reply, loop.time()))  # before the send: no other call can write between the two
        if self._watchdog is None and self.deadline is not None:
            self._watchdog = loop.call_later(self.deadline, self._watch)
        try:
            # no health check: its PING would put a reply on the line that no call waits for
            await conn.send_packed_command(conn.pack_command(*args), check_health=False)
        except BaseException as exc:
            self._drop(line, exc)
            _retrieved(reply)
            raise
        if not line.reading:
            line.reading = True
            try:
                await self._read(line, until=reply)
            except BaseException:
                _retrieved(reply)  # cut while reading: the failure is raised here, not from the future
                raise
            finally:
                line.reading = False
            if line.waiting and self._current is line:  # calls behind this one: the line's task reads on
                line.reading = True
                line.reader = asyncio.ensure_future(self._read_on(line))
        try:
            return await reply
        except asyncio.CancelledError:
            if reply.cancelled():  # cut before Redis answered: the next call must not queue behind it
                self._drop(line, rx.ConnectionError("a call on the line was cut before Redis answered"))
            raise

    async def aclose(self) -> None:
        """Fail what is waiting and close the connection."""
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._current is not None:
            self._drop(self._current, rx.ConnectionError("the line was closed"))
        if self._closing:
            await asyncio.wait(list(self._closing), timeout=1)

    async def _connected(self) -> _Connection:
        if self._closed:
            raise rx.ConnectionError("the line was closed")
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _connect(self) -> _Connection:
        conn: AbstractConnection = self._pool.make_connection()  # type: ignore[no-untyped-call]
        # redis-py's connect: its retry with backoff, the pool's connect timeout
        await conn.connect()  # type: ignore[no-untyped-call]
        line = self._current = _Connection(conn)
        return line

    async def _read(self, line: _Connection, until: asyncio.Future[Any] | None = None) -> None:
        """Hand replies to the waiting calls, oldest first, until `until` has its reply (None: until none
        waits) or the connection fails (every waiting call then fails with it)."""
        try:
            while line.waiting and (until is None or not until.done()):
                value: Any
                try:
                    value = await line.conn.read_response()
                except rx.ResponseError as exc:  # an error reply: it belongs to its call, the line goes on
                    value = exc
                waiter, _ = line.waiting.popleft()
                if waiter.done():  # its caller was cut: nothing to hand it
                    continue
                if isinstance(value, rx.ResponseError):
                    waiter.set_exception(value)
                else:
                    waiter.set_result(value)
        except asyncio.CancelledError:
            self._drop(line, rx.ConnectionError("a read on the line was cut"))
            raise
        except Exception as exc:  # noqa: BLE001 - every waiting call gets it
            self._drop(line, exc)

    async def _read_on(self, line: _Connection) -> None:
        """The line's reader task: the replies of calls that a reading call left waiting."""
        try:
            await self._read(line)
        finally:
            line.reading = False
            line.reader = None

    def _watch(self) -> None:
        """The deadline's timer: fail the line if its oldest call is overdue, else look again when it would be."""
        self._watchdog = None
        line = self._current
        if line is None or not line.waiting or self.deadline is None:
            return  # idle: the next call arms it again
        loop = asyncio.get_running_loop()
        left = line.waiting[0][1] + self.deadline - loop.time()
        if left <= 0:
            self._drop(line, LineTimeout(f"redis did not answer within {self.deadline} s"))
            return
        self._watchdog = loop.call_later(left, self._watch)

    def _drop(self, line: _Connection, error: BaseException) -> None:
        """Fail every call waiting on `line` and let the next call connect afresh."""
        failure = error if isinstance(error, Exception) else rx.ConnectionError(str(error) or type(error).__name__)
        while line.waiting:
            waiter, _ = line.waiting.popleft()
            if not waiter.done():
                waiter.set_exception(failure)
        if self._current is not line:
            return  # dropped already: its connection is being closed
        self._current = None
        closing = asyncio.ensure_future(line.conn.disconnect(nowait=True))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)
        if line.reader is not None and line.reader is not asyncio.current_task():
            line.reader.cancel()


def _retrieved(reply: asyncio.Future[Any]) -> None:
    """Mark a failed future of a call that raises another way as seen (asyncio would log it as never retrieved)."""
    if reply.done() and not reply.cancelled():
        reply.exception()
