"""MirrorSessionActor: a session's actor on one node of a cluster (`backend = "redis"`).

The shared store owns what must be shared (seq, epoch, history, dedup,
throttle, docs/protocol.md section 7); publishes go to it directly, not
through this actor. What this actor keeps owning is the order in which this
node's connections receive the session's messages: it mirrors the tail of
the shared history in the same `History` ring the memory backend uses, fed
in seq order from the node's subscription, so replay, filters, gaps and
fan-out are the memory backend's code unchanged.

Ordering rules:

* On start it asks the store to subscribe first, then read the history
  (`MirrorBackend.open`); messages that arrive by pub/sub before the read
  answers wait in `early` and are merged by seq, neither lost nor doubled.
* Connections that attach before the first load wait in `pending`.
* A message whose seq is not the next one is a hole: it waits in `early`
  while the missing range is read back from the store (`fill`); so does
  everything after a `Resync` (the node's subscription was restored). What
  the store evicted meanwhile reaches each connection as a `gap`.
* A new life: the store's epoch is not the mirror's (Redis lost its data, or
  a deletion and a new start happened while this node was not hearing) or
  the session is gone from the store altogether (then it is made again, as a
  first connection would). Every connection stays open and is told as a
  client coming back with the old epoch is (PROTOCOL section 3): a `gap`
  from 1 with the new epoch, then the new history. A deletion this node
  hears (`SessionDeleted`) closes the session as ever.

The actor lives while this node has connections to the session: the
session's expiry is the store's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from actors.messages import (
    Attach,
    ChangeFilter,
    CloseConnection,
    Committed,
    Echoed,
    Frame,
    HistorySlice,
    Loaded,
    LoadFailed,
    MissedLoaded,
    QueryEvent,
    QueryLocked,
    Resync,
    SessionDeleted,
    StartQuery,
)
from actors.query_run import BUSY, QueryRunner
from actors.replay import gap_frame
from actors.session import _HANDLERS, SessionActor
from actors.wire import CloseCode, error_frame

if TYPE_CHECKING:
    from actors.backend import MirrorBackend
    from actors.directory import SessionDirectory

#: How long a mirror that could not load waits before asking again.
RETRY_LOAD = 1.0


class MirrorSessionActor(SessionActor):
    def __init__(self, session_id: str, directory: SessionDirectory, backend: MirrorBackend) -> None:
        super().__init__(session_id, directory)
        self.backend = backend
        self.epoch = ""  # the store's, from the first load
        self.loaded = False
        #: connections that attached before the first load (or while their missed seqs are read)
        self.pending: dict[str, tuple[Attach, int]] = {}
        #: messages ahead of the mirror's newest seq, waiting for a hole to be filled
        self.early: dict[int, Frame] = {}
        #: messages of a new life (another epoch) heard before the mirror learnt of it, by epoch
        self.next_life: dict[str, dict[int, Frame]] = {}
        self.filling = False
        self.queries = QueryRunner(session_id, self.actor_ref, self._publish_own, self.clock)

    # -- lifecycle ---------------------------------------------------------

    def on_start(self) -> None:
        self.log.debug("mirror_started")
        self.backend.open(self.session_id, self.actor_ref)

    def _forget(self) -> None:
        super()._forget()
        self.backend.closed(self.session_id)

    def _arm_expiry(self) -> None:
        """No local expiry: the store expires the session; this actor ends with its last connection."""

    def on_receive(self, message: Any) -> Any:
        if self.closing:
            return self._forward(message)
        handle = _MIRROR_HANDLERS.get(message.__class__) or _HANDLERS.get(message.__class__)
        if handle is None:
            return super().on_receive(message)
        return handle(self, message)

    # -- the mirror ----------------------------------------------------------

    def loaded_slice(self, message: Loaded) -> None:
        part = message.slice
        if not self.loaded:
            self.epoch = part.epoch
            self.history.restart(part.first_seq - 1)
            for frame in part.frames:
                frame.delivered = True  # replay=missed asks the store, never these flags
                self.history.append(frame)
            if not part.frames:
                self.history.restart(part.last_seq)
            self.stats.buffered_changed(0, len(self.history))
            self.loaded = True
            self._apply_early()
            for request, _ in list(self.pending.values()):
                self.pending.pop(request.connection_id, None)
                self.attach(request)
            return
        self.filling = False
        if part.epoch != self.epoch:
            self._new_life(part)
            return
        head = self.history.last_seq
        if part.first_seq > head + 1:  # evicted while this node was not hearing: each client is told
            gap = gap_frame(head + 1, part.first_seq - 1, self.epoch)
            for member in list(self.members.values()):
                self._tell(member, gap)
            self.history.restart(part.first_seq - 1)
        for frame in part.frames:
            self.early.setdefault(frame.seq or 0, frame)
        self._apply_early()

    def load_failed(self, message: LoadFailed) -> None:
        self.log.warning("mirror_load_failed", error=message.error)
        self.filling = False
        if not self.loaded:
            self.tell_later(RETRY_LOAD, _RELOAD)

    def reload(self) -> None:
        if not self.loaded:
            self.backend.open(self.session_id, self.actor_ref)
        else:
            self.resync()

    def _new_life(self, part: HistorySlice) -> None:
        """The store's history started afresh: every connection hears a gap from 1, then the new history."""
        if not part.epoch:  # gone from the store (its data was lost): made again, as a first connection does
            self.log.warning("mirror_session_lost", epoch=self.epoch)
            self.filling = True
            self.backend.open(self.session_id, self.actor_ref)
            return
        self.log.warning("mirror_epoch_changed", old=self.epoch, new=part.epoch)
        before = len(self.history)
        self.epoch = part.epoch
        self.early = self.next_life.pop(part.epoch, {})
        self.next_life.clear()
        self.history.restart(part.first_seq - 1)
        self.stats.buffered_changed(before, 0)
        gap = gap_frame(1, None, self.epoch)
        for member in list(self.members.values()):
            self._tell(member, gap)
        for frame in part.frames:
            self.early.setdefault(frame.seq or 0, frame)
        self._apply_early()

    def committed(self, message: Committed) -> None:
        if self.loaded and message.epoch != self.epoch:
            # A life this mirror does not know yet: keep what it says, learn the life from the store.
            later = self.next_life.setdefault(message.epoch, {})
            for frame in message.frames:
                later.setdefault(frame.seq or 0, frame)
            if not self.filling:
                self.filling = True
                self.backend.fill(self.session_id, 0, self.actor_ref)
            return
        for frame in message.frames:
            if frame.seq is not None and frame.seq > self.history.last_seq:
                self.early.setdefault(frame.seq, frame)
        if self.loaded:
            self._apply_early()

    def echoed(self, message: Echoed) -> bool:
        """This node's own publish, from its script's reply: sent now if it is exactly what comes next.

        Anything else (a life this mirror does not know, a hole being filled,
        messages of another node not heard yet) is dropped here: its pub/sub
        copy comes in any case and is merged by seq as ever. Dropping, not
        keeping, is what keeps a reply that overtook another node's publish
        from asking the store for a hole that pub/sub is about to fill.
        True when it was sent: then the copy may be dropped unread (the node's
        `_on_events`).
        """
        frames = message.frames
        if (
            not self.loaded
            or self.filling
            or self.early
            or message.epoch != self.epoch
            or not frames
            or frames[0].seq != self.history.last_seq + 1
        ):
            return False
        for frame in frames:
            self.early[frame.seq or 0] = frame
        self._apply_early()
        return True

    def resync(self) -> None:
        """After an outage of the subscription: read whatever came after the mirror's newest seq."""
        if self.loaded and not self.filling:
            self.filling = True
            self.backend.fill(self.session_id, self.history.last_seq, self.actor_ref)

    def _apply_early(self) -> None:
        """Send, in seq order, what follows the mirror's newest seq; ask for a hole to be filled."""
        early = self.early
        while early:
            head = self.history.last_seq
            frame = early.pop(head + 1, None)
            if frame is None:
                for seq in [s for s in early if s <= head]:
                    del early[seq]  # duplicates of what was sent already
                if early and not self.filling:
                    self.filling = True
                    self.backend.fill(self.session_id, head, self.actor_ref)
                return
            frame.born = frame.born or self.clock.monotonic()
            self._keep_and_send(frame)
            self.last_event_at = self.clock.time()

    # -- connections -----------------------------------------------------------

    def attach(self, request: Attach) -> None:
        if not self.loaded:
            self.pending[request.connection_id] = (request, 0)
            return
        if request.last_seq is None and request.replay == "missed":
            # Counted in the cluster at once, so what is committed from now on counts as sent to it;
            # it gets those live, after what no connection was sent before.
            self.pending[request.connection_id] = (request, self.history.last_seq)
            self.backend.joined(self.session_id, request.connection_id, request.user_id, request.filter.echo())
            self.backend.take_missed(self.session_id, request.connection_id, request.filter.echo(), self.actor_ref)
            return
        replayed = self._replay_for(request)
        if replayed is None:
            if not self.members and not self.pending:
                self._end()
            return
        if self._admit(request, replayed):
            self.backend.joined(self.session_id, request.connection_id, request.user_id, request.filter.echo())

    def change_filter(self, request: ChangeFilter) -> None:
        """As in memory; then the cluster's record of the connection (and this node's count of
        connections taking every type, publish.lua's 'a') follow the new filter at once."""
        super().change_filter(request)
        member = self.members.get(request.connection_id)
        if member is not None:
            self.backend.joined(self.session_id, member.connection_id, member.user_id, member.filter.echo())

    def missed_loaded(self, message: MissedLoaded) -> None:
        request, head = self.pending.pop(message.connection_id, (None, 0))
        if request is None:
            return
        admits = request.filter.admits
        missed = [f for f in self.history if (f.seq in message.seqs or (f.seq or 0) > head) and admits(f.type)]
        self._admit(request, missed)

    def _admit(self, request: Attach, replayed: list[Frame]) -> bool:
        if super()._admit(request, replayed):
            return True
        self.backend.left(self.session_id, request.connection_id)  # it left meanwhile: the cluster forgets it
        return False

    def detach(self, connection_id: str) -> None:
        known = connection_id in self.members or connection_id in self.pending
        self.pending.pop(connection_id, None)
        super().detach(connection_id)
        if known:
            self.backend.left(self.session_id, connection_id)
        self._end_if_unused()

    def _end_if_unused(self) -> None:
        """The last connection of this node left and no query of it runs: the store keeps the session."""
        if not self.members and not self.pending and self.queries.running is None:
            self._end()

    def deleted(self, message: SessionDeleted) -> None:
        if not self.epoch or message.epoch == self.epoch:
            self.close()

    def close(self) -> bool:
        """Deleted (here or on another node): members get session_closed; those still waiting are closed too."""
        for request, _ in self.pending.values():
            self._reply(request.connection, CloseConnection(CloseCode.NORMAL, "session closed", immediately=True))
        self.pending.clear()
        return super().close()

    # -- queries -----------------------------------------------------------------

    def start_query(self, request: StartQuery) -> None:
        if self.queries.running is not None:
            super().start_query(request)  # busy, answered here
            return
        self.backend.lock_query(self.session_id, request, self.actor_ref)

    def query_locked(self, message: QueryLocked) -> None:
        if not message.granted or self.queries.running is not None:
            self._reply(message.request.connection, error_frame("busy", BUSY, self.clock.time()))
            return
        super().start_query(message.request)

    def query_event(self, event: QueryEvent) -> None:
        if self.queries.on_event(event):
            self.backend.unlock_query(self.session_id)
            self._end_if_unused()  # its asker may have left while it streamed

    def _publish_own(self, event: dict[str, Any]) -> int:
        """Query messages go to the store like any publish and come back in seq order."""
        self.backend.publish(self.session_id, event)
        return 0

    def _end(self) -> None:
        if self.queries.running is not None:
            self.backend.unlock_query(self.session_id)
        super()._end()


class _Reload:
    __slots__ = ()


_RELOAD = _Reload()


_MIRROR_HANDLERS: dict[type, Any] = {
    Loaded: MirrorSessionActor.loaded_slice,
    LoadFailed: MirrorSessionActor.load_failed,
    Committed: MirrorSessionActor.committed,
    Echoed: MirrorSessionActor.echoed,
    ChangeFilter: MirrorSessionActor.change_filter,
    Resync: lambda mirror, _: mirror.resync(),
    SessionDeleted: MirrorSessionActor.deleted,
    MissedLoaded: MirrorSessionActor.missed_loaded,
    QueryLocked: MirrorSessionActor.query_locked,
    Attach: MirrorSessionActor.attach,
    StartQuery: MirrorSessionActor.start_query,
    QueryEvent: MirrorSessionActor.query_event,
    _Reload: lambda mirror, _: mirror.reload(),
}
