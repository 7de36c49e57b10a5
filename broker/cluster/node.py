"""ClusterNode: one daemon's place in a cluster of daemons sharing one Redis (`backend = "redis"`).

It is the one owner of the node's Redis traffic: the command client
(`RedisStore`) and the subscription (`Subscriber`). It serves two sides:

* the Broker publishes through it (`publish`: one script call per session
  and batch, 503 when Redis cannot be reached), deletes, locks and asks it
  for cluster-wide stats;
* the session mirrors (`actors/mirror.py`) reach the store through it, as
  their `MirrorBackend`: every call returns at once and the answer is told
  back to the actor when Redis has answered.

And it keeps the node honest (docs/protocol.md section 7): a heartbeat that
makes it count in `nodes`, the sessions it holds connections for kept alive,
their connections' figures written for the cluster's stats, the due sweep
that fires a held progress event's trailing edge even when the node that
held it died, and readiness that is true only while Redis answers and the
subscription is proven alive by its canary.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from pykka import ActorDeadError

from actors.inbox import LoopActorRef
from actors.messages import (
    RESYNC,
    Committed,
    DescribeConnection,
    DescribeSession,
    Echoed,
    Frame,
    HistorySlice,
    Loaded,
    LoadFailed,
    MissedLoaded,
    QueryLocked,
    SessionDeleted,
    encode,
)
from actors.wire import iso_timestamp
from broker.cluster.payload import Deleted, Published, committed_through, parse_payload
from broker.cluster.store import (
    BackendUnavailable,
    EventMeta,
    Limits,
    PoolExhausted,
    PublishResult,
    RedisStore,
    Slice,
)
from broker.cluster.subscriber import Subscriber

if TYPE_CHECKING:
    from pykka import ActorRef

    from actors.directory import SessionDirectory
    from actors.messages import StartQuery
    from actors.stats import BrokerStats
    from broker.config import Settings

log = structlog.get_logger("actor_broker.cluster")

#: The session messages that end a query (actors/query_run.py).
_QUERY_ENDS = frozenset({"complete", "error"})
#: How often every node sweeps the due set for held progress whose node may be gone.
SWEEP_INTERVAL = 1.0
#: The longest each step of a node's shutdown may take.
STOP_STEP = 3.0
#: Nodes count as dead, and their connection records as stale, after this many check intervals of silence.
SILENT_CHECKS = 3


def default_node_id() -> str:
    """Host name and process id: unique per running daemon, readable in logs."""
    return f"{socket.gethostname()}:{os.getpid()}"


def silent_ms(settings: Settings) -> int:
    """How long a node may be silent and still count as live: 3 x backend_check_interval (PROTOCOL section 7).

    A connection record its node has not refreshed for as long is a dead node's;
    a query lock lives as long unless its node renews it, so a node killed
    mid-query blocks its session's queries for no longer than that.
    """
    return int(SILENT_CHECKS * settings.backend_check_interval * 1000)


def limits_of(settings: Settings) -> Limits:
    return Limits(
        buffer_size=settings.buffer_size,
        dedup_window_ms=int(settings.dedup_window * 1000),
        min_delta=settings.min_delta,
        max_interval_ms=settings.max_interval_ms,
        session_ttl_ms=int(settings.session_ttl * 1000),
        connection_stale_ms=silent_ms(settings),
    )


class ClusterNode:
    def __init__(
        self,
        settings: Callable[[], Settings],
        directory: SessionDirectory,
        stats: BrokerStats,
        store: RedisStore,
        subscriber_factory: Callable[..., Subscriber],
        node_id: str,
    ) -> None:
        self._settings = settings
        self.directory = directory
        self.stats = stats
        self.store = store
        self.node_id = node_id
        self.log = log.bind(node_id=node_id)
        self.subscriber = subscriber_factory(
            on_events=self._on_events, on_broadcast=self._on_broadcast, on_restored=self._on_restored
        )
        #: Redis answered the last command (a BackendUnavailable turns it off until the next answer)
        self.reachable = False
        self.started = False
        #: live nodes of the cluster, this one included, as of the last heartbeat
        self.nodes: list[str] = [node_id]
        #: delivers another node's broadcast (message JSON, excluded sessions) here; set by the Broker
        self.deliver_broadcast: Callable[[bytes, frozenset[str]], None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._chains: dict[str, asyncio.Future[Any]] = {}
        self._timers: list[asyncio.Task[None]] = []
        self._query_ids: dict[str, str] = {}
        #: per session, this node's connections whose filter takes every type: while there is one,
        #: nothing published here is `undelivered` (publish.lua's 'a' flag spares it every node's records)
        self._taking_all: dict[str, set[str]] = {}
        #: per session, (mirror, b"E <epoch>\n", seq): the newest seq its mirror sent from a publish's reply
        self._sent_from_reply: dict[str, tuple[ActorRef[Any], bytes, int]] = {}
        #: connection records waiting for the writer ((session_id, connection_id) -> record, None to forget)
        self._records: dict[tuple[str, str], dict[str, Any] | None] = {}
        self._record_writer: asyncio.Task[Any] | None = None
        self._subscribed = False  # the Subscriber started once; it reconnects by itself from then on
        self._stopping = False
        self._limits_source = settings()
        self._limits_value = limits_of(self._limits_source)

    @classmethod
    def from_settings(
        cls, settings: Callable[[], Settings], directory: SessionDirectory, stats: BrokerStats
    ) -> ClusterNode:
        current = settings()
        node_id = current.node_id or default_node_id()
        store = RedisStore.from_url(current.redis_url)

        def subscriber(**callbacks: Any) -> Subscriber:
            # A canary every half interval: a deaf subscription is caught within backend_check_interval.
            check = current.backend_check_interval / 2
            return Subscriber(current.redis_url, node_id, check_interval=check, **callbacks)

        return cls(settings, directory, stats, store, subscriber, node_id)

    @property
    def settings(self) -> Settings:
        return self._settings()

    @property
    def ready(self) -> bool:
        """Serving: Redis answers, and the subscription is alive (its canary came back)."""
        return self.started and self.reachable and self.subscriber.healthy

    # -- life --------------------------------------------------------------

    async def start(self) -> None:
        """Start even when Redis is down: readiness stays false and the connection is retried."""
        self._timers = [
            asyncio.ensure_future(self._every(self.settings.backend_check_interval, self._check)),
            asyncio.ensure_future(self._every(SWEEP_INTERVAL, self._sweep)),
        ]
        self.started = True
        await self._check()

    async def stop(self) -> None:
        """Stop the timers, let in-flight calls finish briefly, close the subscription and the pool.

        Every step is bounded (STOP_STEP seconds): a Redis that hangs must not hold a shutdown.
        """
        self._stopping = True
        for timer in self._timers:
            timer.cancel()
        pending = [*self._timers, *self._tasks]
        if pending:
            await asyncio.wait(pending, timeout=STOP_STEP)
        for task in self._tasks:
            task.cancel()
        for closing in (self.subscriber.stop, self.store.close):
            try:
                async with asyncio.timeout(STOP_STEP):
                    await closing()
            except Exception as exc:  # noqa: BLE001 - shutting down: note it and go on
                self.log.warning("cluster_stop_step_failed", step=closing.__qualname__, error=repr(exc))

    async def _every(self, interval: float, job: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run `job` every `interval` until `stop()`.

        The flag, not only the cancel, ends the loop: a cancel that lands inside
        a Redis call can be lost (seen under load: the loop went on after stop()
        cancelled it, stop() waited out STOP_STEP, and the daemon never exited,
        as asyncio's own shutdown waits for every task).
        """
        while True:
            await asyncio.sleep(interval)
            if self._stopping:
                return
            try:
                await job()
            except Exception:  # a periodic job logs and goes on; the loop must not die
                self.log.exception("cluster_job_failed", job=job.__name__)

    async def _check(self) -> None:
        """Every backend_check_interval: reach Redis, count the nodes, keep this node's sessions alive."""
        try:
            if not self._subscribed:
                await self.subscriber.start()
                self._subscribed = True
                for warning in await self.store.check_server():
                    self.log.warning("redis_setting", problem=warning)
            await self.store.heartbeat(self.node_id)
            self.nodes = await self.store.live_nodes(silent_ms(self.settings))
            await self._mark_sessions()
            await self._sync_connections()
            await self._renew_query_locks()
        except BackendUnavailable as exc:
            self._unreachable(exc)
            return
        if not self.reachable:
            self.log.info("backend_reachable")
        self.reachable = True

    def _unreachable(self, exc: BaseException) -> None:
        if isinstance(exc, PoolExhausted):  # this node is overloaded; Redis answers (the call alone is refused)
            self.log.warning("backend_pool_exhausted", error=str(exc))
            return
        if self.reachable:
            self.log.warning("backend_unreachable", error=str(exc))
        self.reachable = False

    async def _sync_connections(self) -> None:
        """Write this node's connection figures (acked seq, queued bytes) for the cluster's session stats."""
        from broker.core import resolve  # the Broker's helper for actor replies

        records: list[tuple[str, str, dict[str, Any]]] = []
        for sid, ref in self.directory.items():
            if not ref.is_alive():  # an ask of a stopped actor raises: a cycle through its traceback
                continue
            with contextlib.suppress(ActorDeadError):
                info = await resolve(ref.ask(DescribeSession(), block=False))
                for connection in (info or {}).get("connections", []):
                    described = await _describe(connection.pop("ref"))
                    now_ms = int(time.time() * 1000)
                    record = {**connection, **described, "node_id": self.node_id, "updated_ms": now_ms}
                    records.append((sid, connection["connection_id"], record))
        await self.store.write_connections(records, [], self._limits().session_ttl_ms)

    async def _renew_query_locks(self) -> None:
        """Keep the locks of this node's running queries; one whose node died expires by itself."""
        for session_id, query_lock in list(self._query_ids.items()):
            if not await self.store.lock_query(session_id, query_lock, silent_ms(self.settings)):
                self.log.warning("query_lock_lost", session_id=session_id)

    async def _sweep(self) -> None:
        """Fire trailing edges that are due, whichever node held them (that node may be gone)."""
        try:
            for sid, task_id in await self.store.due():
                await self.store.flush(sid, task_id, self._limits())
        except BackendUnavailable as exc:
            self._unreachable(exc)

    # -- publishing (the Broker) ---------------------------------------------

    async def publish(
        self, events: list[dict[str, Any]], release_query: dict[str, str] | None = None
    ) -> list[int | None]:
        """Validated events, any sessions: one script call per session; BackendUnavailable if Redis is not reached.

        `release_query` maps a session to the query lock its batch ends (released in the same call).
        """
        if not self.reachable:
            raise BackendUnavailable("backend unavailable")
        by_session: dict[str, list[int]] = {}
        for index, event in enumerate(events):
            by_session.setdefault(event["session_id"], []).append(index)
        limits = self._limits()
        queries = release_query or {}

        def call(sid: str, indexes: list[int]) -> Coroutine[Any, Any, PublishResult]:
            encoded = [encode(events[i]) for i in indexes]
            metas = [EventMeta.of(events[i]) for i in indexes]
            echo = self.directory.get(sid) is not None  # a mirror here delivers it from the reply
            return self.store.publish(
                sid,
                encoded,
                metas,
                limits,
                release_query=queries.get(sid),
                echo=echo,
                admitted_here=sid in self._taking_all,
                origin=self.node_id,
            )

        try:
            if len(by_session) == 1:  # the usual publish: one call, awaited without a task and a gather
                [(sid, indexes)] = by_session.items()
                results = [await call(sid, indexes)]
            else:
                results = list(await asyncio.gather(*(call(sid, indexes) for sid, indexes in by_session.items())))
        except BackendUnavailable as exc:
            self._unreachable(exc)
            raise
        seqs: list[int | None] = [None] * len(events)
        for (sid, indexes), result in zip(by_session.items(), results, strict=True):
            for index, seq in zip(indexes, result.seqs, strict=True):
                seqs[index] = seq
            if result.echo is not None:
                self._echo(sid, result.echo, result.published)
            for task_id, due_ms in result.held:
                self._flush_later(sid, task_id, (due_ms - result.now_ms) / 1000)
            self.stats.total_events_received += result.received
            self.stats.throttled_events += result.throttled
        return seqs

    def _limits(self) -> Limits:
        """limits_of the current settings, made again only when a reload replaced them (every call uses it)."""
        current = self.settings
        if current is not self._limits_source:
            self._limits_source, self._limits_value = current, limits_of(current)
        return self._limits_value

    def _flush_later(self, session_id: str, task_id: str, delay: float) -> None:
        """The trailing edge on the node that held it, on time (Redis's clock decides); the sweep is the safety net."""
        delay = max(0.0, delay)
        loop = asyncio.get_running_loop()
        loop.call_later(delay, lambda: self._spawn(self.store.flush(session_id, task_id, self._limits())))

    # -- what the mirrors ask (actors.backend.MirrorBackend) -----------------------

    def open(self, session_id: str, reply_to: ActorRef[Any]) -> None:
        async def load() -> None:
            # Subscribed (confirmed), then marked as hearing it, then the read: a publish
            # elsewhere is either in what is read or PUBLISHed to this node (publish.lua).
            await self.subscriber.subscribe(session_id)
            await self.store.ensure(session_id, self._limits().session_ttl_ms, listener=self.node_id)
            reply_to.tell(Loaded(_as_history(await self.store.read(session_id, 0))))

        self._answer(load(), reply_to)

    def fill(self, session_id: str, after_seq: int, reply_to: ActorRef[Any]) -> None:
        async def read() -> None:
            reply_to.tell(Loaded(_as_history(await self.store.read(session_id, after_seq))))

        self._answer(read(), reply_to)

    def closed(self, session_id: str) -> None:
        self._sent_from_reply.pop(session_id, None)
        self._taking_all.pop(session_id, None)
        self._spawn(self.subscriber.unsubscribe(session_id))

    def joined(self, session_id: str, connection_id: str, user_id: str | None, events: list[str]) -> None:
        if events == ["*"]:
            self._taking_all.setdefault(session_id, set()).add(connection_id)
        else:  # a new filter (ChangeFilter) that no longer takes everything
            self._forget_taker(session_id, connection_id)
        info = {
            "node_id": self.node_id,
            "user_id": user_id,
            "events": events,
            "transport": None,
            "acked_seq": None,
            "queued_bytes": 0,
            "updated_ms": int(time.time() * 1000),
        }
        self._record_connection(session_id, connection_id, info)

    def left(self, session_id: str, connection_id: str) -> None:
        self._forget_taker(session_id, connection_id)
        self._record_connection(session_id, connection_id, None)

    def _forget_taker(self, session_id: str, connection_id: str) -> None:
        taking = self._taking_all.get(session_id)
        if taking is not None:
            taking.discard(connection_id)
            if not taking:
                del self._taking_all[session_id]

    def _record_connection(self, session_id: str, connection_id: str, info: dict[str, Any] | None) -> None:
        """Queue a connection's record (None: forget it); one writer sends what queued up in one round trip.

        A reconnect storm joins and leaves hundreds of connections at once; a
        call each would hold every pooled connection (and starve publishes).
        Only the newest state of a connection is written, in the order the
        writer takes them.
        """
        self._records[(session_id, connection_id)] = info
        if self._record_writer is None:
            self._record_writer = self._spawn(self._write_records())

    async def _write_records(self) -> None:
        try:
            while self._records:
                batch, self._records = self._records, {}
                puts = [(sid, cid, info) for (sid, cid), info in batch.items() if info is not None]
                drops = [key for key, info in batch.items() if info is None]
                await self.store.write_connections(puts, drops, self._limits().session_ttl_ms)
        finally:
            self._record_writer = None

    def take_missed(self, session_id: str, connection_id: str, events: list[str], reply_to: ActorRef[Any]) -> None:
        async def take() -> None:
            missed = await self.store.read_missed(session_id, events)
            reply_to.tell(MissedLoaded(connection_id, frozenset(m.seq for m in missed.messages)))

        self._answer(take(), reply_to, fallback=MissedLoaded(connection_id, frozenset()))

    def publish_own(self, session_id: str, event: dict[str, Any]) -> None:
        """A session-made event (queries): published after every earlier one of its session.

        The event that ends this node's running query (its `complete` or `error`)
        releases the session's query lock in the same script call: a client that
        has read the end may ask the next query on any node at once, and none can
        start before the end is committed.
        """
        release = None
        if event.get("type") in _QUERY_ENDS and "query_id" in event and session_id in self._query_ids:
            release = self._query_ids.pop(session_id)
        self.publish_in_order(session_id, [event], release)

    def publish_in_order(self, session_id: str, events: list[dict[str, Any]], release_query: str | None = None) -> None:
        """Fire-and-forget publishing of one session's validated events, in call order.

        `publish` calls run concurrently (each on its own pooled connection), so
        two of them may reach Redis in either order; callers without a reply to
        wait for (queries, `Broker.emit`, the simulated research) need their
        events in the order they made them, so each call waits for the one
        before it of the same session.
        """
        previous = self._chains.get(session_id)

        async def publish() -> None:
            if previous is not None:
                with contextlib.suppress(Exception):
                    await previous
            await self.publish(events, None if release_query is None else {session_id: release_query})

        task = self._spawn(publish())
        self._chains[session_id] = task
        task.add_done_callback(lambda done: _forget_chain(self._chains, session_id, done))

    def lock_query(self, session_id: str, request: StartQuery, reply_to: ActorRef[Any]) -> None:
        query_lock = uuid.uuid4().hex

        async def lock() -> None:
            granted = await self.store.lock_query(session_id, query_lock, silent_ms(self.settings))
            if granted:
                self._query_ids[session_id] = query_lock
            reply_to.tell(QueryLocked(request, granted))

        self._answer(lock(), reply_to, fallback=QueryLocked(request, False))

    def unlock_query(self, session_id: str) -> None:
        query_lock = self._query_ids.pop(session_id, None)
        if query_lock is not None:
            self._spawn(self.store.unlock_query(session_id, query_lock))

    # -- what Redis sends (the Subscriber's callbacks, on the loop thread) -----------

    def _on_events(self, session_id: str, payload: bytes) -> None:
        ref = self.directory.get(session_id)
        if ref is None:
            return  # no mirror here (any more): nothing to deliver
        sent = self._sent_from_reply.get(session_id)
        if sent is not None and sent[0] is ref:
            through = committed_through(payload, sent[1])
            if through is not None and through <= sent[2]:
                return  # the copy of this node's own publish, which its mirror sent from the reply (_echo)
        parsed = parse_payload(payload)
        if isinstance(parsed, Deleted):
            message: Any = SessionDeleted(parsed.epoch)
        else:
            message = Committed(parsed.epoch, _frames_of(parsed))
        with contextlib.suppress(ActorDeadError):
            ref.tell(message)

    def _echo(self, session_id: str, payload: bytes, published: bool = True) -> None:
        """This node's own publish, to its mirror straight from the script's reply (actors.messages.Echoed).

        Its connections need not wait for the pub/sub copy: that is a second
        read of Redis's answer on another socket, parsed by redis-py's PubSub,
        in a later loop turn than the 202 it would then follow. When
        `published`, the copy still comes: when the mirror said it sent the
        reply's messages, `_on_events` drops the copy after reading its last
        seq, without parsing it or waking the mirror; otherwise the mirror
        merges it by seq as ever. When not (no other node hears the session),
        no copy comes: what the mirror cannot send at once it gets as the copy
        would have brought it (`Committed`: merged by seq, a hole read back).
        """
        ref = self.directory.get(session_id)
        if ref is None:
            return
        parsed = parse_payload(payload)
        if isinstance(parsed, Deleted) or not parsed.messages:
            return
        message = Echoed(parsed.epoch, _frames_of(parsed))
        try:
            # An idle mirror (as it is after the run_now of the last publish) takes it in this call and
            # says whether it sent it; then the pub/sub copy can be dropped unparsed when it comes.
            handled, sent = ref.ask_now(message) if isinstance(ref, LoopActorRef) else (False, None)
            if not published:
                if not (handled and sent):
                    ref.tell(Committed(message.epoch, message.frames))
            elif not handled:
                ref.tell(message)
            elif sent:
                epoch_line = b"E " + parsed.epoch.encode() + b"\n"
                self._sent_from_reply[session_id] = (ref, epoch_line, parsed.messages[-1].seq)
        except ActorDeadError:
            pass
        except Exception:  # the publish is committed: a mirror's failure must not turn its 202 into a 500
            self.log.exception("echo_failed", session_id=session_id)

    def _on_broadcast(self, payload: bytes) -> None:
        try:
            envelope = orjson.loads(payload)
            origin, exclude, message = envelope["origin"], envelope["exclude"], envelope["message"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.log.warning("broadcast_unreadable", size=len(payload))
            return
        if origin != self.node_id and self.deliver_broadcast is not None:  # the origin delivered its own
            self.deliver_broadcast(message.encode(), frozenset(exclude))

    async def broadcast(self, message: bytes, exclude: list[str]) -> None:
        """Hand a broadcast (a connection-level message's JSON) to every other node."""
        envelope = {"origin": self.node_id, "exclude": exclude, "message": message.decode()}
        try:
            await self.store.broadcast(orjson.dumps(envelope))
            self.nodes = await self.store.live_nodes(silent_ms(self.settings))
        except BackendUnavailable as exc:
            self._unreachable(exc)
            raise

    async def describe_session(self, session_id: str, local: dict[str, Any] | None) -> dict[str, Any] | None:
        """The session as the cluster knows it; connections of every node, this node's figures fresh."""
        meta = await self.store.describe(session_id)
        if meta is None:
            return None
        here = {c["connection_id"]: c for c in (local or {}).get("connections", [])}
        connections = []
        for shared in await self.store.connections(session_id, silent_ms(self.settings)):
            fresh = here.pop(shared["connection_id"], None)
            row = {**shared, **fresh} if fresh is not None else dict(shared)
            row["node_id"] = shared.get("node_id", self.node_id)
            connections.append(row)
        connections.extend({**c, "node_id": self.node_id} for c in here.values())
        fields = ("connection_id", "user_id", "events", "acked_seq", "queued_bytes", "transport", "node_id")
        return {
            "session_id": session_id,
            "epoch": meta["epoch"],
            "last_seq": meta["last_seq"],
            "connections": [{f: c.get(f) for f in fields} for c in connections],
            "buffered_messages": meta["buffered"],
            "created_at": iso_timestamp(meta["created_ms"] / 1000),
            "last_event_at": iso_timestamp(meta["last_event_ms"] / 1000) if meta.get("last_event_ms") else None,
        }

    def _on_restored(self) -> None:
        """The subscription is back after an outage: every mirror reads what it may have missed.

        This node's marks as hearing its sessions are written again first (a Redis
        that restarted without persistence lost them; until they are back, other
        nodes' publishes would not be PUBLISHed to it), then the mirrors read.
        """
        self.log.info("subscription_restored", sessions=len(self.directory))
        self._spawn(self._mark_sessions(resync_all=True))

    async def _mark_sessions(self, *, resync_all: bool = False) -> None:
        """Keep this node's sessions alive and restamp its marks as hearing them (RedisStore.touch).

        A mirror whose mark had lapsed reads the stream from its newest seq: other
        nodes' publishes meanwhile may not have been PUBLISHed to it. `resync_all`
        (after a restore): every mirror reads, even if Redis fails the touch.
        """
        sessions = [sid for sid, _ in self.directory.items()]
        lapsed = sessions if resync_all else []
        try:
            if sessions:
                limits = self._limits()
                found = await self.store.touch(
                    sessions, limits.session_ttl_ms, listener=self.node_id, stale_ms=limits.connection_stale_ms
                )
                if not resync_all:
                    lapsed = found
        finally:
            for sid in lapsed:
                ref = self.directory.get(sid)
                if ref is not None:
                    with contextlib.suppress(ActorDeadError):
                        ref.tell(RESYNC)

    # -- tasks -------------------------------------------------------------------

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(self._guarded(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # A task cancelled before its first step (stop()) never awaited `work`: close it, or
        # Python warns that it was never awaited. Closing a finished coroutine does nothing.
        task.add_done_callback(lambda _: work.close())
        return task

    async def _guarded(self, work: Coroutine[Any, Any, Any]) -> Any:
        try:
            return await work
        except BackendUnavailable as exc:
            self._unreachable(exc)
            return None
        except ActorDeadError:
            return None  # the actor that asked stopped meanwhile (its last connection left): nobody to answer

    def _answer(self, work: Coroutine[Any, Any, None], reply_to: ActorRef[Any], fallback: Any = None) -> None:
        """Run `work`; if Redis fails it, tell `reply_to` LoadFailed (or `fallback`)."""

        async def run() -> None:
            try:
                await work
            except BackendUnavailable as exc:
                self._unreachable(exc)
                with contextlib.suppress(ActorDeadError):
                    reply_to.tell(fallback if fallback is not None else LoadFailed(str(exc)))

        self._spawn(run())


class MirrorBackendAdapter:
    """The node as the mirrors see it (actors.backend.MirrorBackend): `publish` means a session's own event."""

    def __init__(self, node: ClusterNode) -> None:
        self._node = node
        self.open = node.open
        self.fill = node.fill
        self.closed = node.closed
        self.joined = node.joined
        self.left = node.left
        self.take_missed = node.take_missed
        self.publish = node.publish_own
        self.lock_query = node.lock_query
        self.unlock_query = node.unlock_query


def _frames_of(parsed: Published) -> list[Frame]:
    """A payload's messages as frames, born now (the delivery latency counts from here)."""
    now = asyncio.get_running_loop().time()
    frames = []
    for line in parsed.messages:
        frame = Frame(line.data, line.type, line.seq, line.task_id)
        frame.born = now
        frames.append(frame)
    return frames


def _as_history(part: Slice) -> HistorySlice:
    frames = [Frame(m.data, m.type, m.seq, m.task_id) for m in part.messages]
    return HistorySlice(part.epoch, part.first_seq, part.last_seq, frames)


async def _describe(ref: ActorRef[Any]) -> dict[str, Any]:
    if not ref.is_alive():  # left since its session listed it (the common case): no ask, no ActorDeadError
        return {}
    try:
        answer: dict[str, Any] = await ref.ask(DescribeConnection(), block=False)
    except ActorDeadError:
        return {}
    return answer


def _forget_chain(chains: dict[str, asyncio.Future[Any]], session_id: str, done: asyncio.Future[Any]) -> None:
    if chains.get(session_id) is done:
        del chains[session_id]
