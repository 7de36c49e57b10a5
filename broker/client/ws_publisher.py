"""`WebSocketPublisher`: publish over one `/ws/publish` connection, pipelined, without ever publishing twice.

docs/protocol.md section 2.11. Each publish is one frame `{"ref": n,
"events": [...]}`; calls do not wait for each other, so many publishes are
in flight at once and the answers, which come in order, resolve them by
`ref`. As `Publisher` does over HTTP, every event gets an `event_id` before
it is first sent, so anything may be sent again safely: the frames not
answered when a connection drops (a daemon's shutdown, a network cut) are
sent again, in order, on the next connection, and a frame answered 500 or
503 is sent again after a backoff. A 4xx is the frame's fault and raises
`PublishError` with the broker's details, for that call only.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import orjson
import structlog
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, WebSocketClosedError, websocket_connect

from broker.client.backoff import Backoff
from broker.client.errors import PublishError
from broker.client.publisher import MAX_BATCH, RETRIED_STATUSES, _with_id

__all__ = ["WebSocketPublisher"]

log = structlog.get_logger("actor_broker.client")


class _Frame:
    """One publish in flight: what to send again, and who waits for its seqs."""

    __slots__ = ("attempts", "data", "done")

    def __init__(self, data: str, done: asyncio.Future[list[int | None]]) -> None:
        self.data = data
        self.done = done
        #: refusals worth retrying (500, 503) so far
        self.attempts = 0


class WebSocketPublisher:
    """Publish events into sessions of the broker at `url` over one WebSocket.

    ::

        async with WebSocketPublisher(url, api_key="k1") as publisher:
            seq = await publisher.publish("s1", {"type": "task_started", "task_id": "t1"})
            seqs = await asyncio.gather(*(publisher.publish("s1", e) for e in events))  # pipelined

    Methods return the broker's `seq` per event, like `Publisher`'s.
    `retries` bounds the retries of one frame and the reconnects in a row;
    `max_inflight` bounds the frames sent and not answered (a call waits
    for room); `timeout` bounds each connection attempt.
    """

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout: float = 10.0,
        retries: int = 5,
        backoff: Backoff | None = None,
        max_inflight: int = 1000,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        scheme = "wss" if parts.scheme == "https" else "ws"
        self.url = f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}/ws/publish"
        self.timeout = timeout
        self.retries = retries
        self._backoff = backoff or Backoff(initial=0.2, maximum=10.0)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._room = asyncio.Semaphore(max_inflight)
        #: frames sent (or to send) and not answered, by ref, in the order they were made
        self._pending: dict[int, _Frame] = {}
        self._next_ref = 0
        self._conn: WebSocketClientConnection | None = None
        self._runner: asyncio.Future[None] | None = None
        self._closed = False
        self._connections = 0
        #: connections opened again after the first (reconnects)
        self.reconnects = 0

    async def __aenter__(self) -> WebSocketPublisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection; calls still waiting fail with PublishError (599)."""
        self._closed = True
        if self._conn is not None:
            self._conn.close()
        if self._runner is not None and not self._runner.done():
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        self._fail_all(PublishError(599, "the publisher was closed"))

    async def publish(self, session_id: str, event: dict[str, Any]) -> int | None:
        """Publish one event into `session_id` (an event may repeat it, not name another); returns its seq."""
        (seq,) = await self._publish(_into(session_id, [_with_id(event)]))
        return seq

    async def publish_many(
        self, events: Iterable[dict[str, Any]], *, session_id: str | None = None
    ) -> list[int | None]:
        """Publish events in order; their seqs in the same order.

        Without `session_id` each event names its own. More than 1000 events
        go as several frames, sent without waiting for each other; each is
        all or nothing.
        """
        prepared = [_with_id(event) for event in events]
        if session_id is not None:
            prepared = _into(session_id, prepared)
        elif any(not isinstance(e.get("session_id"), str) for e in prepared):
            raise ValueError("without session_id=, every event needs its session_id")
        batches = [prepared[start : start + MAX_BATCH] for start in range(0, len(prepared), MAX_BATCH)]
        answers = await asyncio.gather(*(self._publish(batch) for batch in batches))
        return [seq for seqs in answers for seq in seqs]

    async def _publish(self, events: list[dict[str, Any]]) -> list[int | None]:
        if self._closed:
            raise PublishError(599, "the publisher was closed")
        async with self._room:
            ref = self._next_ref
            self._next_ref += 1
            done: asyncio.Future[list[int | None]] = asyncio.get_running_loop().create_future()
            frame = self._pending[ref] = _Frame(orjson.dumps({"ref": ref, "events": events}).decode(), done)
            if self._runner is None or self._runner.done():
                self._runner = asyncio.ensure_future(self._run())
            elif self._conn is not None:
                self._write(frame)
            return await done

    def _write(self, frame: _Frame) -> None:
        assert self._conn is not None
        with contextlib.suppress(WebSocketClosedError):
            self._conn.write_message(frame.data)

    async def _run(self) -> None:
        """Connect, send what is pending, read answers while the connection lasts; again after a drop.

        The connection stays open while idle; once it closes with nothing
        pending, the next publish opens a new one.
        """
        failures = 0
        while self._pending and not self._closed:
            conn = await self._connect()
            if isinstance(conn, PublishError):
                if conn.status not in RETRIED_STATUSES or failures >= self.retries:
                    self._fail_all(conn)
                    return
                failures += 1
                await asyncio.sleep(self._backoff.delay(failures - 1))  # the backoff between attempts
                continue
            self.reconnects += self._connections > 0
            self._connections += 1
            self._conn = conn
            for frame in list(self._pending.values()):  # in ref order: the order they were made
                self._write(frame)
            try:
                answered = await self._read(conn)
            finally:
                conn.close()  # the broker closed it; release our side too
                self._conn = None
            if not self._pending or self._closed:
                break
            failures = 0 if answered else failures + 1
            log.info("publisher_reconnecting", url=self.url, code=conn.close_code, pending=len(self._pending))
            if failures > self.retries:
                self._fail_all(PublishError(599, f"the connection to {self.url} keeps closing ({conn.close_code})"))
                return
            await asyncio.sleep(self._backoff.delay(max(0, failures - 1)))  # the backoff before reconnecting

    async def _connect(self) -> WebSocketClientConnection | PublishError:
        """A new connection, or why not (the handshake's status; 599 when the broker was not reached)."""
        try:
            return await asyncio.wait_for(websocket_connect(HTTPRequest(self.url, headers=self._headers)), self.timeout)
        except HTTPClientError as exc:
            return PublishError(exc.code, _error_of(exc))
        except (OSError, TimeoutError) as exc:
            return PublishError(599, f"cannot reach {self.url}: {exc}")

    async def _read(self, conn: WebSocketClientConnection) -> bool:
        """Resolve answers until the connection closes; whether any came."""
        answered = False
        while (message := await conn.read_message()) is not None:
            answer = orjson.loads(message)
            frame = self._pending.get(answer.get("ref")) if answer.get("type") in ("accepted", "error") else None
            if frame is None:
                continue  # server_shutdown (the close follows), or a second answer to a frame sent twice
            answered = True
            if answer["type"] == "accepted":
                self._resolve(answer["ref"], answer["seq"])
            elif answer["status"] in RETRIED_STATUSES and frame.attempts < self.retries:
                frame.attempts += 1
                asyncio.get_running_loop().call_later(self._backoff.delay(frame.attempts - 1), self._retry, frame)
            else:
                error = answer["error"] + (f" (after {frame.attempts + 1} attempts)" if frame.attempts else "")
                self._resolve(answer["ref"], PublishError(answer["status"], error, answer.get("details")))
        return answered

    def _retry(self, frame: _Frame) -> None:
        if self._conn is not None and not frame.done.done():
            self._write(frame)

    def _resolve(self, ref: int, outcome: list[int | None] | PublishError) -> None:
        frame = self._pending.pop(ref, None)
        if frame is None:
            return
        if frame.done.done():
            return
        if isinstance(outcome, PublishError):
            frame.done.set_exception(outcome)
        else:
            frame.done.set_result(outcome)

    def _fail_all(self, error: PublishError) -> None:
        for ref in list(self._pending):
            self._resolve(ref, error)


def _into(session_id: str, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events with `session_id` filled in, as `POST /api/sessions/{id}/events` would take them."""
    other = [e["session_id"] for e in events if e.get("session_id", session_id) != session_id]
    if other:
        raise ValueError(f"an event names session {other[0]!r}, not {session_id!r}")
    return [{**event, "session_id": session_id} for event in events]


def _error_of(exc: HTTPClientError) -> str:
    """The broker's `error` text of a refused handshake."""
    try:
        return str(orjson.loads(exc.response.body)["error"]) if exc.response is not None else str(exc)
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return str(exc)
