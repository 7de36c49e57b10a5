"""The WebSocket endpoints: `/ws` and `/ws/research/{session_id}`.

A thin adapter. The handshake's parameters are checked by
handlers/handshake.py, as for SSE (close 1008 before any data); then a
ConnectionActor owns the socket: frames from the client are told to it,
and it writes back through this handler as its Transport. The handler
keeps no session state.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from types import TracebackType
from typing import Any

import structlog
import tornado.websocket
from pykka import ActorDeadError
from tornado.iostream import IOStream, StreamClosedError
from tornado.websocket import WebSocketProtocol

from actors.messages import ClientMessage, Frame, TransportClosed
from actors.wire import CloseCode
from broker.core import Broker, OpenConnection
from broker.tokens import TokenError, looks_like_jwt
from handlers.base import RequestIdMixin
from handlers.handshake import (
    HANDSHAKE_ARGUMENTS,
    HandshakeArguments,
    HandshakeError,
    claimed_user,
    grant_token,
    parse_handshake,
)
from handlers.origins import origin_allowed

log = structlog.get_logger("actor_broker.ws")

#: The name of each connection's frame-reading task (a test harness waits for them before closing its loop).
FRAME_LOOP = "websocket-frames"


class BrokerWebSocket(RequestIdMixin, HandshakeArguments, tornado.websocket.WebSocketHandler):
    # Ours in slots: Tornado's ~27 attributes then still fit a shared-key
    # instance dict (at most 30 keys), ~1.3 KiB less per connection.
    __slots__ = (
        "_frames",
        "_handshake",
        "_protocol_token",
        "_undecodable",
        "broker",
        "connection",
        "request_id",
        "session_id",
        "transport",
        "user_id",
    )
    greeting_type = "connected"
    default_replay = "missed"

    @property
    def max_message_size(self) -> int:
        """How large a frame Tornado reads in full before handing it to on_message.

        Larger than max_message_size on purpose: Tornado refuses an oversize
        frame by closing 1009 and tearing the socket down with the frame's
        bytes unread, and the resulting TCP reset can destroy the close frame
        before the client reads it. Frames up to this size are read and then
        refused in on_message with a clean close 1009; only a frame past 16x
        the limit meets Tornado's own abrupt refusal.
        """
        return 16 * self.broker.settings.max_message_size

    def set_default_headers(self) -> None:
        # Not bound to log context: a WebSocket outlives its handshake request.
        self.set_header("X-Request-ID", self._bind_request_id(bind_logs=False))

    def initialize(self, broker: Broker) -> None:
        # Every instance attribute Tornado sets later, set now, while the first handler is being
        # built: CPython 3.11 shares one key table among a class's instances only for keys added
        # before ~30 instances exist, and a burst of handshakes (a reconnect storm) builds that
        # many before any reaches `get`. A key added after that gives every handler a private
        # dict (~0.9 KiB). tests/test_footprint.py opens such a burst on a fresh class.
        self._transforms = self.path_args = self.path_kwargs = self.open_args = self.open_kwargs = None  # type: ignore[assignment]
        self.ws_connection = self.close_code = self.close_reason = None
        self._on_close_called = False
        self.broker = broker
        self.connection: OpenConnection | None = None
        self.session_id: str | None = None
        self.user_id: str | None = None
        self.transport: SocketTransport | None = None
        self._protocol_token: str | None = None
        #: until `open`: what `get` waits for; then the task that reads the frames
        self._handshake: asyncio.Future[None] | None = None
        self._frames: asyncio.Future[None] | None = None
        #: the first handshake argument that was not UTF-8 (see decode_argument)
        self._undecodable: str | None = None

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        """Browsers cannot set headers on a WebSocket: a token may come as a subprotocol.

        Offer `["bearer", "<jwt>"]` (or the JWT alone); the server answers with
        "bearer" (or the JWT), as browsers require one of the offered values back.
        """
        for protocol in subprotocols:
            if looks_like_jwt(protocol):
                self._protocol_token = protocol
                return "bearer" if "bearer" in subprotocols else protocol
        return None

    # -- handshake -----------------------------------------------------------

    def check_origin(self, origin: str) -> bool:
        """Browsers only: the configured origins (docs/protocol.md section 6); 403 otherwise."""
        return origin_allowed(origin, self.request.host, self.broker.settings.allowed_origins)

    def prepare(self) -> None:
        """Refuse a handshake over a limit (or while draining) with 503, before upgrading.

        Done here rather than in an async `get` override so no extra coroutine
        frame stays alive for the connection's whole life.
        """
        refusal = self.broker.admit_connection(self._raw_session_id(*self.path_args) or "", self._claimed_user())
        if refusal is not None:
            self.set_status(503)
            self.set_header("Content-Type", "application/json")
            self.finish({"error": refusal})

    def _raw_session_id(self, *args: Any) -> str | None:
        return self.get_query_argument("session_id", None)

    def _claimed_user(self) -> str | None:
        """The user a handshake claims, for the per-user limit (checked before the token is)."""
        token = self.get_query_argument("token", None)
        if token is None and self.broker.tokens.required:
            offered = self.request.headers.get("Sec-WebSocket-Protocol", "")
            token = next((p for p in (s.strip() for s in offered.split(",")) if looks_like_jwt(p)), None)
        return claimed_user(self.get_query_argument("user_id", None), token, self.broker.tokens)

    async def get(self, *args: Any, **kwargs: Any) -> None:
        """The upgrade; returns once the handshake is answered, while the frames are read on.

        Tornado's own `get` keeps the request's headers in its locals and
        awaits the frame loop, so its frame, the request task's and the
        request's headers would live as long as the socket. Here the headers
        are read in `_upgrade` (its frame is gone when it returns) and the
        frame loop runs in a task of its own: once `open` ran, this request
        is over and only the frame loop remains.
        """
        protocol = self._upgrade(args, kwargs)
        if protocol is None:
            return
        loop = asyncio.get_running_loop()
        handshake = self._handshake = loop.create_future()
        frames = self._frames = loop.create_task(protocol.accept_connection(self), name=FRAME_LOOP)
        frames.add_done_callback(self._frames_ended)
        await handshake  # `open` resolves it, or the frame task's end (with its error, if any)

    def _handshake_done(self, error: BaseException | None = None) -> None:
        handshake, self._handshake = self._handshake, None
        if handshake is not None and not handshake.done():
            if error is None:
                handshake.set_result(None)
            else:
                handshake.set_exception(error)  # raised in `get`: Tornado answers 500 if nothing was sent

    def _frames_ended(self, frames: asyncio.Future[None]) -> None:
        """The frame loop's task ended: the socket is closed (on_close ran), or it failed."""
        self._frames = None
        error = None if frames.cancelled() else frames.exception()
        if self._handshake is not None:
            self._handshake_done(error)
        elif error is not None:
            self.log_exception(type(error), error, error.__traceback__)

    def _upgrade(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> WebSocketProtocol | None:
        """The protocol to accept the connection with, or None once the refusal is answered (RFC 6455 4.2.1)."""
        headers = self.request.headers
        tokens = {token.strip().lower() for token in headers.get("Connection", "").split(",")}
        if headers.get("Upgrade", "").lower() != "websocket" or "upgrade" not in tokens:
            self.set_status(400)
            self.finish("a WebSocket handshake needs 'Upgrade: websocket' and 'Connection: Upgrade'")
            return None
        if self._cross_origin_refused(headers):
            self.set_status(403)
            self.finish("Cross origin websockets not allowed")
            return None
        self.open_args, self.open_kwargs = args, kwargs
        self.ws_connection = protocol = self.get_websocket_protocol()
        if protocol is None:
            self.set_status(426, "Upgrade Required")
            self.set_header("Sec-WebSocket-Version", "13")
        return protocol

    def _cross_origin_refused(self, headers: Any) -> bool:
        """Tornado's cross-origin rule (Sec-Fetch-Site, then Origin against check_origin) where this
        Tornado has one; with an older one, the Origin header alone, as Tornado used to check it."""
        check = getattr(self, "_check_cross_origin", None)
        if check is not None:
            return check(self.check_origin) is not None
        origin = headers.get("Origin")
        return origin is not None and not self.check_origin(origin)

    def open(self, *args: Any, **kwargs: Any) -> None:
        self._handshake_done()  # the 101 is out: the request's task may end
        try:
            params = self._parse(*args)
        except HandshakeError as exc:
            self.close(CloseCode.POLICY_VIOLATION, str(exc)[:120])
            return
        try:
            grant_token(self.broker.tokens, self.get_query_argument("token", None) or self._protocol_token, params)
        except TokenError as exc:
            self.close(exc.code, exc.reason)
            return
        self.session_id = params["session_id"]
        self.user_id = params["user_id"]
        self.transport = SocketTransport(self)
        self.connection = self.broker.open_connection(
            greeting_type=self.greeting_type, transport=self.transport, remote_ip=self.request.remote_ip, **params
        )
        self._forget_handshake()

    def _forget_handshake(self) -> None:
        """Drop what only the handshake needed: the connection may live for hours, idle.

        The request (its headers and arguments, and behind it Tornado's
        HTTP/1.1 connection objects and per-request context), the response
        headers, the path arguments and the template namespace are read only
        until the socket is detached; `log_exception` below does without the
        request. What stays is what frames in and out need.
        """
        self.request = None
        self.request_id = None
        self._protocol_token = None
        self.path_args = self.path_kwargs = None  # type: ignore[assignment]
        self._headers = self._write_buffer = self._transforms = None  # type: ignore[assignment]
        self.ui = None  # type: ignore[assignment]  # as Tornado's own _break_cycles does at the close

    def _detach_stream(self) -> IOStream:
        """Take the socket over from HTTP, as Tornado's does, minus its seven per-handler method overrides.

        Tornado shadows write, finish, set_header and four others with
        instance attributes that raise, so that a handler cannot write HTTP
        after the upgrade: seven instance keys that no handler has until its
        upgrade, which is too late to join the key table CPython shares
        between a class's instances (see `initialize`), so every handler got
        a private dict of ~1.5 KiB. Here the handler is finished and its
        request forgotten after the handshake, so such a call fails anyway
        (write and finish raise "after finish()", set_header finds no headers).
        """
        return self.detach()

    def _request_summary(self) -> str:
        """For Tornado's log lines once the request is forgotten."""
        if self.request is None:
            return f"WebSocket {self.connection.connection_id if self.connection else '(closed)'}"
        return super()._request_summary()

    def log_exception(self, typ: Any, value: BaseException | None, tb: TracebackType | None) -> None:
        """An error in a frame callback: logged with the connection's ids, not the (forgotten) request."""
        if self.request is not None:
            super().log_exception(typ, value, tb)
            return
        log.error(
            "websocket_callback_failed", session_id=self.session_id,
            connection_id=self.connection.connection_id if self.connection else None, exc_info=(typ, value, tb),
        )  # fmt: skip

    def _parse(self, *args: Any) -> dict[str, Any]:
        # Every argument is decoded before any check, so one that is not UTF-8 is seen first.
        arguments = {name: self.get_query_argument(name, None) for name in HANDSHAKE_ARGUMENTS}
        return parse_handshake(
            arguments,
            self._raw_session_id(*args),
            presets=self.broker.settings.presets,
            default_replay=self.default_replay,
            undecodable=self._undecodable,
        )

    # -- frames in -----------------------------------------------------------

    def on_pong(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.ponged = True

    def on_message(self, message: str | bytes) -> None:
        if _too_big(message, self.broker.settings.max_message_size):
            self.close(CloseCode.MESSAGE_TOO_BIG, "message too big")
            return
        connection = self.connection
        if connection is not None and connection.ref.is_alive():  # frames after our close are dropped
            with contextlib.suppress(ActorDeadError):
                connection.ref.tell(ClientMessage(message))

    def on_close(self) -> None:
        self.transport = None  # handler <-> transport is a cycle; the actor keeps what it needs
        connection, self.connection = self.connection, None
        if connection is not None:
            if connection.ref.is_alive():
                with contextlib.suppress(ActorDeadError):
                    connection.ref.tell(TransportClosed(self.close_code, self.close_reason))
            self.broker.connection_closed(connection)


def websocket_frame(payload: bytes) -> bytes:
    """An unmasked, uncompressed, final text frame (RFC 6455 section 5.2).

    Server-to-client frames are not masked, so one message is the same bytes
    for every connection: built once, shared by all (Frame.wire). A frame
    without RSV1 is valid even where permessage-deflate was negotiated.
    """
    n = len(payload)
    if n < 126:
        header = bytes((0x81, n))
    elif n <= 0xFFFF:
        header = b"\x81\x7e" + n.to_bytes(2, "big")
    else:
        header = b"\x81\x7f" + n.to_bytes(8, "big")
    return header + payload


def _too_big(message: str | bytes, limit: int) -> bool:
    """Over `limit` bytes on the wire (UTF-8 for text); encodes only when it could be."""
    size = len(message)
    if isinstance(message, bytes) or size > limit:
        return size > limit
    return size * 4 > limit and len(message.encode("utf-8", "surrogatepass")) > limit


class SocketTransport:
    """The ConnectionActor's view of a Tornado WebSocket: write frames, close.

    Writes go straight to the IOStream as prebuilt frames, one stream write
    per batch, instead of one `write_message` (framing + write) per message.
    """

    __slots__ = ("handler", "ponged")
    kind = "websocket"

    def __init__(self, handler: tornado.websocket.WebSocketHandler) -> None:
        self.handler = handler
        self.ponged = True

    def probe(self) -> None:
        self.ponged = False
        with contextlib.suppress(tornado.websocket.WebSocketClosedError, StreamClosedError):
            self.handler.ping()

    def probe_answered(self) -> bool:
        return self.ponged

    def write(self, frames: list[Frame], on_flushed: Callable[[], None]) -> bool:
        connection = self.handler.ws_connection
        if connection is None or connection.stream is None or connection.is_closing():
            raise tornado.websocket.WebSocketClosedError()
        wires = []
        for frame in frames:
            wire = frame.wire
            if wire is None:
                wire = frame.wire = websocket_frame(frame.data)
            wires.append(wire)
        future = connection.stream.write(wires[0] if len(wires) == 1 else b"".join(wires))
        if future.done():  # the kernel took it all: no callback round trip
            if not future.cancelled() and future.exception() is not None:
                raise tornado.websocket.WebSocketClosedError()
            return True

        def done(f: asyncio.Future[None]) -> None:
            if f.cancelled() or f.exception() is not None:
                return  # the socket closed; on_close tells the actor
            on_flushed()

        future.add_done_callback(done)
        return False

    def close(self, code: int, reason: str) -> None:
        with contextlib.suppress(StreamClosedError):
            self.handler.close(code, reason)


class ResearchWebSocket(BrokerWebSocket):
    """`/ws/research/{session_id}`: the session in the path; replays everything by default."""

    greeting_type = "connection_established"
    default_replay = "all"

    def _raw_session_id(self, *args: Any) -> str | None:
        return args[0] if args else None
