"""ConnectionActor: one client connection's outbound side, and the first reader of its input.

Outbound, a burst of frames already in its mailbox goes out in one write;
while the transport has not taken a write, what arrives waits in the
`Outbox` and goes out together in the next one (coalescing). The outbox
decides what a slow consumer loses (docs/protocol.md section 3.9); this actor
keeps the timers (heartbeat, token expiry), the client protocol (inbound
frames: WebSocket only) and the glue. It writes through a `Transport`
(actors/transport.py) without knowing which wire that is, so it serves
WebSocket and Server-Sent Events alike and is tested with a recording fake.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from actors.client_input import (
    ClientInputError,
    ErrorWindow,
    RateBucket,
    check_ack,
    check_query,
    parse_client_message,
)
from actors.filters import FilterError, parse_event_list
from actors.heartbeat import Heartbeat
from actors.lease import TokenLease
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
from actors.outbox import Outbox
from actors.runtime import LoopActor
from actors.wire import CloseCode, control_frame, error_frame, iso_timestamp

if TYPE_CHECKING:
    from pykka import ActorRef

    from actors.clock import TimerHandle
    from actors.settings import ActorSettings, SettingsGetter
    from actors.stats import BrokerStats
    from actors.transport import Transport

log = structlog.get_logger("actor_broker.connection")


class ConnectionActor(LoopActor):
    # One per client: slots instead of a 30-key instance dict save ~1.3 KiB each.
    __slots__ = (
        "_bucket", "_errors", "_heartbeat", "_settings", "_timer", "_write_scheduled", "acked_seq", "closed",
        "closed_with", "connection_id", "last_write", "lease", "opened_at", "outbox", "session", "session_id",
        "stats", "transport", "user_id",
    )  # fmt: skip

    def __init__(
        self, connection_id: str, session_id: str, session: ActorRef[Any], transport: Transport,
        settings: SettingsGetter, stats: BrokerStats, user_id: str | None = None, lease: TokenLease | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.connection_id = connection_id
        self.session_id = session_id
        self.session = session
        self.transport = transport
        self._settings = settings
        self.stats = stats
        self.user_id = user_id
        #: the connection's token, when tokens are required
        self.lease = lease
        self.outbox = Outbox()
        self.closed = False
        #: (code, reason) of how the connection ended, for the connection_closed log line
        self.closed_with: tuple[int | None, str | None] | None = None
        self.acked_seq: int | None = None
        now = self.last_write = self.opened_at = self.clock.monotonic()
        self._heartbeat = Heartbeat(now, settings())
        self._bucket: RateBucket | None = None  # made at the first client message: most never send one
        self._errors: ErrorWindow | None = None  # made at the first error
        self._timer: TimerHandle | None = None  # the heartbeat's
        self._write_scheduled = False

    @property
    def log(self) -> Any:
        """A logger bound to this connection, made when something is logged (rarely), not kept."""
        return log.bind(session_id=self.session_id, connection_id=self.connection_id)

    @property
    def settings(self) -> ActorSettings:
        return self._settings()

    # -- lifecycle ---------------------------------------------------------

    def on_start(self) -> None:
        """On the dispatcher thread, before any message: count it, arm its timers."""
        self.stats.active_connections += 1
        self._arm_heartbeat()
        self._arm_expiry()

    def on_stop(self) -> None:
        self._cleanup()

    def on_failure(self, *exc_info: Any) -> None:
        self.closed_with = self.closed_with or (CloseCode.INTERNAL_ERROR, "internal error")
        self._cleanup()
        self.transport.close(CloseCode.INTERNAL_ERROR, "internal error")

    def _cleanup(self) -> None:
        self.stats.active_connections -= 1
        if self._timer is not None:
            self._timer.cancel()
        if self.lease is not None:
            self.lease.cancel_timer()
        if self.session.is_alive():
            self.session.tell(Detach(self.connection_id))
        self.outbox.clear()
        code, reason = self.closed_with or (None, None)
        duration = round(self.clock.monotonic() - self.opened_at, 3)
        sent, size = self.outbox.sent_messages, self.outbox.sent_bytes
        self.log.info(
            "connection_closed", code=code, reason=reason, duration_s=duration, messages_sent=sent, bytes_sent=size,
            user_id=self.user_id, transport=self.transport.kind,
        )  # fmt: skip

    # -- dispatch ----------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        handle = _HANDLERS.get(message.__class__)
        if handle is None:
            return super().on_receive(message)
        return handle(self, message)

    def describe(self) -> dict[str, Any]:
        unsent = self.outbox.unsent_live_bytes
        return {"acked_seq": self.acked_seq, "queued_bytes": unsent, "transport": self.transport.kind}

    # -- outbound ----------------------------------------------------------

    def enqueue(self, frame: Frame) -> None:
        """A live frame: write it now, with what is right behind it, or queue it behind the write in flight."""
        if self.closed:
            return
        outbox = self.outbox
        outbox.push_live(frame)
        if not outbox.inflight:
            if self.has_mail():
                self._schedule_write()  # more frames may be right behind: one write for all
            else:
                self._write_next()
        elif outbox.unsent_live_bytes > (limit := self.settings.max_queue_bytes):
            dropped, slow = outbox.shed(limit)
            self.stats.compacted_messages += dropped
            if slow:
                self.stats.slow_consumer_disconnects += 1
                self.log.info("slow_consumer_closed", queued_bytes=outbox.unsent_live_bytes, limit=limit)
                self._close_now(CloseCode.SLOW_CONSUMER, "slow_consumer")

    def _schedule_write(self) -> None:
        """Write after the frames already in the mailbox are queued too: one write for all."""
        if not self._write_scheduled:
            self._write_scheduled = True
            self.actor_ref.tell(FLUSH_NOW)

    def flush_now(self) -> None:
        self._write_scheduled = False
        if not self.outbox.inflight:
            self._write_next()

    def replay(self, frames: list[Frame]) -> None:
        if self.closed:
            return
        self.outbox.push_replayed(frames)
        if not self.outbox.inflight:
            self._schedule_write()

    def _write_next(self) -> None:
        """Write what is queued, a chunk at a time, while the transport takes it at once; a write
        not taken at once is waited for (flow-controls replay, lets a slow client's queue grow)."""
        while self._write_one():
            pass

    def _write_one(self) -> bool:
        """One write from the outbox; True if the transport took it at once and more waits."""
        if self.closed:
            return False
        batch = self.outbox.next_batch()
        if batch is None:
            return False
        if isinstance(batch, CloseConnection):
            self._close_now(batch.code, batch.reason)
            return False
        self.last_write = self.clock.monotonic()
        self.stats.wrote(batch, self.last_write)
        ref = self.actor_ref
        try:
            taken = self.transport.write(batch, lambda: _tell_flushed(ref))
        except Exception:
            self.log.debug("write_failed", exc_info=True)
            self.transport_closed(TransportClosed())
            return False
        if not taken:
            return False
        self.outbox.taken()
        return self.outbox.waiting

    def flushed(self) -> None:
        self.outbox.taken()
        if self.outbox.waiting:
            self._write_next()

    def close_request(self, request: CloseConnection) -> None:
        if request.immediately:
            self._close_now(request.code, request.reason)
        else:
            self.outbox.push_close(request)
            if not self.outbox.inflight:
                self._write_next()

    def _close_now(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.closed_with = self.closed_with or (code, reason)  # the first way it ended; later ones follow from it
        self.outbox.clear()
        try:
            self.transport.close(code, reason)
        except Exception:
            self.log.debug("close_failed", exc_info=True)
        self.stop()

    def transport_closed(self, message: TransportClosed) -> None:
        self.closed_with = self.closed_with or (message.code, message.reason or "transport closed")
        self.closed = True
        self.stop()

    def send(self, message: dict[str, Any]) -> None:
        """A connection-level message to this client alone."""
        self.enqueue(control_frame(message))

    # -- timers ------------------------------------------------------------

    def keepalive(self) -> None:
        """The one timer (keepalives, probes, the probe's deadline): idle connections are the many."""
        self._timer = None
        if self.closed:
            return
        transport = self.transport
        answered, writing = transport.probe_answered(), self.outbox.inflight
        beat = self._heartbeat.tick(self.clock.monotonic(), self.last_write, answered, writing, self.settings)
        if beat.dead:
            self.log.info("ping_timed_out")
            self._close_now(CloseCode.NORMAL, "ping timed out")
            return
        if beat.probe:
            transport.probe()
        if beat.keepalive:
            self.send({"type": "keepalive", "timestamp": iso_timestamp(self.clock.time())})
        self._arm_heartbeat()

    def _arm_heartbeat(self) -> None:
        delay = self._heartbeat.delay(self.clock.monotonic(), self.last_write, self.settings)
        if delay is not None:  # a bound method, not tell_later's closure: ~170 bytes less per idle connection
            self._timer = self.clock.call_later(delay, self._heartbeat_due)

    def _heartbeat_due(self) -> None:
        if self.actor_ref.is_alive():
            self.actor_ref.tell(KEEPALIVE_CHECK)

    def _arm_expiry(self) -> None:
        lease = self.lease
        if lease is not None:
            lease.cancel_timer()
            lease.timer = self.tell_later(max(0.0, lease.expires_at - self.clock.time()), TokenExpiry())

    def token_expired(self) -> None:
        lease = self.lease
        if lease is None:
            return
        lease.timer = None
        if self.clock.time() >= lease.expires_at:
            self.log.info("token_expired")
            self._close_now(CloseCode.UNAUTHORIZED, "token expired")
        else:
            self._arm_expiry()  # refreshed meanwhile

    # -- inbound -----------------------------------------------------------

    def client_message(self, data: str | bytes) -> None:
        if self.closed:
            return
        bucket = self._bucket
        if bucket is None:
            bucket = self._bucket = RateBucket(self.settings.max_client_rate, self.clock.monotonic())
        if not bucket.take(self.settings.max_client_rate, self.clock.monotonic()):
            self.stats.rate_limited_messages += 1
            self.client_error("rate_limited", f"more than {self.settings.max_client_rate} messages a second; dropped")
            return
        try:
            message = parse_client_message(data, _CLIENT_HANDLERS)
            _CLIENT_HANDLERS[message["type"]](self, message)
        except ClientInputError as exc:
            self.client_error(exc.code, str(exc))

    def client_error(self, code: str, error: str) -> None:
        """Answer the client's own bad input; too many within 60 s closes with 1008."""
        self.enqueue(error_frame(code, error, self.clock.time()))
        errors = self._errors
        if errors is None:
            errors = self._errors = ErrorWindow()
        count = errors.add(self.clock.monotonic())
        if count > self.settings.max_client_errors:
            self.log.info("too_many_client_errors", errors=count)
            self.close_request(CloseConnection(CloseCode.POLICY_VIOLATION, "too many invalid messages"))

    def on_refresh(self, message: dict[str, Any]) -> None:
        if self.lease is None:
            raise ClientInputError("bad_token", "this server does not use tokens")
        expires_at = self.lease.refresh(message)
        self._arm_expiry()
        self.send({"type": "refreshed", "exp": int(expires_at), "timestamp": iso_timestamp(self.clock.time())})

    def on_ping(self, message: dict[str, Any]) -> None:
        self.send({"type": "pong", "timestamp": iso_timestamp(self.clock.time())})

    def on_subscribe(self, message: dict[str, Any]) -> None:
        try:
            items = parse_event_list(message.get("events"), self.settings.presets)
        except FilterError as exc:
            raise ClientInputError("bad_message", str(exc)) from None
        self.session.tell(ChangeFilter(self.connection_id, message["type"] == "subscribe", tuple(items)))

    def on_disconnect(self, message: dict[str, Any]) -> None:
        at = iso_timestamp(self.clock.time())
        bye = "closed at the client's request"
        self.send({"type": "disconnected", "message": bye, "connection_id": self.connection_id, "timestamp": at})
        self.close_request(CloseConnection(CloseCode.NORMAL, "client disconnect"))

    def on_query(self, message: dict[str, Any]) -> None:
        check_query(message, self.session_id)
        self.session.tell(StartQuery(self.actor_ref, self.connection_id, self.user_id, message))

    def on_ack(self, message: dict[str, Any]) -> None:
        seq = check_ack(message)
        if self.acked_seq is None or seq > self.acked_seq:
            self.acked_seq = seq


def _tell_flushed(ref: ActorRef[Any]) -> None:
    if ref.is_alive():
        ref.tell(FLUSHED)


#: What the connection does with each message it takes, by message class.
_HANDLERS: dict[type, Callable[[ConnectionActor, Any], Any]] = {
    Frame: ConnectionActor.enqueue,
    FlushNow: lambda connection, _: connection.flush_now(),
    Flushed: lambda connection, _: connection.flushed(),
    ClientMessage: lambda connection, m: connection.client_message(m.data),
    Replay: lambda connection, m: connection.replay(m.frames),
    CloseConnection: ConnectionActor.close_request,
    KeepaliveCheck: lambda connection, _: connection.keepalive(),
    TransportClosed: ConnectionActor.transport_closed,
    TokenExpiry: lambda connection, _: connection.token_expired(),
    DescribeConnection: lambda connection, _: connection.describe(),
}

#: What the connection does with each message type a client may send.
_CLIENT_HANDLERS: dict[str, Callable[[ConnectionActor, dict[str, Any]], None]] = {
    "ping": ConnectionActor.on_ping,
    "subscribe": ConnectionActor.on_subscribe,
    "unsubscribe": ConnectionActor.on_subscribe,
    "disconnect": ConnectionActor.on_disconnect,
    "ack": ConnectionActor.on_ack,
    "query": ConnectionActor.on_query,
    "refresh": ConnectionActor.on_refresh,
}
