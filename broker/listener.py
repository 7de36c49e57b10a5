"""The daemon's HTTP server, held against hostile sockets (docs/protocol.md section 5, "Sockets").

Tornado's `HTTPServer` serves every route (publishing, health, metrics, the
WebSocket and Server-Sent Events handshakes); `GuardedHTTPServer` is that
server with three things Tornado does not do:

* **Timeouts per connection.** Tornado has one timer (`idle_connection_timeout`)
  from the moment it waits for a request to the end of its headers, so it
  cannot both close a slow header quickly and keep an idle keep-alive
  connection for minutes. Each connection here has a `ConnectionClock`: the
  first request's headers must be complete within `header_timeout` of the
  accept; between requests the connection may be idle for `idle_timeout`,
  and once a byte of the next request arrives its headers get
  `header_timeout`; a request body that stops arriving for `idle_timeout`
  is closed too. Tornado's own timer is off: the clock covers every wait
  it covered, and it cost every request a timer, two futures and a loop
  turn (a tenth of the server CPU of a one-event publish; issue 14). A
  connection that became a WebSocket or a streamed response has no timer
  here (pings and slow-consumer rules govern it).
* **Accepting without a busy loop.** Tornado's accept handler lets an
  `EMFILE` escape to the event loop, which logs it and calls the handler
  again at once while the socket stays readable: thousands of log lines a
  second. `Acceptor` stops listening for a back-off (20 ms, doubling to
  250 ms) whenever `accept()` fails, logs at most one line a second with the
  count, and listens again.
* **Shedding idle connections past the budget.** Once the descriptors in use
  pass the budget (`broker.descriptors`), each new connection closes the
  connection that has waited longest for a request (a keep-alive idle one,
  or one still sending its headers), as nginx reuses idle connections when
  it runs short. Sockets that hold descriptors while doing nothing cannot
  then take the reserve that health probes and publishers need.

No descriptor is held back for "accept then close" when accept() fails: with
the budget and the shedding, accept() runs out only when `fd_reserve` is 0
or descriptors go elsewhere, and then a client waiting in the listen backlog
is served as soon as a descriptor frees up, rather than dropped.

Everything runs on the event-loop thread.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from asyncio import Future
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import structlog
from tornado import httputil
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream

from broker.config import Settings
from broker.descriptors import DescriptorBudget

__all__ = ["Acceptor", "ConnectionClock", "GuardedHTTPServer", "ThrottledLog"]

log = structlog.get_logger("actor_broker.listener")

#: accept() errors that mean "no descriptor (or kernel memory) for a new socket".
SCARCE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: accept() errors that belong to the one pending connection (it went away); Linux's
#: accept(2) says to treat them like EAGAIN and accept the next.
_PEER_GONE = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET", "EHOSTUNREACH", "ENETUNREACH"
    )
    if hasattr(errno, name)
)
#: Connections accepted per readiness callback, as Tornado's own accept handler does.
ACCEPT_BATCH = 128
BACKOFF_MIN = 0.02
BACKOFF_MAX = 0.25
#: At most one line per this many seconds about one kind of trouble.
LOG_INTERVAL = 1.0


class ThrottledLog:
    """One kind of trouble, logged at most once per LOG_INTERVAL with the counts since the last line.

    A burst of ten thousand failures is one line a second, each with how many
    there were; what is left when the burst stops is flushed one interval
    after the last line, so no count is lost.
    """

    def __init__(self, event: str, level: str = "warning", interval: float = LOG_INTERVAL) -> None:
        self.event = event
        self.level = level
        self.interval = interval
        self._counts: dict[str, int] = {}
        self._fields: dict[str, Any] = {}
        self._last = -interval
        self._flush_pending = False

    def note(self, counts: dict[str, int], **fields: Any) -> None:
        """Count an occurrence (`counts` adds up; `fields` are the latest values)."""
        for key, value in counts.items():
            self._counts[key] = self._counts.get(key, 0) + value
        self._fields = fields
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._emit(now)
        elif not self._flush_pending:
            self._flush_pending = True
            IOLoop.current().call_later(self._last + self.interval - now, self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        if self._counts:
            self._emit(time.monotonic())

    def _emit(self, now: float) -> None:
        self._last = now
        counts, self._counts = self._counts, {}
        getattr(log, self.level)(self.event, **counts, **self._fields)


class Acceptor:
    """Accepts connections on one listening socket; backs off instead of spinning when accept() fails."""

    def __init__(
        self,
        sock: socket.socket,
        on_connection: Callable[[socket.socket, Any], None],
        budget: DescriptorBudget,
    ) -> None:
        self.sock = sock
        self.on_connection = on_connection
        self.budget = budget
        self.io_loop = IOLoop.current()
        self._listening = False
        self._closed = False
        self._delay = 0.0
        self._resume_timer: object | None = None
        self._failures = ThrottledLog("accept_failed")

    def start(self) -> Acceptor:
        self._listen()
        return self

    def close(self) -> None:
        """Stop accepting and close the listening socket (what `TCPServer.stop` does)."""
        self._closed = True
        if self._resume_timer is not None:
            self.io_loop.remove_timeout(self._resume_timer)
            self._resume_timer = None
        if self._listening:
            self.io_loop.remove_handler(self.sock)
            self._listening = False
        self.sock.close()

    def _listen(self) -> None:
        self._resume_timer = None
        if not self._closed and not self._listening:
            self.io_loop.add_handler(self.sock, self._ready, IOLoop.READ)
            self._listening = True

    def _ready(self, fd: Any, events: int) -> None:
        for _ in range(ACCEPT_BATCH):
            if not self._listening:
                return
            try:
                connection, address = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _PEER_GONE:
                    continue
                self._back_off(exc)
                return
            self._delay = 0.0
            self.on_connection(connection, address)

    def _in_use_now(self) -> int:
        self.budget.recount_soon()  # at most one listing a second, however fast the failures come
        return self.budget.in_use

    def _back_off(self, exc: OSError) -> None:
        """Stop listening for a while: the socket stays readable, so listening on would spin."""
        self.budget.accept_failures += 1
        self.io_loop.remove_handler(self.sock)
        self._listening = False
        self._delay = min(BACKOFF_MAX, max(BACKOFF_MIN, self._delay * 2))
        self._resume_timer = self.io_loop.call_later(self._delay, self._listen)
        self._failures.note(
            {"refusals": 1},
            error=errno.errorcode.get(exc.errno or 0, str(exc.errno)),
            detail=exc.strerror,
            scarce=exc.errno in SCARCE,
            backoff_ms=round(self._delay * 1000),
            descriptors_in_use=self._in_use_now(),
            limit=self.budget.limit,
        )


# -- per connection ----------------------------------------------------------------


HEADERS, IDLE, BODY, BUSY = "headers", "idle", "body", "busy"


class ConnectionClock:
    """What one HTTP connection is waiting for, and until when (see the module docstring).

    Phases: `headers` (a request's headers are arriving: `header_timeout`),
    `idle` (between requests: `idle_timeout`), `body` (a request body:
    `idle_timeout` since the last byte) and `busy` (the request is being
    answered, or the connection is a WebSocket: no deadline). One timer per
    connection; it is re-armed, not replaced, when a deadline moves later.
    """

    __slots__ = ("armed", "deadline", "io_loop", "phase", "requests", "server", "stream", "timer")

    def __init__(self, server: GuardedHTTPServer) -> None:
        self.server = server
        #: the loop it was made on (IOLoop.current() costs a lookup, and every request moves the clock 3 times)
        self.io_loop = IOLoop.current()
        self.stream: IOStream | None = None
        self.phase = HEADERS
        self.deadline: float | None = None
        self.requests = 0
        self.timer: object | None = None
        #: when `timer` fires (loop time)
        self.armed = 0.0

    # -- what happens on the connection

    def accepted(self) -> None:
        """The first request's headers are due `header_timeout` after the accept."""
        self._enter(HEADERS, self.server.settings().header_timeout)
        self.server.waiting_started(self)

    def request_started(self) -> None:
        """Tornado waits for a request: the first one (timed from the accept) or the next one."""
        self.requests += 1
        if self.requests == 1 or self.stream is None:  # the first; or shed before Tornado got round to it
            return
        self._enter(IDLE, self.server.settings().idle_timeout)
        self.server.waiting_started(self)

    def received(self) -> None:
        """Bytes arrived: the next request began, or its body is still coming."""
        if self.phase == IDLE:
            self._enter(HEADERS, self.server.settings().header_timeout)
        elif self.phase == BODY:
            self.deadline = self.io_loop.time() + self.server.settings().idle_timeout

    def headers_done(self) -> None:
        self.server.waiting_ended(self)
        self._enter(BODY, self.server.settings().idle_timeout)

    def body_done(self) -> None:
        self.phase = BUSY
        self.deadline = None

    def detached(self) -> None:
        """The connection became a WebSocket (or another protocol): no deadline here ever again,
        so the timer goes now rather than when it would have fired (up to `header_timeout` on)."""
        self.phase = BUSY
        self.deadline = None
        if self.timer is not None:
            self.io_loop.remove_timeout(self.timer)
            self.timer = None

    def closed(self) -> None:
        self.server.waiting_ended(self)
        self.deadline = None
        if self.timer is not None:
            self.io_loop.remove_timeout(self.timer)
            self.timer = None
        self.stream = None
        self.server.budget.socket_closed()

    # -- the timer

    def _enter(self, phase: str, seconds: float) -> None:
        io_loop = self.io_loop
        self.phase = phase
        self.deadline = deadline = io_loop.time() + seconds
        if self.timer is not None:
            if self.armed <= deadline:
                return  # fires first, then re-arms itself for the later deadline
            io_loop.remove_timeout(self.timer)
        self._arm(deadline)

    def _arm(self, when: float) -> None:
        self.armed = when
        self.timer = self.io_loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self.timer = None
        deadline = self.deadline
        if deadline is None or self.stream is None:
            return
        if self.io_loop.time() < deadline:
            self._arm(deadline)
            return
        self.server.timed_out(self.phase)
        self.stream.close()


class _ShortQueue(list[Any]):
    """The part of `collections.deque` IOStream uses, on a list: 56 bytes empty instead of 760.

    A stream's write buffer and its write futures hold one or two items at a
    time (a connection writes one batch and waits for it), and an idle
    WebSocket holds none for hours; `popleft` on so short a list is as
    cheap as a deque's.
    """

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


#: (loop, future) of the done future GuardedStream.write answers with, one per event loop.
_DONE: list[tuple[asyncio.AbstractEventLoop, Future[None]]] = []


def _done_future() -> Future[None]:
    """A future that is already done, shared by every write the kernel took at once on this loop."""
    loop = asyncio.get_running_loop()
    if _DONE and _DONE[0][0] is loop:
        return _DONE[0][1]
    future: Future[None] = loop.create_future()
    future.set_result(None)
    _DONE[:] = [(loop, future)]
    return future


class _LazyReadInterest:
    """A stream's IOLoop that stops listening for reads only when unwanted bytes arrive.

    Tornado's IOStream stops reading whenever nothing is waiting for bytes
    and some are buffered: a keep-alive request whose body came with its
    headers drops its socket from epoll, and the next request's read adds it
    back. That is two epoll_ctl calls and asyncio's reader bookkeeping per
    request (9 % of a node's time in the publish latency profile). Here the
    read interest stays registered when the stream drops it, and is removed
    the moment a read event finds the stream not reading: the stream then
    stops reading exactly as Tornado would (the peer meets TCP back-pressure,
    nothing is buffered that the stream did not ask for), one event later.
    Everything else is the IOLoop's own (`__getattr__`).
    """

    __slots__ = ("_handler", "_loop", "_registered", "_wanted")
    READ = IOLoop.READ
    WRITE = IOLoop.WRITE
    ERROR = IOLoop.ERROR

    def __init__(self, loop: IOLoop) -> None:
        self._loop = loop
        self._handler: Callable[[Any, int], None] | None = None
        self._wanted = 0  # what the stream asked for
        self._registered = 0  # what the IOLoop listens for: that, and READ until it turns out unwanted

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)

    def add_handler(self, fd: Any, handler: Callable[[Any, int], None], events: int) -> None:
        self._handler = handler
        self._wanted = self._registered = events
        self._loop.add_handler(fd, self._on_events, events)

    def update_handler(self, fd: Any, events: int) -> None:
        self._wanted = events
        registered = events | (self._registered & IOLoop.READ)
        if registered != self._registered:
            self._registered = registered
            self._loop.update_handler(fd, registered)

    def remove_handler(self, fd: Any) -> None:
        self._handler = None
        self._wanted = self._registered = 0
        self._loop.remove_handler(fd)

    def _on_events(self, fd: Any, events: int) -> None:
        if events & IOLoop.READ and not self._wanted & IOLoop.READ:
            # bytes the stream is not reading for: stop listening now, as it asked
            self._registered = self._wanted
            self._loop.update_handler(fd, self._wanted)
            events &= ~IOLoop.READ
            if not events:
                return
        handler = self._handler
        if handler is not None:
            handler(fd, events)


class GuardedStream(IOStream):
    """An IOStream that tells its connection's clock when bytes arrive and when it closes.

    `read_from_fd` and `close_fd` are the hooks BaseIOStream documents for
    subclasses. The other changes: its two write queues are `_ShortQueue`s
    (1.4 KiB less per connection, most of which are idle WebSockets);
    tests/test_footprint.py checks that they still are; its IOLoop drops read
    interest lazily (`_LazyReadInterest`); and `write` below.
    """

    def __init__(self, sock: socket.socket, clock: ConnectionClock, **kwargs: Any) -> None:
        super().__init__(sock, **kwargs)
        self.io_loop = _LazyReadInterest(self.io_loop)  # type: ignore[assignment]
        self._write_futures = _ShortQueue()  # type: ignore[assignment]
        self._write_buffer._buffers = _ShortQueue()  # type: ignore[assignment]  # noqa: SLF001 - see above
        self.clock = clock
        clock.stream = self

    def write(self, data: bytes | memoryview) -> Future[None]:
        """Bytes to send: straight to the socket when nothing is queued ahead of them.

        Tornado's `write` makes a future per call, hangs a callback on it and
        resolves it through its write queue, which schedules that callback on
        the loop: three allocations and a loop callback per write, for every
        delivery of a paced stream (a publish of one event is 11 writes: its
        202 and 10 frames). When no earlier write is pending, the kernel
        usually takes everything at once; then the answer is a future that is
        already done and shared (Tornado's callers and ours check `done()` or
        add callbacks, which run at once on a done future), and the indexes
        Tornado keeps are moved as its own `_handle_write` would. Anything
        else (bytes queued, a partial send, an error, a memoryview) takes
        Tornado's path with what is left.
        """
        if self._write_buffer or self._connecting or isinstance(data, memoryview) or not data or self.closed():
            return super().write(data)
        try:
            sent = self.socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return super().write(data)  # nothing was sent: Tornado's path meets the error and closes the stream
        self._total_write_index += sent
        self._total_write_done_index += sent
        if sent < len(data):
            return super().write(data[sent:])
        self._maybe_add_error_listener()
        return _done_future()

    def read_from_fd(self, buf: bytearray | memoryview) -> int | None:
        received = super().read_from_fd(buf)
        if received:
            self.clock.received()
        return received

    def close_fd(self) -> None:
        try:
            super().close_fd()
        finally:
            self.clock.closed()


class _ClockedDelegate(httputil.HTTPMessageDelegate):
    """The application's delegate for one request, telling the clock when headers and body are in."""

    __slots__ = ("clock", "inner")

    def __init__(self, inner: httputil.HTTPMessageDelegate, clock: ConnectionClock) -> None:
        self.inner = inner
        self.clock = clock

    def headers_received(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
    ) -> Awaitable[None] | None:
        self.clock.headers_done()
        return self.inner.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return self.inner.data_received(chunk)

    def finish(self) -> None:
        self.clock.body_done()
        self.inner.finish()

    def on_connection_close(self) -> None:
        self.inner.on_connection_close()


class GuardedHTTPServer(HTTPServer):
    """`HTTPServer` with per-connection timeouts, a non-spinning accept and shedding past the budget.

    `settings` is read whenever a connection changes phase, so a SIGHUP
    reload of `header_timeout` / `idle_timeout` applies to the next phase of
    every connection.
    """

    def initialize(  # type: ignore[override]
        self,
        request_callback: httputil.HTTPServerConnectionDelegate,
        *,
        settings: Callable[[], Settings],
        budget: DescriptorBudget,
        **kwargs: Any,
    ) -> None:
        super().initialize(request_callback, **kwargs)
        # Tornado's per-request header timer (gen.with_timeout, 3600 s unless given): off, see the module docstring.
        self.conn_params.header_timeout = None
        self.settings = settings
        self.budget = budget
        self._acceptors: list[Acceptor] = []
        #: connections waiting for a request, longest-waiting first (the ones shed past the budget)
        self._waiting: dict[ConnectionClock, None] = {}
        self._shed_log = ThrottledLog("connections_shed")
        self._timeout_log = ThrottledLog("slow_requests_closed", level="info")

    # -- listening (replaces TCPServer's accept handler)

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        for sock in sockets:
            self._acceptors.append(Acceptor(sock, self._accepted, self.budget).start())

    def stop(self) -> None:
        for acceptor in self._acceptors:
            acceptor.close()
        self._acceptors.clear()

    def _accepted(self, connection: socket.socket, address: Any) -> None:
        clock = ConnectionClock(self)
        stream = GuardedStream(
            connection, clock, max_buffer_size=self.max_buffer_size, read_chunk_size=self.read_chunk_size
        )
        self.budget.socket_opened()
        clock.accepted()  # Tornado asks for the first request a loop turn later: the clock starts now
        self.handle_stream(stream, address)
        if self.budget.over_budget():
            self._shed(clock)

    # -- HTTPServerConnectionDelegate

    def start_request(
        self, server_conn: object, request_conn: httputil.HTTPConnection
    ) -> httputil.HTTPMessageDelegate:
        delegate = super().start_request(server_conn, request_conn)
        stream = getattr(server_conn, "stream", None)
        if not isinstance(stream, GuardedStream):
            return delegate
        stream.clock.request_started()
        return _ClockedDelegate(delegate, stream.clock)

    def on_close(self, server_conn: object) -> None:
        """Tornado's request loop on a connection ended: it closed, or its stream was detached."""
        super().on_close(server_conn)
        stream = getattr(server_conn, "stream", None)
        if isinstance(stream, GuardedStream) and not stream.closed():
            stream.clock.detached()

    # -- clocks report here

    def waiting_started(self, clock: ConnectionClock) -> None:
        self._waiting.pop(clock, None)
        self._waiting[clock] = None

    def waiting_ended(self, clock: ConnectionClock) -> None:
        self._waiting.pop(clock, None)

    def timed_out(self, phase: str) -> None:
        self.budget.timeouts[phase] = self.budget.timeouts.get(phase, 0) + 1
        if phase != IDLE:  # an idle keep-alive connection closing is routine
            self._timeout_log.note({phase: 1})

    def _shed(self, newcomer: ConnectionClock) -> None:
        """Close the connection that has waited longest for a request (not the one just accepted)."""
        self.budget.recount_soon()
        if not self.budget.over_budget():
            return
        victim = next((c for c in self._waiting if c is not newcomer and c.stream is not None), None)
        if victim is None or victim.stream is None:
            return  # nothing idle to give up: the newcomer takes a descriptor of the reserve
        self.budget.shed += 1
        self.waiting_ended(victim)
        victim.stream.close()
        self._shed_log.note(
            {"shed": 1}, descriptors_in_use=self.budget.in_use, budget=self.budget.budget, limit=self.budget.limit
        )
