"""The Server-Sent Events endpoints: `/sse` and `/sse/research/{session_id}` (docs/protocol.md section 8).

For clients that cannot use WebSockets. The handshake takes the WebSocket's
parameters (handlers/handshake.py) plus a `Last-Event-ID` header; then a
ConnectionActor owns the response exactly as it owns a WebSocket, writing
through `EventStreamTransport`, so throttling, filters, limits, tokens,
slow-consumer handling, drain and stats are the same code on both wires.
Clients send nothing over SSE.

A refusal the WebSocket answers with a close code before any data is an
HTTP status with `{"error": ..., "code": <close code>}` here. That covers the
session's own refusal too (`last_seq` beyond its newest seq): the response's
headers go out with the first write, the greeting, so a close that comes
before it can still be a 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from pykka import ActorDeadError
from tornado.ioloop import IOLoop
from tornado.iostream import StreamClosedError

from actors.messages import Frame, TransportClosed
from actors.wire import CloseCode, error_frame
from broker.core import Broker, OpenConnection
from broker.tokens import TokenError
from handlers.base import ApiHandler
from handlers.handshake import (
    HANDSHAKE_ARGUMENTS,
    HandshakeArguments,
    HandshakeError,
    claimed_user,
    grant_token,
    parse_handshake,
    parse_last_seq,
)
from handlers.origins import origin_allowed

#: The stream's first bytes: EventSource waits this long before it reconnects.
PREAMBLE = b"retry: 2000\n\n"
#: A keepalive as an SSE comment: it keeps proxies from timing out and reaches no handler.
KEEPALIVE = b": keepalive\n\n"
#: Seconds a stream the server ended may take for its last bytes before its socket is closed
#: (a slow consumer's reader may never take them), as Tornado gives a WebSocket's close frame.
CLOSE_GRACE = 5.0
_LAST_EVENT_ID_FORMAT = "Last-Event-ID must be <epoch>/<seq>, as in the id of an event"
_SLOW_CONSUMER = "the stream was not read fast enough (max_queue_bytes); reconnect with Last-Event-ID"


def event_stream_encoding(frame: Frame) -> bytes:
    """A frame as one SSE event, made once and kept on the frame for every SSE connection.

    A session message gets `id: <epoch>/<seq>`, so a browser's reconnect
    sends it back as Last-Event-ID; a connection-level one gets no id (the
    browser keeps the last one). `data` is orjson's output, which never holds
    a raw line break, so it is one `data:` line. The epoch is read from the
    JSON once per frame, not per connection.
    """
    encoded = frame.sse
    if encoded is None:
        if frame.seq is None:
            encoded = KEEPALIVE if frame.type == "keepalive" else b"data: " + frame.data + b"\n\n"
        else:
            epoch = orjson.loads(frame.data)["epoch"]
            encoded = b"id: %s/%d\ndata: %s\n\n" % (epoch.encode(), frame.seq, frame.data)
        frame.sse = encoded
    return encoded


def parse_last_event_id(value: str) -> tuple[str, int]:
    """`<epoch>/<seq>` as (epoch, last_seq); HandshakeError for anything else."""
    epoch, slash, seq = value.rpartition("/")
    if not slash or not epoch:
        raise HandshakeError(_LAST_EVENT_ID_FORMAT)
    try:
        return epoch, parse_last_seq(seq, "Last-Event-ID")
    except HandshakeError:
        raise HandshakeError(_LAST_EVENT_ID_FORMAT) from None


def refusal_status(code: int) -> int:
    """The HTTP status that stands for a close code sent before any data."""
    match code:
        case CloseCode.POLICY_VIOLATION:
            return 400
        case CloseCode.UNAUTHORIZED:
            return 401
        case CloseCode.FORBIDDEN:
            return 403
        case CloseCode.GOING_AWAY:
            return 503
        case _:
            return 500


class EventStreamHandler(HandshakeArguments, ApiHandler):
    """`GET /sse?session_id=ID[&...]`: a session's messages as a `text/event-stream` response."""

    greeting_type = "connected"
    default_replay = "missed"

    def initialize(self, broker: Broker) -> None:
        super().initialize(broker)
        self.connection: OpenConnection | None = None
        self.transport: EventStreamTransport | None = None
        self._undecodable: str | None = None
        #: resolves when the stream ended (by either side); `get` returns it to Tornado
        self._ended: asyncio.Future[None] | None = None

    def set_default_headers(self) -> None:
        """ApiHandler's headers, but the request id is not bound to log context: the stream outlives its request."""
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("X-Request-ID", self._bind_request_id(bind_logs=False))
        if getattr(self, "broker", None) is not None:  # tornado calls this once before initialize()
            self._allow_origin()

    def options(self, *args: Any) -> None:
        """A CORS preflight (a fetch-based client sending Last-Event-ID or Authorization itself)."""
        if not self.request.headers.get("Origin") or not self._allow_origin():
            self.fail(403, "this origin may not follow sessions (see allowed_origins)")
            return
        self.set_header("Access-Control-Allow-Methods", "GET, OPTIONS")
        self.set_header("Access-Control-Allow-Headers", "Authorization, Cache-Control, Last-Event-ID, X-Request-ID")
        self.set_header("Access-Control-Max-Age", "600")
        self.set_status(204)
        self.finish()

    # -- handshake -----------------------------------------------------------

    def prepare(self) -> None:
        """Browsers from other origins: 403 unless allowed; then 503 over a limit or while draining."""
        if self.request.method != "GET":
            return
        settings = self.broker.settings
        if not origin_allowed(self.request.headers.get("Origin"), self.request.host, settings.allowed_origins):
            self.fail(403, "this origin may not follow sessions (see allowed_origins)")
            return
        user = claimed_user(self.get_query_argument("user_id", None), self._token(), self.broker.tokens)
        refusal = self.broker.admit_connection(self._raw_session_id(*self.path_args) or "", user)
        if refusal is not None:
            self.fail(503, refusal)

    def _raw_session_id(self, *args: Any) -> str | None:
        return self.get_query_argument("session_id", None)

    def _token(self) -> str | None:
        """The `token` parameter, or a Bearer token in Authorization (for clients that can set headers)."""
        token = self.get_query_argument("token", None)
        if token is None:
            scheme, _, credentials = self.request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                token = credentials.strip()
        return token

    def get(self, *args: Any) -> Awaitable[None] | None:
        try:
            params = self._parse(*args)
            grant_token(self.broker.tokens, self._token(), params)
        except HandshakeError as exc:
            self.refuse_stream(CloseCode.POLICY_VIOLATION, str(exc))
            return None
        except TokenError as exc:
            self.refuse_stream(exc.code, exc.reason)
            return None
        self._ended = asyncio.get_running_loop().create_future()
        self.transport = EventStreamTransport(self)
        self.connection = self.broker.open_connection(
            greeting_type=self.greeting_type, transport=self.transport, remote_ip=self.request.remote_ip, **params
        )
        return self._ended  # Tornado keeps the response open until it resolves

    def _parse(self, *args: Any) -> dict[str, Any]:
        """The WebSocket's parameters; a `Last-Event-ID` (a browser's reconnect) wins for epoch and last_seq."""
        arguments = {name: self.get_query_argument(name, None) for name in HANDSHAKE_ARGUMENTS}
        params = parse_handshake(
            arguments,
            self._raw_session_id(*args),
            presets=self.broker.settings.presets,
            default_replay=self.default_replay,
            undecodable=self._undecodable,
        )
        last_event_id = self.request.headers.get("Last-Event-ID", "").strip()
        if last_event_id:
            params["epoch"], params["last_seq"] = parse_last_event_id(last_event_id)
        return params

    def refuse_stream(self, code: int, reason: str) -> None:
        """A refusal before any data: the status for `code`, with the code in the body (not for 503)."""
        status = refusal_status(code)
        body: dict[str, Any] = {"error": reason} if status == 503 else {"error": reason, "code": int(code)}
        self.send_json(status, body)

    # -- the stream ----------------------------------------------------------

    def start_stream(self, payload: bytes) -> Any:
        """Headers, the retry line and the first events, in one write; the write's future."""
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")  # nginx: pass events on as they come
        self.write(PREAMBLE)
        self.write(payload)
        flushed = self.flush()
        self._forget_handshake()
        return flushed

    def _forget_handshake(self) -> None:
        """Once the response's headers are out: drop what only the handshake read.

        The stream keeps its request (Tornado writes the rest of the response
        through it), but not the request's arguments, and its header table is
        emptied in place: Tornado's own request frames hold the same table for
        as long as the response lasts. Nothing reads either from here on (the
        access line at the end takes the request id kept on the handler).
        """
        request = self.request
        request.arguments.clear()
        request.query_arguments.clear()
        headers = request.headers
        for name in list(headers):
            del headers[name]

    def end_stream(self, tail: bytes) -> None:
        """Write `tail`, end the response, and close the connection once the tail has gone out.

        An ended stream's connection is never reused (EventSource reconnects
        on a new one), so it is closed as soon as the tail is in the kernel's
        hands (which still delivers it, then the FIN); a reader that does not
        take it within CLOSE_GRACE loses its socket. Left open, a client that
        never reads would hold its descriptor as long as it liked.
        """
        stream = getattr(self.request.connection, "stream", None)
        self.finish(tail)
        if stream is None or stream.closed():
            return
        try:
            drained = stream.write(b"")  # resolves once everything written so far has gone out
        except StreamClosedError:
            return
        if drained.done():
            stream.close()
            return
        io_loop = IOLoop.current()
        timer = io_loop.call_later(CLOSE_GRACE, stream.close)

        def gone_out(_: object) -> None:
            io_loop.remove_timeout(timer)
            stream.close()

        drained.add_done_callback(gone_out)

    def on_connection_close(self) -> None:
        """The client went away (or its socket was closed)."""
        super().on_connection_close()
        self._stream_ended()

    def on_finish(self) -> None:
        super().on_finish()
        self._stream_ended()

    def _stream_ended(self) -> None:
        """Either side ended the stream: the actor stops, the connection no longer counts. Idempotent."""
        if self.transport is not None:
            self.transport.ended = True
        connection, self.connection = self.connection, None
        if connection is not None:
            if connection.ref.is_alive():
                with contextlib.suppress(ActorDeadError):
                    connection.ref.tell(TransportClosed())
            self.broker.connection_closed(connection)
        ended = self._ended
        if ended is not None and not ended.done():
            ended.set_result(None)


class ResearchEventStreamHandler(EventStreamHandler):
    """`/sse/research/{session_id}`: the session in the path; replays everything by default."""

    greeting_type = "connection_established"
    default_replay = "all"

    def _raw_session_id(self, *args: Any) -> str | None:
        return args[0] if args else None


class EventStreamTransport:
    """The ConnectionActor's view of an SSE response: events out, the end of the stream.

    Frames go to the HTTP connection as their cached SSE encoding, one write
    per batch; a write the socket did not take at once is reported through
    `on_flushed`, so a client that stops reading lets its queue grow to
    max_queue_bytes and is ended as a slow consumer, as on a WebSocket.
    """

    __slots__ = ("ended", "handler", "started")
    kind = "sse"

    def __init__(self, handler: EventStreamHandler) -> None:
        self.handler = handler
        #: the headers went out (with the first write)
        self.started = False
        #: the response is over (either side ended it)
        self.ended = False

    def write(self, frames: list[Frame], on_flushed: Callable[[], None]) -> bool:
        if self.ended:
            raise StreamClosedError()
        payload = (
            event_stream_encoding(frames[0])
            if len(frames) == 1
            else b"".join([event_stream_encoding(frame) for frame in frames])
        )
        if self.started:
            connection = self.handler.request.connection
            assert connection is not None
            future = connection.write(payload)
        else:
            self.started = True
            future = self.handler.start_stream(payload)
        if future.done():  # the kernel took it all: no callback round trip
            if future.cancelled() or future.exception() is not None:
                raise StreamClosedError()
            return True

        def done(f: Any) -> None:
            if f.cancelled() or f.exception() is not None:
                return  # the socket closed; on_connection_close tells the actor
            on_flushed()

        future.add_done_callback(done)
        return False

    def probe(self) -> None:
        """SSE has no ping: a dead peer shows as a failed write (keepalives write every keepalive_interval)."""

    def probe_answered(self) -> bool:
        return True

    def close(self, code: int, reason: str) -> None:
        if self.ended:
            return
        self.ended = True
        handler = self.handler
        if not self.started:
            handler.refuse_stream(code, reason)  # nothing was written: still an HTTP refusal
            return
        tail = b""
        if code == CloseCode.SLOW_CONSUMER:
            tail = event_stream_encoding(error_frame("slow_consumer", _SLOW_CONSUMER, time.time()))
        handler.end_stream(tail)
