"""ConnectionActor: one socket's outbound side, and the first reader of its input.

Outbound, a burst of frames already in its mailbox goes out in one write,
and while the socket has not taken a write, what arrives meanwhile waits in
its queue and goes out together in the next one (coalescing).
Unsent bytes are the queue plus the write in flight; replayed history does
not count. When live bytes pass `max_queue_bytes` the queue is compacted
(a task_progress superseded by a newer one for the same task is dropped),
and if that is not enough the connection is closed with 4008
`slow_consumer` (the client can come back with `last_seq`).

Inbound, it parses the client's frames, answers what it can (ping,
errors), and forwards the rest to its session.

It writes through a `Transport` (actors/transport.py), never a Tornado
handler, so it is tested with a recording fake.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from actors.filters import FilterError, parse_event_list
from actors.messages import (
    FLUSH_NOW,
    FLUSHED,
    KEEPALIVE_CHECK,
    ChangeFilter,
    ClientMessage,
    CloseConnection,
    DescribeConnection,
    Detach,
    Flushed,
    FlushNow,
    Frame,
    KeepaliveCheck,
    Replay,
    StartQuery,
    TokenExpiry,
    TransportClosed,
)
from actors.runtime import LoopActor
from actors.session import control_frame, iso_now

if TYPE_CHECKING:
    from pykka import ActorRef

    from actors.stats import BrokerStats
    from actors.transport import Transport
    from broker.config import Settings

log = structlog.get_logger("actor_broker.connection")

#: Most bytes handed to the transport in one write; replay goes out in parts this size.
WRITE_CHUNK = 64 * 1024
#: Window for counting a client's errors (PROTOCOL.md: a sliding 60 s).
ERROR_WINDOW = 60.0

SLOW_CONSUMER = 4008


class _Replayed:
    """A frame from history in the outbound queue: written like any other,
    but not counted towards max_queue_bytes and never compacted. Live frames
    are queued as they are, without a wrapper (the common case)."""

    __slots__ = ("frame",)

    def __init__(self, frame: Frame) -> None:
        self.frame = frame


class ConnectionActor(LoopActor):
    # One per client: slots instead of a 30-key instance dict save ~1.3 KiB each.
    __slots__ = (
        "_bucket",
        "_bucket_at",
        "_expiry_timer",
        "_keepalive_timer",
        "_next_ping",
        "_pong_due",
        "_refresh",
        "_settings_source",
        "_write_scheduled",
        "acked_seq",
        "closed",
        "connection_id",
        "errors",
        "expires_at",
        "inflight",
        "inflight_live_bytes",
        "last_write",
        "queue",
        "queued_live_bytes",
        "session",
        "session_id",
        "stats",
        "transport",
        "user_id",
    )

    def __init__(
        self,
        connection_id: str,
        session_id: str,
        session: ActorRef[Any],
        transport: Transport,
        settings_source: Any,
        stats: BrokerStats,
        user_id: str | None = None,
        expires_at: float | None = None,
        refresh: Callable[[str], float] | None = None,
    ) -> None:
        super().__init__()
        self.connection_id = connection_id
        self.user_id = user_id
        #: when the connection's token expires (wall clock), if it has one
        self.expires_at = expires_at
        #: checks a refresh token for this session and user: its expiry, or ValueError(reason)
        self._refresh = refresh
        self._expiry_timer: Any = None
        self._bucket = 0.0
        self._bucket_at = 0.0
        self.session_id = session_id
        self.session = session
        self.transport = transport
        self._settings_source = settings_source  # has .settings; reloads show up here
        self.stats = stats
        self.queue: deque[Frame | _Replayed | CloseConnection] | None = None
        self.queued_live_bytes = 0
        self.inflight_live_bytes = 0
        self.inflight = False
        self.closed = False
        self.acked_seq: int | None = None
        self.last_write = 0.0
        self.errors: deque[float] | None = None  # made at the first error
        self._keepalive_timer: Any = None
        self._next_ping = 0.0
        self._pong_due: float | None = None
        self._write_scheduled = False

    @property
    def log(self) -> Any:
        """A logger bound to this connection, made when something is logged (rarely), not kept."""
        return log.bind(session_id=self.session_id, connection_id=self.connection_id)

    @property
    def settings(self) -> Settings:
        return self._settings_source.settings

    # -- lifecycle ---------------------------------------------------------

    def on_start(self) -> None:
        self.stats.active_connections += 1
        self.last_write = self._bucket_at = self.clock.monotonic()
        self._next_ping = self.last_write + self.settings.ws_ping_interval
        self._bucket = float(self.settings.max_client_rate)
        self._arm_keepalive()
        self._arm_expiry()

    def on_stop(self) -> None:
        self._cleanup()

    def on_failure(self, *exc_info: Any) -> None:
        self._cleanup()
        self.transport.close(1011, "internal error")

    def _cleanup(self) -> None:
        self.stats.active_connections -= 1
        for timer in (self._keepalive_timer, self._expiry_timer):
            if timer is not None:
                timer.cancel()
        if self.session.is_alive():
            self.session.tell(Detach(self.connection_id))
        self.queue = None

    # -- dispatch ----------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        cls = message.__class__
        if cls is Frame:
            return self.enqueue(message, live=True)
        if cls is FlushNow:
            return self.flush_now()
        if cls is Flushed:
            return self.flushed()
        if cls is ClientMessage:
            return self.client_message(message.data)
        if cls is Replay:
            return self.replay(message.frames)
        if cls is CloseConnection:
            return self.close_request(message)
        if cls is KeepaliveCheck:
            return self.keepalive()
        if cls is TransportClosed:
            return self.transport_closed()
        if cls is TokenExpiry:
            return self.token_expired()
        if cls is DescribeConnection:
            return {
                "acked_seq": self.acked_seq,
                "queued_bytes": self.queued_live_bytes + self.inflight_live_bytes,
                "transport": self.transport.kind,
            }
        return super().on_receive(message)

    # -- outbound ----------------------------------------------------------

    def enqueue(self, frame: Frame, *, live: bool = True) -> None:
        if self.closed:
            return
        self._push(frame if live else _Replayed(frame))
        if live:
            self.queued_live_bytes += len(frame.data)
        if not self.inflight:
            if self.has_mail():
                self._schedule_write()  # more frames may be right behind: one write for all
            else:
                self._write_next()
        elif self.queued_live_bytes + self.inflight_live_bytes > self.settings.max_queue_bytes:
            self._over_limit()

    def _schedule_write(self) -> None:
        """Write after the frames already in the mailbox are queued too: one write for all."""
        if not self._write_scheduled:
            self._write_scheduled = True
            self.actor_ref.tell(FLUSH_NOW)

    def flush_now(self) -> None:
        self._write_scheduled = False
        if not self.inflight:
            self._write_next()

    def _push(self, item: Frame | _Replayed | CloseConnection) -> None:
        """Queue an item; the deque exists only while something waits (idle sockets are many)."""
        queue = self.queue
        if queue is None:
            queue = self.queue = deque()
        queue.append(item)

    def replay(self, frames: list[Frame]) -> None:
        if self.closed:
            return
        for frame in frames:
            self._push(_Replayed(frame))
        if not self.inflight:
            self._schedule_write()

    def _over_limit(self) -> None:
        limit = self.settings.max_queue_bytes
        if len(self.queue or ()) + (1 if self.inflight else 0) <= 1:
            return  # a single message, however large, is always written
        self._compact()
        if self.queued_live_bytes + self.inflight_live_bytes > limit:
            self.stats.slow_consumer_disconnects += 1
            self.log.info(
                "slow_consumer_closed",
                queued_bytes=self.queued_live_bytes + self.inflight_live_bytes,
                limit=limit,
            )
            self._close_now(SLOW_CONSUMER, "slow_consumer")

    def _compact(self) -> None:
        """Drop queued live task_progress superseded by a newer one for the same task."""
        newest: set[str] = set()
        kept: deque[Frame | _Replayed | CloseConnection] = deque()
        for item in reversed(self.queue or ()):
            if item.__class__ is Frame and item.task_id is not None:
                if item.task_id in newest:
                    self.queued_live_bytes -= len(item.data)
                    self.stats.compacted_messages += 1
                    continue
                newest.add(item.task_id)
            kept.appendleft(item)
        self.queue = kept

    def _write_next(self) -> None:
        """Write what is queued, a WRITE_CHUNK at a time, while the socket takes it at once.

        A socket that takes a write at once (the usual case) needs no
        round trip through on_flushed; one that does not is waited for,
        which is what flow-controls replay and lets a slow client's queue
        grow towards max_queue_bytes.
        """
        while self._write_chunk():
            pass

    def _write_chunk(self) -> bool:
        """One write of up to WRITE_CHUNK bytes; True if the socket took it at once and more waits."""
        queue = self.queue
        if not queue or self.closed:
            return False
        batch: list[Frame] = []
        size = 0
        live_bytes = 0
        while queue:
            item = queue[0]
            cls = item.__class__
            if cls is CloseConnection:
                if batch:
                    break  # close once what is before it is written
                queue.popleft()
                self._close_now(item.code, item.reason)
                return False
            frame = item if cls is Frame else item.frame
            if batch and size + len(frame.data) > WRITE_CHUNK:
                break
            queue.popleft()
            batch.append(frame)
            size += len(frame.data)
            if cls is Frame:
                live_bytes += len(frame.data)
        if not queue:
            self.queue = None
        if not batch:
            return False
        self.queued_live_bytes -= live_bytes
        self.inflight_live_bytes = live_bytes
        self.inflight = True
        now = self.last_write = self.clock.monotonic()
        self.stats.total_messages_sent += len(batch)
        observe = self.stats.write_latency.observe
        for frame in batch:
            if frame.born:
                observe(now - frame.born)
        ref = self.actor_ref
        try:
            taken = self.transport.write(batch, lambda: _tell_flushed(ref))
        except Exception:
            self.log.debug("write_failed", exc_info=True)
            self.transport_closed()
            return False
        if not taken:
            return False
        self.inflight = False
        self.inflight_live_bytes = 0
        return self.queue is not None

    def flushed(self) -> None:
        self.inflight = False
        self.inflight_live_bytes = 0
        if self.queue:
            self._write_next()

    def close_request(self, request: CloseConnection) -> None:
        if request.immediately:
            self._close_now(request.code, request.reason)
        else:
            self._push(request)
            if not self.inflight:
                self._write_next()

    def _close_now(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.queue = None
        self.queued_live_bytes = 0
        try:
            self.transport.close(code, reason)
        except Exception:
            self.log.debug("close_failed", exc_info=True)
        self.stop()

    def transport_closed(self) -> None:
        self.closed = True
        self.stop()

    def keepalive(self) -> None:
        """The connection's one timer: keepalive messages, WebSocket pings, pong deadline.

        One timer per connection instead of a keepalive timer plus Tornado's
        ping task: idle connections are the many, and each task costs ~1.5 KiB.
        """
        self._keepalive_timer = None
        if self.closed:
            return
        settings = self.settings
        now = self.clock.monotonic()
        if self._pong_due is not None and now >= self._pong_due:
            self._pong_due = None
            if not self.transport.probe_answered():
                self.log.info("ping_timed_out")
                self._close_now(1000, "ping timed out")
                return
        if settings.ws_ping_interval > 0 and now >= self._next_ping:
            self.transport.probe()
            self._pong_due = now + min(settings.ws_ping_timeout, settings.ws_ping_interval)
            self._next_ping = now + settings.ws_ping_interval
        interval = settings.keepalive_interval
        if interval > 0 and now - self.last_write >= interval and not self.inflight:
            self.send({"type": "keepalive", "timestamp": iso_now(self.clock.time())})
        self._arm_keepalive()

    def _arm_keepalive(self) -> None:
        settings = self.settings
        now = self.clock.monotonic()
        dues = []
        if settings.keepalive_interval > 0:
            dues.append(self.last_write + settings.keepalive_interval)
        if settings.ws_ping_interval > 0:
            dues.append(self._next_ping)
        if self._pong_due is not None:
            dues.append(self._pong_due)
        if dues:
            self._keepalive_timer = self.tell_later(max(0.05, min(dues) - now), KEEPALIVE_CHECK)

    def send(self, message: dict[str, Any]) -> None:
        """A connection-level message to this client alone."""
        self.enqueue(control_frame(message), live=True)

    # -- inbound -----------------------------------------------------------

    def client_message(self, data: str | bytes) -> None:
        if self.closed:
            return
        if not self._take_rate_token():
            self.stats.rate_limited_messages += 1
            self.client_error("rate_limited", f"more than {self.settings.max_client_rate} messages a second; dropped")
            return
        if isinstance(data, bytes):
            self.client_error("bad_json", "binary frames are not accepted; send JSON text")
            return
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            self.client_error("bad_json", f"not valid JSON: {exc}")
            return
        if not isinstance(message, dict):
            self.client_error("bad_json", "a message must be a JSON object")
            return
        mtype = message.get("type")
        if not isinstance(mtype, str) or not mtype:
            self.client_error("bad_message", "a message needs a string 'type'")
            return
        handler = _CLIENT_HANDLERS.get(mtype)
        if handler is None:
            self.client_error("unknown_type", f"the server does not take {mtype[:64]!r} from clients")
            return
        handler(self, message)

    def client_error(self, code: str, error: str, *, counts: bool = True) -> None:
        """Answer the client's own bad input; too many within 60 s closes with 1008."""
        self.send({"type": "error", "code": code, "error": error, "timestamp": iso_now(self.clock.time())})
        if not counts:
            return
        now = self.clock.monotonic()
        errors = self.errors
        if errors is None:
            errors = self.errors = deque()
        errors.append(now)
        while errors and errors[0] <= now - ERROR_WINDOW:
            errors.popleft()
        if len(errors) > self.settings.max_client_errors:
            self.log.info("too_many_client_errors", errors=len(errors))
            self.close_request(CloseConnection(1008, "too many invalid messages"))

    def _take_rate_token(self) -> bool:
        """A token bucket of max_client_rate messages, refilled at that rate per second."""
        rate = self.settings.max_client_rate
        now = self.clock.monotonic()
        self._bucket = min(float(rate), self._bucket + (now - self._bucket_at) * rate)
        self._bucket_at = now
        if self._bucket < 1.0:
            return False
        self._bucket -= 1.0
        return True

    # -- tokens ----------------------------------------------------------------

    def _arm_expiry(self) -> None:
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        if self.expires_at is not None:
            self._expiry_timer = self.tell_later(max(0.0, self.expires_at - self.clock.time()), TokenExpiry())

    def token_expired(self) -> None:
        self._expiry_timer = None
        if self.expires_at is not None and self.clock.time() >= self.expires_at:
            self.log.info("token_expired")
            self._close_now(4001, "token expired")
        else:
            self._arm_expiry()  # refreshed meanwhile

    def on_refresh(self, message: dict[str, Any]) -> None:
        token = message.get("token")
        if self._refresh is None:
            self.client_error("bad_token", "this server does not use tokens")
            return
        if not isinstance(token, str) or not token:
            self.client_error("bad_token", "refresh needs 'token', a string")
            return
        try:
            expires_at = self._refresh(token)
        except ValueError as exc:
            self.client_error("bad_token", str(exc))
            return
        self.expires_at = expires_at
        self._arm_expiry()
        self.send({"type": "refreshed", "exp": int(expires_at), "timestamp": iso_now(self.clock.time())})

    def on_ping(self, message: dict[str, Any]) -> None:
        self.send({"type": "pong", "timestamp": iso_now(self.clock.time())})

    def on_subscribe(self, message: dict[str, Any]) -> None:
        try:
            items = parse_event_list(message.get("events"), self.settings.presets)
        except FilterError as exc:
            self.client_error("bad_message", str(exc))
            return
        self.session.tell(ChangeFilter(self.connection_id, message["type"] == "subscribe", tuple(items)))

    def on_disconnect(self, message: dict[str, Any]) -> None:
        self.send(
            {
                "type": "disconnected",
                "message": "closed at the client's request",
                "connection_id": self.connection_id,
                "timestamp": iso_now(self.clock.time()),
            }
        )
        self.close_request(CloseConnection(1000, "client disconnect"))

    def on_query(self, message: dict[str, Any]) -> None:
        query = message.get("query")
        if not isinstance(query, str) or not query.strip():
            self.client_error("bad_message", "query needs 'query', a non-empty string")
            return
        session_id = message.get("session_id")
        if session_id is not None and session_id != self.session_id:
            self.client_error("bad_message", "the query's session_id is not this connection's session")
            return
        for name, kind in (("include_context", bool), ("system_prompt", str)):
            if name in message and not isinstance(message[name], kind):
                self.client_error("bad_message", f"'{name}' must be a {'boolean' if kind is bool else 'string'}")
                return
        self.session.tell(StartQuery(self.actor_ref, self.connection_id, self.user_id, message))

    def on_ack(self, message: dict[str, Any]) -> None:
        seq = message.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            self.client_error("bad_message", "ack needs 'seq', a non-negative integer")
            return
        if self.acked_seq is None or seq > self.acked_seq:
            self.acked_seq = seq


def _tell_flushed(ref: ActorRef[Any]) -> None:
    if ref.is_alive():
        ref.tell(FLUSHED)


_CLIENT_HANDLERS = {
    "ping": ConnectionActor.on_ping,
    "subscribe": ConnectionActor.on_subscribe,
    "unsubscribe": ConnectionActor.on_subscribe,
    "disconnect": ConnectionActor.on_disconnect,
    "ack": ConnectionActor.on_ack,
    "query": ConnectionActor.on_query,
    "refresh": ConnectionActor.on_refresh,
}
