"""`follow()`: one session's messages, each exactly once and in `seq` order, across reconnects.

A `Stream` owns one WebSocket at a time and replaces it whenever it drops.
A background task reads the socket, asks the `Cursor` what each message is
(new, a duplicate, or past a hole), and queues what the application should
see; the application iterates over that queue. Everything the protocol asks
of a client happens inside (docs/protocol.md section 3):

* it resumes every reconnection with `last_seq` and `epoch` (3.5);
* it waits `reconnect_after_ms` after `server_shutdown`, backs off with
  jitter after any other drop (4008 `slow_consumer` included), and raises
  `RejectedError` instead of retrying 4001, 4003, 1008 and 1009 (3.11);
* it sends `ack` for what the application took, batched (3.6);
* it refreshes the token before its `exp` through an application callback;
* it keeps connection-level chatter (greeting, `keepalive`, `pong`,
  `subscribed`, `refreshed`, `server_shutdown`) to itself unless asked.

All of it runs on the asyncio loop that entered the stream; a Stream is not
thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import orjson
import structlog
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClientConnection, WebSocketClosedError, WebSocketError, websocket_connect

from actors.wire import CloseCode
from broker.client.acks import Acks
from broker.client.backoff import Backoff
from broker.client.cursor import Cursor, Verdict
from broker.client.errors import (
    ClientError,
    ConnectionLostError,
    GaveUpError,
    QueryError,
    RejectedError,
    RequestError,
)
from broker.client.query import Answer
from broker.client.tokens import refresh_delay, token_expiry

__all__ = ["Disconnect", "Gap", "Stream", "follow"]

log = structlog.get_logger("actor_broker.client")

#: A coroutine function that returns a fresh token.
TokenSource = Callable[[], Awaitable[str]]

#: Connection-level messages the stream handles itself (yielded only with connection_messages=True).
HIDDEN = frozenset(
    {"connected", "connection_established", "keepalive", "pong", "subscribed", "refreshed", "disconnected",
     "server_shutdown"}
)
GREETINGS = frozenset({"connected", "connection_established"})
#: Close codes a retry cannot fix (docs/protocol.md section 3.11).
NOT_RETRIED = frozenset(
    {CloseCode.POLICY_VIOLATION, CloseCode.MESSAGE_TOO_BIG, CloseCode.UNAUTHORIZED, CloseCode.FORBIDDEN}
)
ENDPOINTS = ("ws", "research")
REPLAY_MODES = ("all", "missed", "none")
_END = object()


@dataclass(frozen=True)
class Gap:
    """Messages the broker no longer holds: `from_seq`..`to_seq` are lost for good.

    `to_seq` None means the session's epoch changed (the daemon restarted, or
    the session was deleted and made again): everything known before is void.
    """

    from_seq: int
    to_seq: int | None
    epoch: str | None


@dataclass(frozen=True)
class Disconnect:
    """One lost connection (or failed attempt), as the stream saw it."""

    #: the close code (None: the connection broke, or never opened)
    code: int | None
    #: the close reason, or what went wrong
    reason: str
    #: seconds waited before the next attempt
    delay: float
    #: the stream's last_seq at that moment
    last_seq: int


class _Outcome:
    """How a connection ended: retry (after `delay`, or backoff when None), or stop."""

    def __init__(self, code: int | None, reason: str, *, delay: float | None = None, stop: bool = False) -> None:
        self.code, self.reason, self.delay, self.stop = code, reason, delay, stop


class Stream:
    """Follow one session; use `follow()` to make one. Iterate with `async for`.

    Yields each session message (a dict with `seq`) once, in `seq` order,
    plus `gap` notices (dicts, also recorded in `gaps`), `session_closed`
    (the last item: the session was deleted) and broadcasts. See
    docs/clients.md for every parameter.
    """

    def __init__(  # noqa: PLR0915 - one line per option and per piece of state, each named
        self,
        url: str,
        session: str,
        *,
        events: str | Iterable[str] | None = None,
        token: str | None = None,
        refresh_token: TokenSource | None = None,
        replay: str = "all",
        user_id: str | None = None,
        last_seq: int | None = None,
        epoch: str | None = None,
        endpoint: str = "ws",
        backoff: Backoff | None = None,
        max_retries: int | None = None,
        ack_interval: float = 0.2,
        connection_messages: bool = False,
        max_pending: int = 1000,
        connect_timeout: float = 10.0,
        request_timeout: float = 10.0,
        ping_interval: float | None = 20.0,
    ) -> None:
        scheme = urlsplit(url).scheme
        if scheme not in ("http", "https", "ws", "wss"):
            raise ValueError(f"url must start with http://, https://, ws:// or wss://, got {url!r}")
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS}, got {endpoint!r}")
        if replay not in REPLAY_MODES:
            raise ValueError(f"replay must be one of {REPLAY_MODES}, got {replay!r}")
        if last_seq is not None and (isinstance(last_seq, bool) or not isinstance(last_seq, int) or last_seq < 0):
            raise ValueError("last_seq must be a non-negative integer")
        if not isinstance(session, str) or not session:
            raise ValueError("session must be a non-empty session id")
        #: the WebSocket base: http -> ws, https -> wss
        self.base = url.rstrip("/").replace(scheme, {"http": "ws", "https": "wss"}.get(scheme, scheme), 1)
        self.session = session
        self.user_id = user_id
        self.endpoint = endpoint
        self.replay = replay
        self._events = events if events is None or isinstance(events, str) else ",".join(events)
        self._token = token
        self._refresh_token = refresh_token
        self._backoff = backoff or Backoff()
        self._max_retries = max_retries
        self._connection_messages = connection_messages
        self._max_pending = max_pending
        self._connect_timeout = connect_timeout
        self._request_timeout = request_timeout
        self._ping_interval = ping_interval
        self._cursor = Cursor(last_seq, epoch)

        #: the latest greeting (`connected` / `connection_established`)
        self.greeting: dict[str, Any] | None = None
        #: the filter in effect, as the broker echoes it (docs/protocol.md section 3.4)
        self.filter: list[str] | None = None
        #: every gap reported so far, oldest first
        self.gaps: list[Gap] = []
        #: every lost connection or failed attempt so far, oldest first
        self.disconnects: list[Disconnect] = []
        #: connections opened so far (the first included)
        self.connections = 0
        #: reconnections made because a seq was skipped without a gap
        self.resyncs = 0

        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._room = asyncio.Event()
        self._room.set()
        self._connected = asyncio.Event()
        self._conn: WebSocketClientConnection | None = None
        self._first: asyncio.Future[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._failures = 0
        self._resync_streak = 0
        self._failure: BaseException | None = None
        self._closing = False
        self._ended = False
        self._answers: list[Answer] = []
        self._request_lock = asyncio.Lock()
        self._waiter: tuple[str, asyncio.Future[dict[str, Any]]] | None = None
        self._starting: Answer | None = None
        self._shutdown_after: float | None = None
        self._session_closed = False
        # the last message the application took: processed once it asks for the next one
        self._taken: dict[str, Any] | None = None
        self._acks = Acks(ack_interval, lambda: self._cursor.epoch)

    # -- what the application sees -------------------------------------------

    @property
    def last_seq(self) -> int:
        """The highest seq delivered (or declared lost by a gap): what a reconnect resumes after."""
        return self._cursor.last_seq

    @property
    def epoch(self) -> str | None:
        """The session's epoch as last seen: store it with last_seq to resume later."""
        return self._cursor.epoch

    @property
    def connection_id(self) -> str | None:
        return None if self.greeting is None else self.greeting.get("connection_id")

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def __aenter__(self) -> Stream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect (retrying as on any drop) and wait for the first greeting; raises `RejectedError`."""
        if self._first is not None:
            return
        self._first = asyncio.get_running_loop().create_future()
        self._tasks = [asyncio.create_task(self._run()), asyncio.create_task(self._acks.run(lambda: self._conn))]
        if self._refresh_token is not None:
            self._tasks.append(asyncio.create_task(self._refresher()))
        try:
            await self._first
        except BaseException:
            await self.close()
            raise

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self._taken is not None:
            self.mark_processed(self._taken)
            self._taken = None
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # every later call ends too
            if self._failure is not None:
                raise self._failure
            raise StopAsyncIteration
        if self._queue.qsize() < self._max_pending:
            self._room.set()
        self._taken = item
        return item  # type: ignore[no-any-return]

    async def subscribe(self, *events: str) -> list[str]:
        """Add types or presets to the filter; returns the new filter (the broker's echo)."""
        reply = await self._request({"type": "subscribe", "events": _event_list(events)}, "subscribed")
        return list(reply["events"])

    async def unsubscribe(self, *events: str) -> list[str]:
        """Remove types or presets from the filter; returns the new filter."""
        reply = await self._request({"type": "unsubscribe", "events": _event_list(events)}, "subscribed")
        return list(reply["events"])

    def query(self, text: str, *, start_timeout: float = 30.0, **fields: Any) -> Answer:
        """Ask the session's agent; iterate over the returned `Answer` for its chunks (see `Answer`).

        Extra fields (`include_context`, `system_prompt`, ...) go into the
        `query` message as given. `start_timeout` bounds the wait for the
        broker to start answering (`query_start`, or `busy`).
        """
        return Answer(self, text, fields, start_timeout)

    async def send(self, message: dict[str, Any]) -> None:
        """Send any message as is (an `error` answer to it is yielded, unless it answers a request)."""
        await self._write(message)

    async def close(self) -> None:
        """Acknowledge what was taken, close the connection (1000), stop the background tasks."""
        if self._closing:
            return
        self._closing = True
        if self._taken is not None:
            self.mark_processed(self._taken)
            self._taken = None
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(WebSocketClosedError, StreamClosedError):
                await self._acks.flush(conn)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if conn is not None:
            conn.close(CloseCode.NORMAL, "client closing")
        self._finish(None)

    # -- the connection loop ---------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                try:
                    conn = await self._open()
                except RejectedError as exc:
                    self._finish(exc)
                    return
                except _CONNECT_ERRORS as exc:
                    if not await self._retry(_Outcome(None, _describe(exc))):
                        return
                    continue
                self._conn = conn
                try:
                    outcome = await self._read(conn)
                finally:
                    self._conn = None
                    self._connected.clear()
                    self._fail_waiter(ConnectionLostError("the connection dropped before the answer"), answers=False)
                    conn.close(CloseCode.NORMAL, "client closing" if self._closing else "reconnecting")
                if outcome.stop:
                    self._finish(None)
                    return
                if not await self._retry(outcome):
                    return
        except Exception as exc:  # a bug here must end the stream visibly, not hang it
            log.exception("client_failed", session_id=self.session)
            self._finish(exc)

    async def _retry(self, outcome: _Outcome) -> bool:
        """Record a drop and wait before the next attempt; False when the stream must end instead."""
        if outcome.code in NOT_RETRIED:
            self._finish(RejectedError(outcome.code or 0, outcome.reason))
            return False
        if outcome.delay is not None:
            delay = outcome.delay
        else:
            self._failures += 1
            if self._max_retries is not None and self._failures > self._max_retries:
                self._finish(GaveUpError(self._failures, outcome.reason))
                return False
            delay = self._backoff.delay(self._failures - 1)
        self.disconnects.append(Disconnect(outcome.code, outcome.reason, delay, self.last_seq))
        log.info("client_reconnecting", session_id=self.session, code=outcome.code, reason=outcome.reason,
                 delay=round(delay, 3), last_seq=self.last_seq)
        await asyncio.sleep(delay)  # the backoff itself
        return True

    async def _open(self) -> WebSocketClientConnection:
        if self._token is not None and self._refresh_token is not None:
            exp = token_expiry(self._token)
            if exp is not None and exp - time.time() < 5:
                self._token = await self._refresh_token()
        params: dict[str, str] = {}
        if self.endpoint == "ws":
            params["session_id"] = self.session
        if self.user_id is not None:
            params["user_id"] = self.user_id
        events = self._events if self.filter is None else ",".join(self.filter)
        if events:
            params["events"] = events
        params.update(self._cursor.handshake(self.replay))
        path = "/ws" if self.endpoint == "ws" else f"/ws/research/{quote(self.session, safe='')}"
        request = HTTPRequest(f"{self.base}{path}?{urlencode(params)}", connect_timeout=self._connect_timeout)
        subprotocols = ["bearer", self._token] if self._token else None
        try:
            return await websocket_connect(
                request, subprotocols=subprotocols, ping_interval=self._ping_interval,
                ping_timeout=self._ping_interval,
            )
        except HTTPClientError as exc:
            if exc.code < 500 and exc.code != 429:
                raise RejectedError(exc.code, _body_error(exc)) from None
            raise

    async def _read(self, conn: WebSocketClientConnection) -> _Outcome:
        """Read one connection until it ends; say how it ended."""
        greeted = False
        self._shutdown_after = None
        while True:
            raw = await conn.read_message()
            if raw is None:
                return self._closed(conn.close_code, conn.close_reason or "")
            message = _decode(raw)
            if message is None:
                log.warning("client_bad_frame", session_id=self.session, frame=str(raw)[:200])
                continue
            kind = message.get("type")
            if not greeted:
                if kind not in GREETINGS:
                    return _Outcome(None, f"the first message was {kind!r}, not a greeting")
                greeted = True
                self._greeted(conn, message)
                continue
            if "seq" in message:
                verdict = self._cursor.judge(int(message["seq"]), every_type=self.filter == ["*"])
                if verdict is Verdict.DELIVER:
                    self._resync_streak = 0
                    await self._deliver(message)
                elif verdict is Verdict.HOLE:
                    self.resyncs += 1
                    self._resync_streak += 1
                    log.info("client_resync", session_id=self.session, last_seq=self.last_seq, seq=message["seq"])
                    # Straight back the first time; holes again before any progress back off.
                    return _Outcome(None, f"seq {message['seq']} after {self.last_seq} without a gap",
                                    delay=0.0 if self._resync_streak == 1 else None)
                continue
            await self._control(message)

    def _greeted(self, conn: WebSocketClientConnection, greeting: dict[str, Any]) -> None:
        self.greeting = greeting
        self.filter = list(greeting.get("events") or ["*"])
        self._cursor.greeted(greeting, self.replay)
        self.connections += 1
        self._failures = 0
        self._acks.connected()
        self._connected.set()
        if self._connection_messages:
            self._queue.put_nowait(greeting)
        if self._first is not None and not self._first.done():
            self._first.set_result(None)
        log.debug("client_connected", session_id=self.session, connection_id=greeting.get("connection_id"),
                  last_seq=self.last_seq)

    async def _control(self, message: dict[str, Any]) -> None:
        """A connection-level message (no seq)."""
        kind = message.get("type")
        if kind == "gap":
            self._cursor.gap(message)
            self.gaps.append(Gap(int(message.get("from_seq") or 1), message.get("to_seq"), message.get("epoch")))
            log.info("client_gap", session_id=self.session, from_seq=message.get("from_seq"),
                     to_seq=message.get("to_seq"))
            await self._deliver(message)
            return
        if kind == "subscribed":
            was_everything = self.filter == ["*"]
            self.filter = list(message.get("events") or [])
            if self.filter == ["*"] and not was_everything:
                self._cursor.filter_widened()
        elif kind == "server_shutdown":
            self._shutdown_after = float(message.get("reconnect_after_ms") or 0) / 1000
        elif kind == "session_closed":
            self._session_closed = True
        if kind == "error" and "code" in message and self._answer_request(message):
            return
        if self._waiter is not None and self._waiter[0] == kind:
            _, future = self._waiter
            self._waiter = None
            if not future.done():
                future.set_result(message)
        if kind in HIDDEN and not self._connection_messages:
            return
        await self._deliver(message)

    def _answer_request(self, error: dict[str, Any]) -> bool:
        """Route a client-input `error` to the request it answers; False if none is waiting."""
        code, text = str(error.get("code")), str(error.get("error"))
        if self._starting is not None:
            self._starting.refused(code, text)
            return True
        if self._waiter is not None:
            _, future = self._waiter
            self._waiter = None
            if not future.done():
                future.set_exception(RequestError(code, text))
            return True
        return False

    def _closed(self, code: int | None, reason: str) -> _Outcome:
        if self._session_closed or (code == CloseCode.NORMAL and reason == "session closed"):
            # Deleted: reconnecting would only make a new, empty session of the same name.
            return _Outcome(code, reason, stop=True)
        if code == CloseCode.GOING_AWAY and self._shutdown_after is not None:
            # The server asked for this pause; a little jitter keeps clients from returning in step.
            return _Outcome(code, reason, delay=self._shutdown_after * self._backoff.rng.uniform(1.0, 1.25))
        return _Outcome(code, reason)

    async def _deliver(self, message: dict[str, Any]) -> None:
        if "seq" in message:
            for answer in list(self._answers):
                answer.offer(message)
        self._queue.put_nowait(message)
        if self._queue.qsize() >= self._max_pending:
            self._room.clear()
        # Back-pressure: stop reading while the application is behind (unless a query is being read).
        while not self._room.is_set() and not self._answers:
            await self._room.wait()

    def _finish(self, failure: BaseException | None) -> None:
        if self._ended:
            return
        self._ended = True
        self._failure = failure
        if self._first is not None and not self._first.done():
            self._first.set_exception(failure or ClientError("the stream was closed before it connected"))
        ended = failure or ClientError("the stream ended")
        for answer in list(self._answers):
            answer.abandoned(ended)
        self._fail_waiter(ended)
        self._queue.put_nowait(_END)

    # -- requests, acks, token refresh ------------------------------------------

    async def _write(self, message: dict[str, Any]) -> None:
        await asyncio.wait_for(self._connected.wait(), self._request_timeout)
        conn = self._conn
        if conn is None:
            raise ConnectionLostError("not connected")
        try:
            await conn.write_message(orjson.dumps(message).decode())
        except (WebSocketClosedError, StreamClosedError) as exc:
            raise ConnectionLostError("the connection dropped while sending") from exc

    async def _request(self, message: dict[str, Any], expect: str) -> dict[str, Any]:
        """Send a request and wait for its answer; one request at a time, so errors map to it."""
        if self._ended:
            raise self._failure or ClientError("the stream has ended")
        async with self._request_lock:
            future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            self._waiter = (expect, future)
            try:
                await self._write(message)
                return await asyncio.wait_for(future, self._request_timeout)
            except TimeoutError:
                raise RequestError("timeout", f"no {expect} within {self._request_timeout} s") from None
            finally:
                self._waiter = None

    def _fail_waiter(self, exc: BaseException, *, answers: bool = True) -> None:
        """Fail the request waiting for an answer; and a starting query's, when the stream ends.

        A query that was sending when the connection dropped is not failed: its
        `query_start` may come in the replay after the reconnect (start_timeout bounds the wait).
        """
        if self._waiter is not None and not self._waiter[1].done():
            self._waiter[1].set_exception(exc)
        if answers and self._starting is not None:
            self._starting.abandoned(exc)

    async def begin_query(self, answer: Answer) -> None:
        if self._ended:
            raise self._failure or ClientError("the stream has ended")
        async with self._request_lock:
            self._answers.append(answer)
            self._room.set()
            self._starting = answer
            try:
                started = answer.sending()
                await self._write({"type": "query", "query": answer.text, **answer.fields})
                await asyncio.wait_for(asyncio.shield(started), answer.start_timeout)
            except TimeoutError:
                self.forget_answer(answer)
                raise QueryError("timeout", f"the query did not start within {answer.start_timeout} s") from None
            except BaseException:
                self.forget_answer(answer)
                raise
            finally:
                self._starting = None

    def forget_answer(self, answer: Answer) -> None:
        with contextlib.suppress(ValueError):
            self._answers.remove(answer)

    def mark_processed(self, message: dict[str, Any]) -> None:
        """The application is done with this message (used by `Answer` too)."""
        self._acks.processed(message)

    async def _refresher(self) -> None:
        """Replace the token before it expires: ask the application, then send `refresh`."""
        assert self._refresh_token is not None
        while True:
            exp = token_expiry(self._token) if self._token else None
            if exp is None:
                return
            await asyncio.sleep(refresh_delay(exp, time.time()))
            try:
                token = await self._refresh_token()
            except Exception as exc:  # noqa: BLE001 - the application's callback; try again until the token runs out
                log.warning("client_refresh_failed", session_id=self.session, error=repr(exc))
                await asyncio.sleep(min(5.0, max(0.5, (exp - time.time()) / 2)))
                continue
            new_exp = token_expiry(token)
            self._token = token
            if self.connected:
                try:
                    await self._request({"type": "refresh", "token": token}, "refreshed")
                except ClientError as exc:
                    log.warning("client_refresh_refused", session_id=self.session, error=str(exc))
            if new_exp is None or new_exp <= exp:
                log.warning("client_refresh_not_later", session_id=self.session)
                return


def follow(url: str, session: str, **options: Any) -> Stream:
    """Follow `session` on the broker at `url` (e.g. http://127.0.0.1:8050)::

        async with follow(url, "s1", events="essential") as stream:
            async for message in stream:
                ...

    Options are `Stream`'s keyword arguments (docs/clients.md).
    """
    return Stream(url, session, **options)


_CONNECT_ERRORS = (OSError, StreamClosedError, WebSocketError, HTTPClientError, TimeoutError)


def _event_list(events: tuple[str, ...]) -> list[str]:
    if not events or not all(isinstance(e, str) and e for e in events):
        raise ValueError("name at least one event type or preset, each a non-empty string")
    return list(events)


def _decode(raw: str | bytes) -> dict[str, Any] | None:
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return message if isinstance(message, dict) and isinstance(message.get("type"), str) else None


def _body_error(exc: HTTPClientError) -> str:
    body = exc.response.body if exc.response is not None else b""
    try:
        return str(orjson.loads(body)["error"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return exc.message or f"HTTP {exc.code}"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, HTTPClientError):
        return f"HTTP {exc.code}: {_body_error(exc)}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
