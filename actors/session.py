"""SessionActor: everything about one session, owned by one actor.

History and seq/epoch, throttling, idempotent publishing, the connections
with their filters, replay, expiry: nothing else mutates this state.

Order is the actor's mailbox order: a connection attached between two
publishes gets the first in its replay and the second live, never both and
never in the wrong order, because both happen in this one actor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog
from pykka import ActorDeadError

from actors.dedup import DedupWindow
from actors.filters import FilterError
from actors.history import MemoryHistory
from actors.ids import new_epoch
from actors.messages import (
    Attach,
    BroadcastFrame,
    ChangeFilter,
    CloseConnection,
    CloseSession,
    DescribeSession,
    Detach,
    ExpiryCheck,
    FlushHeld,
    FollowSettings,
    Frame,
    Publish,
    QueryEvent,
    Replay,
    StartQuery,
    encode,
)
from actors.query_run import QueryRunner
from actors.replay import BeyondNewestError, greeting_frame, replay_frames
from actors.runtime import LoopActor
from actors.throttle import ProgressThrottle, Verdict
from actors.wire import CloseCode, control_frame, error_frame, iso_timestamp

if TYPE_CHECKING:
    from pykka import ActorRef

    from actors.clock import TimerHandle
    from actors.directory import SessionDirectory
    from actors.filters import EventFilter
    from actors.history import History
    from actors.settings import ActorSettings

log = structlog.get_logger("actor_broker.session")

_FINISHING = frozenset({"task_completed", "task_failed"})


class _Member:
    """A connection as the session sees it."""

    __slots__ = ("connection_id", "filter", "ref", "user_id")

    def __init__(self, ref: ActorRef[Any], connection_id: str, user_id: str | None, event_filter: EventFilter) -> None:
        self.ref = ref
        self.connection_id = connection_id
        self.user_id = user_id
        self.filter = event_filter


class SessionActor(LoopActor):
    def __init__(self, session_id: str, directory: SessionDirectory, history: History | None = None) -> None:
        super().__init__()
        settings = directory.current_settings()
        self.session_id = session_id
        self.directory = directory
        self.stats = directory.stats
        self.epoch = new_epoch()
        self.history: History = history or MemoryHistory(settings.buffer_size)
        self._settings = settings
        self.throttle = ProgressThrottle(settings.min_delta, settings.max_interval_ms / 1000)
        self.members: dict[str, _Member] = {}
        #: idempotent publishing: the event ids accepted within dedup_window
        self.accepted = DedupWindow()
        self.created_at = self.clock.time()
        self.last_event_at: float | None = None
        self.last_activity = self.clock.monotonic()
        self.closing = False
        self._expiry_timer: TimerHandle | None = None
        self.queries = QueryRunner(session_id, self.actor_ref, self._commit, self.clock)
        self.log = log.bind(session_id=session_id)

    @property
    def settings(self) -> ActorSettings:
        """The settings in force now; `_follow_settings` applies what a change means for held state."""
        return self.directory.current_settings()

    # -- lifecycle ---------------------------------------------------------

    def on_start(self) -> None:
        self.log.debug("session_started")
        self._arm_expiry()

    def on_stop(self) -> None:
        self._forget()

    def on_failure(self, *exc_info: Any) -> None:
        self._forget()

    def _forget(self) -> None:
        self.queries.close()
        self.directory.remove(self.session_id, self.actor_ref)
        self.stats.buffered_changed(len(self.history), 0)
        self.stats.connected_sessions.discard(self.session_id)
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()

    # -- dispatch ----------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        if self.closing:
            return self._forward(message)
        handle = _HANDLERS.get(message.__class__)
        if handle is None:
            return super().on_receive(message)
        return handle(self, message)

    def _forward(self, message: Any) -> Any:
        """After expiry, what still arrives belongs to the session's next life."""
        if isinstance(message, (Publish, Attach)):
            return self.directory.get_or_create(self.session_id).ask(message, block=False)
        return None  # the rest (a describe, a late timer) concerns the life that ended

    # -- publishing --------------------------------------------------------

    def _follow_settings(self) -> None:
        """A SIGHUP reload swaps the directory's settings; existing sessions follow them here."""
        settings = self.settings
        if settings is self._settings:
            return
        self._settings = settings
        self.throttle.min_delta = settings.min_delta
        self.throttle.max_interval = settings.max_interval_ms / 1000
        before = len(self.history)
        if self.history.resize(settings.buffer_size):
            self.stats.buffered_changed(before, len(self.history))

    def publish(self, events: list[dict[str, Any]]) -> list[int | None]:
        self._follow_settings()
        now = self.clock.monotonic()
        self.accepted.forget_before(now - self.settings.dedup_window)
        seqs: list[int | None] = []
        for event in events:
            seqs.append(self._publish_one(event, now))
        self.last_event_at = self.clock.time()
        self._touch(now)
        return seqs

    def _publish_one(self, event: dict[str, Any], now: float) -> int | None:
        event_id = event["event_id"]
        if self.accepted.seen(event_id):
            return self.accepted.seq_of(event_id)
        self.accepted.accept(event_id, now)
        self.stats.total_events_received += 1
        etype = event["type"]
        if etype == "task_progress":
            return self._offer_progress(event, now)
        if etype in _FINISHING:
            self._drop(self.throttle.finish(event["task_id"]))
        elif etype == "task_started":
            self.throttle.start(event["task_id"])
        return self._commit(event)

    def _offer_progress(self, event: dict[str, Any], now: float) -> int | None:
        task_id = event["task_id"]
        offer = self.throttle.offer(task_id, event, now)
        self._drop(offer.superseded)
        if offer.verdict is Verdict.DELIVER:
            return self._commit(event)
        if offer.verdict is Verdict.DISCARD:
            self._drop(event)
        elif offer.flush_at is not None:
            self.tell_later(max(0.0, offer.flush_at - now), FlushHeld(task_id))
        return None

    def _drop(self, event: dict[str, Any] | None) -> None:
        """A progress event that will never be delivered."""
        if event is not None:
            self.stats.throttled_events += 1

    def flush_held(self, task_id: str) -> None:
        now = self.clock.monotonic()
        event, flush_at = self.throttle.flush(task_id, now)
        if event is not None:
            self._commit(event)
        elif flush_at is not None:
            self.tell_later(max(0.0, flush_at - now), FlushHeld(task_id))

    def _commit(self, event: dict[str, Any]) -> int:
        """Give the event its seq, keep it in history and send it to every admitting connection."""
        seq = self.history.next_seq()
        message = dict(event)
        message["seq"] = seq
        message["epoch"] = self.epoch
        etype = event["type"]
        frame = Frame(encode(message), etype, seq, event.get("task_id") if etype == "task_progress" else None)
        frame.born = self.clock.monotonic()
        self._keep_and_send(frame)
        self.accepted.assign(event["event_id"], seq)
        return seq

    def _keep_and_send(self, frame: Frame) -> None:
        """A message with its seq: into history, and to every connection whose filter admits it."""
        before = len(self.history)
        evicted = self.history.append(frame)
        if evicted or len(self.history) != before:
            self.stats.buffered_changed(before, len(self.history))
        etype = frame.type
        departed = None
        for member in self.members.values():
            if member.filter.admits(etype):
                try:
                    member.ref.tell(frame)
                except ActorDeadError:  # it stopped; its Detach is still on its way
                    departed = departed or []
                    departed.append(member.connection_id)
                    continue
                frame.delivered = True
        if departed:
            for connection_id in departed:
                self.detach(connection_id)

    # -- queries ---------------------------------------------------------------

    def start_query(self, request: StartQuery) -> None:
        busy = self.queries.start(request, self.directory.query_backend)
        if busy is not None:
            self._reply(request.connection, busy)
            return
        self.stats.total_events_received += 1
        self._touch(self.clock.monotonic())

    def query_event(self, event: QueryEvent) -> None:
        if self.queries.on_event(event):
            self._touch(self.clock.monotonic())

    def broadcast(self, frame: Frame) -> int:
        return sum(1 for member in list(self.members.values()) if self._tell(member, frame))

    @staticmethod
    def _reply(connection: ActorRef[Any], message: Any) -> None:
        """Answer a connection that is not (or not yet) a member; it may have left."""
        with contextlib.suppress(ActorDeadError):
            connection.tell(message)

    def _tell(self, member: _Member, message: Any) -> bool:
        """Tell a connection; one that already stopped is forgotten, not an error."""
        try:
            member.ref.tell(message)
        except ActorDeadError:
            self.detach(member.connection_id)
            return False
        return True

    # -- connections -------------------------------------------------------

    def attach(self, request: Attach) -> None:
        replayed = self._replay_for(request)
        if replayed is None:
            if self._untouched():
                self._end()  # made for this refused handshake: leave nothing behind
            return
        self._admit(request, replayed)

    def _admit(self, request: Attach, replayed: list[Frame]) -> bool:
        """Greet, replay, and make the connection a member; False if it left before it was attached."""
        keepalive, at = self.settings.keepalive_interval, self.clock.time()
        greeting = greeting_frame(request, self.session_id, self.epoch, self.history.last_seq, keepalive, at)
        try:
            request.connection.tell(Replay([greeting, *replayed]))
        except ActorDeadError:
            return False
        member = _Member(request.connection, request.connection_id, request.user_id, request.filter)
        self.members[request.connection_id] = member
        self.stats.connected_sessions.add(self.session_id)
        self.log.debug("connection_attached", connection_id=request.connection_id, replayed=len(replayed))
        return True

    def _replay_for(self, request: Attach) -> list[Frame] | None:
        """What an attaching connection gets from history; None after refusing it (1008: last_seq too new)."""
        r, h, e = request, self.history, self.epoch
        try:
            return replay_frames(h, e, r.filter, replay=r.replay, last_seq=r.last_seq, client_epoch=r.epoch)
        except BeyondNewestError as exc:
            self._reply(request.connection, CloseConnection(CloseCode.POLICY_VIOLATION, str(exc), immediately=True))
            return None

    def detach(self, connection_id: str) -> None:
        if self.members.pop(connection_id, None) is not None:
            self.log.debug("connection_detached", connection_id=connection_id)
        if not self.members:
            self.stats.connected_sessions.discard(self.session_id)
            self._touch(self.clock.monotonic())

    def change_filter(self, request: ChangeFilter) -> None:
        member = self.members.get(request.connection_id)
        if member is None:
            return
        presets = self.settings.presets
        try:
            if request.subscribe:
                member.filter = member.filter.subscribe(request.items, presets)
            else:
                member.filter = member.filter.unsubscribe(request.items, presets)
        except FilterError as exc:  # the connection validated; presets may have changed since
            self._tell(member, error_frame("bad_message", str(exc), self.clock.time()))
            return
        at = iso_timestamp(self.clock.time())
        self._tell(member, control_frame({"type": "subscribed", "events": member.filter.echo(), "timestamp": at}))

    def describe(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "epoch": self.epoch,
            "last_seq": self.history.last_seq,
            "connections": [
                {"connection_id": m.connection_id, "user_id": m.user_id, "events": m.filter.echo(), "ref": m.ref}
                for m in self.members.values()
            ],
            "buffered_messages": len(self.history),
            "created_at": iso_timestamp(self.created_at),
            "last_event_at": iso_timestamp(self.last_event_at) if self.last_event_at is not None else None,
        }

    # -- ending ------------------------------------------------------------

    def close(self) -> bool:
        """DELETE: every client gets session_closed, then close 1000; the history is gone."""
        at = iso_timestamp(self.clock.time())
        closed = {"type": "session_closed", "session_id": self.session_id, "reason": "deleted", "timestamp": at}
        notice = control_frame(closed)
        for member in list(self.members.values()):
            if self._tell(member, notice):
                self._tell(member, CloseConnection(CloseCode.NORMAL, "session closed"))
        self.members.clear()
        self._end()
        return True

    def _untouched(self) -> bool:
        """Nothing ever happened here: no event, no connection, no query."""
        return not self.members and not self.accepted and self.history.last_seq == 0 and self.queries.running is None

    def _end(self) -> None:
        self.queries.abandon()
        self.closing = True
        self.directory.remove(self.session_id, self.actor_ref)
        self.throttle.forget()
        self.stop()

    def _touch(self, now: float) -> None:
        self.last_activity = now
        self._arm_expiry()

    def _arm_expiry(self) -> None:
        if self._expiry_timer is None and not self.members:
            delay = self.last_activity + self.settings.session_ttl - self.clock.monotonic()
            self._expiry_timer = self.tell_later(max(0.0, delay), ExpiryCheck())

    def check_expiry(self) -> None:
        self._expiry_timer = None
        if self.members:
            return  # re-armed when the last one leaves
        due = self.last_activity + self.settings.session_ttl
        if self.clock.monotonic() >= due:
            self.log.info("session_expired")
            self._end()
        else:
            self._arm_expiry()


#: What the session does with each message it takes, by message class.
_HANDLERS: dict[type, Callable[[SessionActor, Any], Any]] = {
    Publish: lambda session, m: session.publish(m.events),
    Attach: SessionActor.attach,
    Detach: lambda session, m: session.detach(m.connection_id),
    ChangeFilter: SessionActor.change_filter,
    FlushHeld: lambda session, m: session.flush_held(m.task_id),
    ExpiryCheck: lambda session, _: session.check_expiry(),
    QueryEvent: SessionActor.query_event,
    FollowSettings: lambda session, _: session._follow_settings(),  # noqa: SLF001
    StartQuery: SessionActor.start_query,
    BroadcastFrame: lambda session, m: session.broadcast(m.frame),
    DescribeSession: lambda session, _: session.describe(),
    CloseSession: lambda session, _: session.close(),
}
