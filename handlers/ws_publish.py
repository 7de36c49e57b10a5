"""`GET /ws/publish`: publishing over one WebSocket instead of one HTTP request per publish.

docs/protocol.md section 5, "Publishing over a WebSocket". The handshake is
authorised by the rule of every POST (`handlers.base.publisher_refusal`), the
key coming from `Authorization: Bearer KEY` or, where a client cannot set
headers, the subprotocols `bearer, KEY`. Each text frame is one publish and
goes the way a `POST /api/events` body goes: `broker.validation` parses and
validates it, `Broker.publish` publishes it. Every frame gets one answer, in
the order the frames came, with the status and details the POST would have
had.

Frames are answered one after another, never concurrently: a publisher that
pipelines frames into one session gets its events in the order it sent them
on every backend. Frames already read when their turn comes are published
together (one `Broker.publish` for a run of valid frames), which is where a
pipelining publisher saves over HTTP.

Back-pressure: a frame counts as unanswered from the moment it is read until
its answer has been handed to the kernel. Past `max_publish_inflight` of
them, `on_message` returns a future that Tornado awaits before it reads the
next frame, so a publisher that outruns the backend, or that does not read its
answers, is held by TCP instead of being buffered by the server.

Shutdown: the socket is one of the broker's open connections (as a small
actor, `PublisherActor`), so the daemon's drain tells it `server_shutdown` and
waits for it: it stops reading, answers every frame it read, and closes 1001.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections import deque
from collections.abc import Awaitable
from typing import Any

import orjson
import structlog
import tornado.websocket
from tornado.iostream import StreamClosedError

from actors.messages import CloseConnection, Frame
from actors.runtime import LoopActor
from broker.cluster.store import BackendUnavailable
from broker.core import Broker, OpenConnection
from broker.validation import (
    MAX_BATCH_EVENTS,
    BadRequest,
    ValidationFailed,
    normalize_events,
    parse_body,
)
from handlers.base import RequestIdMixin, publisher_refusal
from handlers.body import DRAIN_LIMIT
from handlers.origins import origin_allowed
from handlers.ws import websocket_frame

__all__ = ["PublishWebSocket", "PublisherActor", "read_frame"]

log = structlog.get_logger("actor_broker.publish")

#: What a frame's text is parsed as: the JSON of a `POST /api/events` body.
_JSON = "application/json"
#: A frame whose JSON is an object (an event, or an envelope `{"ref": R, "events": [...]}`).
_OBJECT = re.compile(rb"\s*\{")
#: The keys of an envelope; an object with other keys is an event.
_ENVELOPE_KEYS = frozenset({"ref", "events"})
#: Marks a frame that gave no `ref` (None is a ref a publisher may choose).
_NO_REF: Any = object()


class FrameRefused(Exception):  # noqa: N818 - an answer, like the HTTP statuses it mirrors
    """A frame refused as a whole: `status`, `error` and (422) `details`, as the POST's answer would be.

    `ref` is the frame's ref when it was read before the refusal (a bad envelope).
    """

    def __init__(
        self, status: int, error: str, details: list[dict[str, Any]] | None = None, *, ref: Any = _NO_REF
    ) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.details = details
        self.ref = ref


def read_frame(data: bytes) -> tuple[Any, list[Any]]:
    """`(ref, raw events)` of one frame; BadRequest (400) worded as for a `POST /api/events` body.

    The frame is an event object, an array of events, or `{"ref": R,
    "events": [...]}` (only those two keys; `ref` may be left out). A frame
    without a ref gives `_NO_REF`. An envelope whose `events` is not an array
    raises FrameRefused (400) carrying the ref, so the refusal can still echo it.
    """
    items = parse_body(data, _JSON)
    if len(items) != 1:
        return _NO_REF, items
    envelope = items[0]
    if not (isinstance(envelope, dict) and "events" in envelope and envelope.keys() <= _ENVELOPE_KEYS):
        return _NO_REF, items
    if not _OBJECT.match(data):  # `[{"events": [...]}]`: a batch of one (odd) event, not an envelope
        return _NO_REF, items
    ref = envelope.get("ref", _NO_REF)
    events = envelope["events"]
    if not isinstance(events, list):
        raise FrameRefused(400, "events must be an array of event objects", ref=ref)
    return ref, events


def ref_of(data: bytes) -> Any:
    """The frame's ref for a refusal decided before the frame is read as a publish (413, 503 draining).

    The frame is already in memory (at most the read limit), and its answer
    echoes a ref it gave like any other; `_NO_REF` when it gave none or is
    not JSON.
    """
    try:
        return read_frame(data)[0]
    except (BadRequest, FrameRefused) as exc:
        return getattr(exc, "ref", _NO_REF)


def answer(ref: Any, body: dict[str, Any]) -> bytes:
    """One answer frame's JSON: `type` first, then `ref` when the frame gave one, then the body."""
    kind = "accepted" if "accepted" in body else "error"
    head: dict[str, Any] = {"type": kind} if ref is _NO_REF else {"type": kind, "ref": ref}
    return orjson.dumps({**head, **body})


def refusal_body(refusal: FrameRefused) -> dict[str, Any]:
    """The `status`, `error` and `details` of an error answer (the POST's body, with its status)."""
    body: dict[str, Any] = {"status": refusal.status, "error": refusal.error}
    if refusal.details is not None:
        body["details"] = refusal.details
    return body


class _Publish:
    """A frame that passed every check: its ref and its validated events, waiting for `Broker.publish`."""

    __slots__ = ("events", "ref")

    def __init__(self, ref: Any, events: list[dict[str, Any]]) -> None:
        self.ref = ref
        self.events = events


class _Run:
    """Good frames read one after another, to be published as one batch (at most MAX_BATCH_EVENTS events)."""

    __slots__ = ("events", "frames", "new_sessions")

    def __init__(self) -> None:
        self.frames: list[_Publish] = []
        self.events = 0
        #: sessions this process does not hold yet that the run's events will create
        self.new_sessions: set[str] = set()

    def takes(self, frame: _Publish) -> bool:
        return self.events + len(frame.events) <= MAX_BATCH_EVENTS

    def add(self, frame: _Publish, broker: Broker) -> None:
        self.frames.append(frame)
        self.events += len(frame.events)
        self.new_sessions.update(e["session_id"] for e in frame.events if not broker.session_exists(e["session_id"]))


class PublisherActor(LoopActor):
    """The broker's handle on one publish socket, in `Broker.connections`.

    Shutdown tells every open connection a frame (`server_shutdown`) and a
    `CloseConnection`; this actor hands them to its socket. It runs on the
    loop thread, as the socket does, so it may call the socket directly.
    """

    def __init__(self, socket: PublishWebSocket) -> None:
        super().__init__()
        self.socket: PublishWebSocket | None = socket

    def on_receive(self, message: Any) -> None:
        socket = self.socket
        if socket is None:
            return
        if isinstance(message, Frame):
            socket.notify(message)
        elif isinstance(message, CloseConnection):
            socket.shut(message)

    def on_stop(self) -> None:
        """Runs on the loop when the actor stops (the socket closed, or the broker stops every actor)."""
        self.socket = None


class PublishWebSocket(RequestIdMixin, tornado.websocket.WebSocketHandler):
    """One publisher's socket: frames in, one answer per frame out, in order."""

    broker: Broker

    def initialize(self, broker: Broker) -> None:
        self.broker = broker
        self.connection: OpenConnection | None = None
        self.connection_id = "p-" + uuid.uuid4().hex[:16]
        #: frames read and not yet answered, oldest first (raw bytes; checked when their turn comes)
        self._queue: deque[bytes] = deque()
        #: frames read whose answer has not reached the kernel yet (back-pressure counts these)
        self._unanswered = 0
        #: the task answering `_queue`, while it runs
        self._worker: asyncio.Future[None] | None = None
        #: what Tornado awaits before reading the next frame, while reading is held
        self._held: asyncio.Future[None] | None = None
        #: the server is shutting down: read nothing more
        self._stop_reading = False
        #: close with this (code, reason) once every frame read is answered
        self._close_when_answered: tuple[int, str] | None = None
        self._frames = 0
        self._events = 0
        self._refused = 0

    def set_default_headers(self) -> None:
        # Not bound to log context: a WebSocket outlives its handshake request.
        self.set_header("X-Request-ID", self._bind_request_id(bind_logs=False))

    # -- handshake -----------------------------------------------------------

    @property
    def max_message_size(self) -> int:
        """Frames up to this size are read whole, so one over max_body_size is answered 413, not dropped.

        As for HTTP bodies (handlers/body.py), reading goes on up to DRAIN_LIMIT;
        past that Tornado closes the connection 1009 without reading the frame.
        """
        return max(self.broker.settings.max_body_size, DRAIN_LIMIT)

    @property
    def ping_interval(self) -> float | None:
        """Tornado's own pings find dead publishers (follower sockets are pinged by their actors)."""
        return self.broker.settings.ws_ping_interval or None

    @property
    def ping_timeout(self) -> float | None:
        return self.broker.settings.ws_ping_timeout

    def check_origin(self, origin: str) -> bool:
        """Browsers: the configured origins, as for every WebSocket (docs/protocol.md section 5); 403 otherwise."""
        return origin_allowed(origin, self.request.host, self.broker.settings.allowed_origins)

    def _offered_key(self) -> str | None:
        """The key offered as subprotocols `bearer, KEY` (for clients that cannot set headers), if any."""
        offered = [p.strip() for p in self.request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
        if "bearer" not in offered:
            return None
        return next((p for p in offered if p and p != "bearer"), None)

    def prepare(self) -> None:
        """Refuse before upgrading: 401/403 as every POST is refused, 503 while draining."""
        authorization = self.request.headers.get("Authorization")
        if authorization is None:
            key = self._offered_key()
            authorization = "" if key is None else f"Bearer {key}"
        refusal = publisher_refusal(self.broker.settings.api_keys, authorization, self.request.remote_ip)
        if refusal is None and self.broker.draining:
            refusal = (503, "server is shutting down")
        if refusal is None:
            return
        status, error = refusal
        if status == 401:
            self.set_header("WWW-Authenticate", 'Bearer realm="actor-broker"')
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(orjson.dumps({"error": error}))

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        """A browser needs one of its offered subprotocols back: `bearer` when it sent its key that way."""
        return "bearer" if "bearer" in subprotocols else None

    def open(self, *args: Any, **kwargs: Any) -> None:
        """The handshake passed: count the socket among the broker's connections, for shutdown."""
        ref = PublisherActor.start(self)
        # No session and no user: "" is no session id, so the per-session counts are not touched.
        self.connection = OpenConnection(self.connection_id, "", None, ref)
        self.broker.connections[self.connection_id] = self.connection
        log.info("publisher_connected", connection_id=self.connection_id, remote_ip=self.request.remote_ip)

    # -- frames in -----------------------------------------------------------

    def on_message(self, message: str | bytes) -> Awaitable[None] | None:
        """Queue the frame for its answer; hold reading while `max_publish_inflight` are unanswered.

        Called by Tornado on the loop for every frame, in order; it awaits
        what this returns before it reads the next frame.
        """
        connection = self.ws_connection
        if connection is None or connection.is_closing():
            return None  # frames after our close frame are not publishes (a frame read before it is answered)
        self._queue.append(message.encode() if isinstance(message, str) else message)
        self._unanswered += 1
        self._frames += 1
        if self._worker is None:
            self._answer_alone()
        if self._stop_reading or self._unanswered >= self.broker.settings.max_publish_inflight:
            if self._held is None or self._held.done():
                self._held = asyncio.get_running_loop().create_future()
            return self._held
        return None

    def _release(self) -> None:
        """Let Tornado read again."""
        held, self._held = self._held, None
        if held is not None and not held.done():
            held.set_result(None)

    def _answer_alone(self) -> None:
        """A frame that arrived with nothing ahead of it: answered in this call when it can be.

        A publisher that waits for each answer, or paces its frames, sends
        them one at a time; a task and a loop turn per frame would cost more
        than the publish itself (memory backend, idle session). A refusal and
        a publish the session takes at once are answered here; a publish that
        must wait (a busy session, Redis) goes on in the task that answers
        whatever queues up behind it.
        """
        frame = self._check(self._queue.popleft(), set())
        if isinstance(frame, bytes):
            self._write_answers([frame])
        else:
            answers = self._publish_at_once([frame], frame.events)
            if answers is None:
                self._worker = asyncio.ensure_future(self._answer_queue(frame))
                return
            self._write_answers(answers)
        self._close_if_answered()

    async def _answer_queue(self, first: _Publish | None = None) -> None:
        """Answer queued frames in order until none is left; runs as one task per burst of frames.

        `first` is a frame already checked and taken off the queue (by `_answer_alone`), answered first.
        """
        try:
            if first is not None:
                self._write_answers(await self._publish_waiting([first], first.events))
            while self._queue:
                await self._answer_some()
        finally:
            self._worker = None
            self._close_if_answered()

    async def _answer_some(self) -> None:
        """Check every queued frame, publish each run of good ones with one `Broker.publish`, answer all."""
        ready: list[bytes] = []
        run = _Run()
        while self._queue:
            outcome = self._check(self._queue.popleft(), run.new_sessions)
            if isinstance(outcome, _Publish) and run.takes(outcome):
                run.add(outcome, self.broker)
                continue
            if run.frames:  # the run ends here: publish it before answering what follows
                ready += await self._publish(run.frames)
                run = _Run()
            if isinstance(outcome, _Publish):
                run.add(outcome, self.broker)
            else:
                ready.append(outcome)
        if run.frames:
            ready += await self._publish(run.frames)
        self._write_answers(ready)

    def _check(self, data: bytes, new_sessions: set[str]) -> _Publish | bytes:
        """A frame's checks, in the order `POST /api/events` makes them; its refusal answer, or what to publish.

        `new_sessions` are the sessions the frames ahead of it (not yet
        published) will create: max_sessions counts them as created.
        """
        ref = _NO_REF
        try:
            settings = self.broker.settings
            if len(data) > settings.max_body_size:
                self.broker.stats.refused("max_body_size")
                error = f"body of {len(data)} bytes is over max_body_size ({settings.max_body_size})"
                raise FrameRefused(413, error, ref=ref_of(data))
            if self.broker.draining:
                raise FrameRefused(503, "server is shutting down", ref=ref_of(data))
            ref, items = read_frame(data)
            if len(items) > MAX_BATCH_EVENTS:
                self.broker.stats.refused("max_batch_events")
            events = normalize_events(items, session_id=None, now=time.time(), owned=True)  # parsed for this alone
            refusal = self.broker.admit_sessions({event["session_id"] for event in events} | new_sessions)
            if refusal is not None:
                raise FrameRefused(503, refusal)
        except FrameRefused as exc:
            return self._refuse(ref if exc.ref is _NO_REF else exc.ref, exc)
        except ValidationFailed as exc:
            return self._refuse(ref, FrameRefused(422, str(exc), exc.details))
        except BadRequest as exc:
            return self._refuse(ref, FrameRefused(400, str(exc)))
        except Exception:  # a bug, not an answer: logged once, answered as HTTP would (500); the socket lives on
            log.exception("publish_frame_failed", connection_id=self.connection_id, frames=1)
            return self._refuse(ref, FrameRefused(500, "internal server error"))
        return _Publish(ref, events)

    def _refuse(self, ref: Any, refusal: FrameRefused) -> bytes:
        self._refused += 1
        log.debug("publish_frame_refused", connection_id=self.connection_id, status=refusal.status, error=refusal.error)
        return answer(ref, refusal_body(refusal))

    async def _publish(self, run: list[_Publish]) -> list[bytes]:
        """Publish a run of frames as one batch; their answers, in order (each frame its own seqs)."""
        events = [event for frame in run for event in frame.events]
        answers = self._publish_at_once(run, events)
        return answers if answers is not None else await self._publish_waiting(run, events)

    async def _publish_waiting(self, run: list[_Publish], events: list[dict[str, Any]]) -> list[bytes]:
        """`_publish` once the session could not take it at once: the awaited ask of a busy session, or Redis."""
        try:
            seqs = await self.broker.publish(events)
        except Exception as exc:  # noqa: BLE001 - answered, as HTTP would answer it
            return self._publish_failed(run, exc)
        return self._accepted(run, events, seqs)

    def _publish_at_once(self, run: list[_Publish], events: list[dict[str, Any]]) -> list[bytes] | None:
        """The run's answers when the session's actor took it at once (memory backend, idle); None to wait."""
        try:
            seqs = self.broker.publish_now(events)
        except Exception as exc:  # noqa: BLE001 - answered, as HTTP would answer it
            return self._publish_failed(run, exc)
        return None if seqs is None else self._accepted(run, events, seqs)

    def _publish_failed(self, run: list[_Publish], exc: Exception) -> list[bytes]:
        if isinstance(exc, BackendUnavailable):  # docs/protocol.md section 7: unknown outcome, retry with the same ids
            return [self._refuse(frame.ref, FrameRefused(503, "backend unavailable")) for frame in run]
        # a bug, not an answer: logged once, each frame answered as HTTP would (500)
        log.error("publish_frame_failed", connection_id=self.connection_id, frames=len(run), exc_info=exc)
        return [self._refuse(frame.ref, FrameRefused(500, "internal server error")) for frame in run]

    def _accepted(self, run: list[_Publish], events: list[dict[str, Any]], seqs: list[int | None]) -> list[bytes]:
        self._events += len(events)
        answers = []
        start = 0
        for frame in run:
            mine = seqs[start : start + len(frame.events)]
            start += len(frame.events)
            answers.append(answer(frame.ref, {"accepted": len(mine), "seq": mine}))
        return answers

    # -- answers out ---------------------------------------------------------

    def _write_answers(self, answers: list[bytes]) -> None:
        """Hand answers to the socket in one write; they count as answered once the kernel has them."""
        if not answers:
            return
        count = len(answers)
        future = self._write(b"".join(websocket_frame(data) for data in answers))
        if future is None or future.done():
            if future is not None and not future.cancelled():
                future.exception()  # a closed socket: nobody left to answer
            self._answered(count)
            return

        def flushed(done: asyncio.Future[None]) -> None:
            if not done.cancelled():
                done.exception()  # a closed socket: nobody left to answer
            self._answered(count)

        future.add_done_callback(flushed)

    def _write(self, wire: bytes) -> asyncio.Future[None] | None:
        """Write frames straight to the stream (as handlers.ws.SocketTransport does); None if it is closed."""
        connection = self.ws_connection
        if connection is None or connection.stream is None or connection.is_closing():
            return None
        try:
            return connection.stream.write(wire)
        except StreamClosedError:
            return None

    def _answered(self, count: int) -> None:
        self._unanswered -= count
        if not self._stop_reading and self._unanswered < self.broker.settings.max_publish_inflight:
            self._release()

    # -- shutdown (told by PublisherActor) -------------------------------------

    def notify(self, frame: Frame) -> None:
        """A connection-level message for every client (`server_shutdown`): send it, and read no more frames."""
        self._stop_reading = True
        future = self._write(websocket_frame(frame.data))
        if future is not None and future.done() and not future.cancelled():
            future.exception()

    def shut(self, close: CloseConnection) -> None:
        """Close: at once, or (graceful) once every frame read has been answered."""
        self._stop_reading = True
        if close.immediately:
            self._close_now(close.code, close.reason)
            return
        self._close_when_answered = (close.code, close.reason)
        self._close_if_answered()

    def _close_if_answered(self) -> None:
        if self._close_when_answered is not None and not self._queue and self._worker is None:
            self._close_now(*self._close_when_answered)

    def _close_now(self, code: int, reason: str) -> None:
        self._close_when_answered = (code, reason)
        self._release()  # Tornado reads on, to see the client's close frame
        with contextlib.suppress(StreamClosedError):
            self.close(code, reason)

    def on_close(self) -> None:
        """The socket closed (either side): it leaves the broker's connections; its actor stops."""
        self._release()
        connection, self.connection = self.connection, None
        if connection is None:
            return
        self.broker.connection_closed(connection)
        with contextlib.suppress(Exception):
            connection.ref.stop(block=False)
        log.info(
            "publisher_closed",
            connection_id=self.connection_id,
            code=self.close_code,
            frames=self._frames,
            events=self._events,
            refused=self._refused,
            unanswered=len(self._queue),
        )
