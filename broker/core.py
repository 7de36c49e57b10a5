"""The Broker: the one object handlers (and in-process publishers) talk to.

It owns the session directory, the counters and the settings, and turns
requests into actor messages. It holds no session state itself.
Everything here runs on the dispatcher (IOLoop) thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import TYPE_CHECKING, Any, cast

import orjson
import pykka
import structlog

from actors.connection import ConnectionActor
from actors.directory import SessionDirectory
from actors.inbox import LoopActorRef
from actors.lease import TokenLease
from actors.messages import (
    FOLLOW_SETTINGS,
    Attach,
    BroadcastFrame,
    CloseConnection,
    CloseSession,
    DescribeConnection,
    DescribeSession,
    Frame,
    Publish,
)
from actors.runtime import current_dispatcher
from actors.session import SessionActor
from actors.stats import BrokerStats
from actors.wire import control_frame, iso_timestamp
from broker.config import DEFAULT_SETTINGS, Settings
from broker.queries import make_query_backend
from broker.research import SimulatedResearch, forward_to_upstream
from broker.tokens import TokenVerifier
from broker.validation import normalize_events

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from pykka import ActorRef

    from actors.filters import EventFilter
    from actors.transport import Transport
    from broker.cluster.node import ClusterNode
    from broker.descriptors import DescriptorBudget
    from broker.gc_tuning import GcPauses

log = structlog.get_logger("actor_broker.connection")

#: Actor turns a publish handler runs before it answers: a session's connection actors (ten in the
#: latency scenario) and whatever was ready ahead of them, bounded so a backlog elsewhere waits for its tick.
DELIVER_NOW_TURNS = 64


async def resolve(value: Any) -> Any:
    """Await actor replies, including a reply that is itself a forwarded future."""
    while isinstance(value, pykka.Future):
        value = await value
    return value


class Broker:
    def __init__(self, settings: Settings = DEFAULT_SETTINGS) -> None:
        self.stats = BrokerStats()
        #: the whole settings (limits, tokens, listeners); actors see the part they follow through the directory
        self._settings = settings
        self.directory = SessionDirectory(settings, self.stats)
        self.directory.query_backend = make_query_backend(settings)
        self._dispatcher = current_dispatcher()
        self.tokens = TokenVerifier(settings)
        #: garbage-collection pause histograms (broker.gc_tuning.GcPauses), when the daemon measures them
        self.gc_pauses: GcPauses | None = None
        self.started_at = time.monotonic()
        self._ready = False
        self.draining = False
        #: this node's place in a cluster (backend = "redis"); None: every session lives in this process
        self.cluster: ClusterNode | None = None
        if settings.backend == "redis":
            from broker.cluster.node import ClusterNode, MirrorBackendAdapter

            self.cluster = ClusterNode.from_settings(lambda: self.settings, self.directory, self.stats)
            self.directory.mirror_backend = MirrorBackendAdapter(self.cluster)
            self.cluster.deliver_broadcast = self._deliver_broadcast
        #: every open client connection (WebSocket or SSE), from its handshake to its socket's close
        self.connections: dict[str, OpenConnection] = {}
        #: open connections per session and per user, kept with `connections` (limits are checked at handshakes)
        self.connection_counts: dict[str, int] = {}
        self.user_counts: dict[str, int] = {}
        #: the process's descriptors (broker.descriptors), when the daemon counts them
        self.descriptors: DescriptorBudget | None = None
        #: tasks the broker started and must keep a reference to until they end
        self._background: set[asyncio.Future[None]] = set()

    @property
    def settings(self) -> Settings:
        return self._settings

    @settings.setter
    def settings(self, value: Settings) -> None:
        """New settings (a SIGHUP reload): every session follows them now, idle ones too."""
        self._settings = value
        self.directory.settings = value
        for ref in self.directory.refs():
            with contextlib.suppress(pykka.ActorDeadError):
                ref.tell(FOLLOW_SETTINGS)

    @property
    def ready(self) -> bool:
        """Ready to serve (/readyz): started, not draining, and, in a cluster, Redis answering and heard."""
        return self._ready and (self.cluster is None or self.cluster.ready)

    @ready.setter
    def ready(self, value: bool) -> None:
        self._ready = value

    async def start(self) -> None:
        """Start what runs beside the actors: the cluster node (it starts even while Redis is down)."""
        if self.cluster is not None:
            await self.cluster.start()

    async def close(self) -> None:
        """Stop it again (after the actors stopped)."""
        if self.cluster is not None:
            await self.cluster.stop()

    # -- publishing -------------------------------------------------------

    async def publish(self, events: list[dict[str, Any]]) -> list[int | None]:
        """Publish validated events (broker.validation.normalize_events); one seq per event.

        Events of one session keep their order; sessions are published to in
        parallel. In a cluster, `BackendUnavailable` when Redis cannot be reached
        (the handlers answer 503).
        """
        if self.cluster is not None:
            committed = await self.cluster.publish(events)
            self._dispatcher.run_now(DELIVER_NOW_TURNS)  # this node's deliveries (ClusterNode._echo) before the 202
            return committed
        by_session: dict[str, list[int]] = {}
        for index, event in enumerate(events):
            by_session.setdefault(event["session_id"], []).append(index)
        replies = [
            self.directory.get_or_create(sid).ask(Publish([events[i] for i in indexes]), block=False)
            for sid, indexes in by_session.items()
        ]
        seqs: list[int | None] = [None] * len(events)
        for indexes, reply in zip(by_session.values(), replies, strict=True):
            for index, seq in zip(indexes, await resolve(reply), strict=True):
                seqs[index] = seq
        return seqs

    def publish_now(self, events: list[dict[str, Any]]) -> list[int | None] | None:
        """The seqs of validated events published before this returns; None: `await publish(events)` instead.

        On the memory backend, events for one existing session whose actor is
        idle are handled at once (`LoopActorRef.ask_now`): the same `Publish`,
        the same answer, without the ask's future and the loop turns between it
        and the 202 (issue 14); and the session's connections get the events
        before this returns (`Dispatcher.run_now`), so the answer is written
        after the deliveries, not between the publish and them. None for a cluster (the publish is a Redis round
        trip), a new or busy session, or several sessions.
        """
        if self.cluster is not None or not events:
            return None
        session_id = events[0]["session_id"]
        if len(events) > 1 and any(event["session_id"] != session_id for event in events):
            return None
        ref = self.directory.get(session_id)
        if not isinstance(ref, LoopActorRef):
            return None
        handled, seqs = ref.ask_now(Publish(events))
        if not handled:
            return None
        self._dispatcher.run_now(DELIVER_NOW_TURNS)  # the deliveries before the publisher's answer
        return cast("list[int | None]", seqs)

    async def publish_events(self, *events: dict[str, Any]) -> list[int | None]:
        """In-process publishing with a reply: validate (ValidationFailed), publish, return seqs.

        Call it on the broker's loop. From other threads use `emit()`.
        """
        return await self.publish(normalize_events(list(events), session_id=None, now=time.time()))

    def emit(self, *events: dict[str, Any]) -> None:
        """Fire-and-forget publishing from any thread (e.g. an orchestrator's worker).

        Validation happens here, in the caller's thread, so a bad event raises
        `broker.validation.ValidationFailed` at the call site; delivery then
        happens on the broker's loop, in the order of emit() calls per thread.
        """
        normalized = normalize_events(list(events), session_id=None, now=time.time())

        def publish() -> None:
            by_session: dict[str, list[dict[str, Any]]] = {}
            for event in normalized:
                by_session.setdefault(event["session_id"], []).append(event)
            for session_id, batch in by_session.items():
                if self.cluster is not None:
                    self.cluster.publish_in_order(session_id, batch)
                else:
                    self.directory.get_or_create(session_id).tell(Publish(batch))

        if self._dispatcher.on_thread():
            publish()
        else:
            self._dispatcher.submit_from_thread(publish)

    # -- research and broadcast ---------------------------------------------

    async def start_research(self, session_id: str, query: str, user_id: str | None) -> None:
        """Create the session, emit session_started, and get the research going."""
        started = {"type": "session_started", "session_id": session_id, "query": query, "user_id": user_id}
        await self.publish(normalize_events([started], session_id=session_id, now=time.time()))
        url = self.settings.research_upstream_url
        if not url:
            SimulatedResearch.start(self._publisher_for(session_id), session_id, query)
            return
        # The client hears 201 at once and connects; how the research service
        # took the start reaches it as an event (a slow service must not hold
        # the answer for up to its 15 s timeout).
        forward = asyncio.ensure_future(self._forward_research(url, session_id, query, user_id))
        self._background.add(forward)
        forward.add_done_callback(self._background.discard)

    async def _forward_research(self, url: str, session_id: str, query: str, user_id: str | None) -> None:
        problem = await forward_to_upstream(url, session_id, query, user_id)
        if problem is not None:
            failed = {"type": "error", "session_id": session_id, "error": problem, "code": "research_upstream"}
            await self.publish(normalize_events([failed], session_id=session_id, now=time.time()))

    def _publisher_for(self, session_id: str) -> Callable[[list[dict[str, Any]]], bool]:
        """Publish validated events into one session, in call order, from an actor (the simulated run).

        Returns False once the session is gone (deleted): the caller stops.
        """
        if self.cluster is not None:
            cluster = self.cluster

            def publish_shared(events: list[dict[str, Any]]) -> bool:
                cluster.publish_in_order(session_id, events)
                return True

            return publish_shared
        session = self.directory.get_or_create(session_id)

        def publish_here(events: list[dict[str, Any]]) -> bool:
            if not session.is_alive():
                return False
            session.tell(Publish(events))
            return True

        return publish_here

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def broadcast(self, message: dict[str, Any], exclude: frozenset[str] = frozenset()) -> dict[str, int]:
        """A connection-level message to every connected client outside `exclude`, on every node; no history.

        The answer counts this node's connections (`delivered`) and, in a
        cluster, the nodes it reached (`nodes`, this one included).
        """
        frame = control_frame({**message, "timestamp": iso_timestamp(time.time())})
        delivered = await self._broadcast_here(frame, exclude)
        if self.cluster is None:
            return {"delivered": delivered}
        await self.cluster.broadcast(frame.data, sorted(exclude))
        return {"delivered": delivered, "nodes": len(self.cluster.nodes)}

    def _deliver_broadcast(self, data: bytes, exclude: frozenset[str]) -> None:
        """Another node's broadcast, for this node's connections."""
        self._spawn(self._broadcast_here(Frame(data, orjson.loads(data)["type"]), exclude))

    async def _broadcast_here(self, frame: Frame, exclude: frozenset[str]) -> int:
        replies = [
            ref.ask(BroadcastFrame(frame), block=False)
            for session_id, ref in self.directory.items()
            if session_id not in exclude
        ]
        delivered = 0
        for reply in replies:
            try:
                delivered += await resolve(reply) or 0
            except pykka.ActorDeadError:
                continue
        return delivered

    # -- connections ------------------------------------------------------

    def admit_connection(self, session_id: str, user_id: str | None = None) -> str | None:
        """Why a new connection must be refused (503), or None. Counts each refusal by limit."""
        settings = self.settings
        if self.draining:
            return "server is shutting down"
        if self.cluster is not None and not self.cluster.ready:
            return "backend unavailable"
        limit: str | None = None
        why = ""
        if self.open_connections >= settings.max_connections:
            limit, why = "max_connections", "too many connections"
        elif self.descriptors is not None and self.descriptors.exhausted():  # docs/protocol.md section 5, "Sockets"
            limit, why = "fd_budget", "too many open descriptors: the rest are kept for health checks and publishing"
        elif self.connection_counts.get(session_id, 0) >= settings.max_connections_per_session:
            limit, why = "max_connections_per_session", "too many connections for this session"
        elif user_id is not None and self.user_counts.get(user_id, 0) >= settings.max_connections_per_user:
            limit, why = "max_connections_per_user", "too many connections for this user"
        elif not self.session_exists(session_id) and len(self.directory) >= settings.max_sessions:
            limit, why = "max_sessions", "too many sessions"
        if limit is None:
            return None
        self.stats.refused(limit)
        return why

    def admit_sessions(self, session_ids: Iterable[str], *, count: bool = True) -> str | None:
        """Why publishing to these sessions must be refused (503), or None; the refusal counted unless not `count`."""
        new = sum(1 for sid in set(session_ids) if not self.session_exists(sid))
        if new and len(self.directory) + new > self.settings.max_sessions:
            if count:
                self.stats.refused("max_sessions")
            return "too many sessions"
        return None

    @property
    def open_connections(self) -> int:
        """Client connections whose socket is open (their actors may still be starting or stopping)."""
        return len(self.connections)

    def open_connection(
        self,
        *,
        session_id: str,
        user_id: str | None,
        event_filter: EventFilter,
        replay: str,
        last_seq: int | None,
        epoch: str | None,
        greeting_type: str,
        transport: Transport,
        remote_ip: str | None = None,
        expires_at: float | None = None,
        refresh: Callable[[str], float] | None = None,
    ) -> OpenConnection:
        """Start the connection actor, attach it to its session, and count it until `connection_closed`.

        Called by a transport's handler once its handshake passed
        `admit_connection` and its checks; `refresh` verifies a refresh
        token for this session and user (with `expires_at`, when tokens are required).
        """
        connection_id = "c-" + uuid.uuid4().hex[:16]
        session = self.directory.get_or_create(session_id)
        lease = TokenLease(expires_at, refresh) if expires_at is not None and refresh is not None else None
        ref = ConnectionActor.start(
            connection_id, session_id, session, transport, self.directory.current_settings, self.stats, user_id, lease
        )
        connection = OpenConnection(connection_id, session_id, user_id, ref)
        self.connections[connection_id] = connection
        self.connection_counts[session_id] = self.connection_counts.get(session_id, 0) + 1
        if user_id is not None:
            self.user_counts[user_id] = self.user_counts.get(user_id, 0) + 1
        session.tell(Attach(ref, connection_id, user_id, event_filter, replay, last_seq, epoch, greeting_type))
        log.info(
            "connection_opened",
            session_id=session_id,
            connection_id=connection_id,
            user_id=user_id,
            transport=transport.kind,
            events=event_filter.echo(),
            replay=replay if last_seq is None else f"last_seq={last_seq}",
            remote_ip=remote_ip,
        )
        return connection

    def connection_closed(self, connection: OpenConnection) -> None:
        """The connection's socket closed: it no longer counts against any limit."""
        if self.connections.pop(connection.connection_id, None) is None:
            return
        _decrement(self.connection_counts, connection.session_id)
        if connection.user_id is not None:
            _decrement(self.user_counts, connection.user_id)

    def tell_connections(self, *messages: Frame | CloseConnection, skip: set[str] | None = None) -> list[str]:
        """Tell every open connection (not in `skip`) these messages, in order; the ids told.

        Shutdown uses it (daemon drain and the embedded broker): the
        connections are the broker's own list, not a scan of the actor registry.
        """
        told = []
        for connection_id, connection in list(self.connections.items()):
            if skip is not None and connection_id in skip:
                continue
            told.append(connection_id)
            for message in messages:
                with contextlib.suppress(pykka.ActorDeadError):
                    connection.ref.tell(message)
        return told

    def close_all(self, code: int, reason: str, *, notice: Frame | None = None) -> None:
        """Close every open connection at once (after `notice`, when given)."""
        close = CloseConnection(code, reason, immediately=True)
        self.tell_connections(*((notice, close) if notice is not None else (close,)))

    async def stop_actors(self, timeout: float) -> bool:
        """Stop connections, then sessions, then anything else the broker's loop runs, each group awaited.

        Connections first so that sessions see their connections leave (and
        update the counters) before they go themselves. False if `timeout`
        passed first (what was left is logged).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for group in (ConnectionActor, SessionActor, None):
            live = reversed(self._dispatcher.actors())
            refs = [ref for ref in live if group is None or ref.actor_class is group]
            if not refs:
                continue
            try:
                await asyncio.wait_for(
                    asyncio.gather(*(_stopped(ref) for ref in refs)), max(0.0, deadline - loop.time())
                )
            except TimeoutError:
                log.warning("actors_stop_timeout", kind=getattr(group, "__name__", "other"), count=len(refs))
                return False
        return True

    # -- sessions ---------------------------------------------------------

    async def describe_session(self, session_id: str) -> dict[str, Any] | None:
        if self.cluster is not None:
            local = await self._describe_here(session_id)
            return await self.cluster.describe_session(session_id, local)
        return await self._describe_here(session_id)

    async def _describe_here(self, session_id: str) -> dict[str, Any] | None:
        ref = self.directory.get(session_id)
        if ref is None:
            return None
        try:
            info: dict[str, Any] | None = await resolve(ref.ask(DescribeSession(), block=False))
        except pykka.ActorDeadError:
            return None
        if info is None:
            return None
        connections = info["connections"]
        answers = await asyncio.gather(
            *(_describe_connection(c.pop("ref")) for c in connections), return_exceptions=False
        )
        for connection, answer in zip(connections, answers, strict=True):
            connection.update(answer)
        return info

    async def delete_session(self, session_id: str) -> bool:
        if self.cluster is not None:  # every node's clients hear it from Redis, this one's too
            return await self.cluster.store.delete(session_id)
        ref = self.directory.get(session_id)
        if ref is None:
            return False
        try:
            return bool(await resolve(ref.ask(CloseSession(), block=False)))
        except pykka.ActorDeadError:
            return False

    def session_exists(self, session_id: str) -> bool:
        """Whether this process holds the session (in a cluster: a connection here follows it)."""
        return session_id in self.directory

    async def claim_session(self, session_id: str) -> bool:
        """Research start with a chosen id: False if the session exists already (409), anywhere."""
        if self.cluster is not None:
            return await self.cluster.store.create(session_id, int(self.settings.session_ttl * 1000))
        return not self.session_exists(session_id)

    # -- stats ------------------------------------------------------------

    def stats_snapshot(self) -> dict[str, Any]:
        s = self.stats
        return {
            "status": "draining" if self.draining else "healthy",
            "active_connections": s.active_connections,
            "active_sessions": len(self.directory),
            "total_buffered_messages": s.total_buffered_messages,
            "sessions_with_buffer": s.sessions_with_buffer,
            "total_messages_sent": s.total_messages_sent,
            "total_events_received": s.total_events_received,
            "throttled_events": s.throttled_events,
            "slow_consumer_disconnects": s.slow_consumer_disconnects,
            "connected_sessions": sorted(s.connected_sessions),
            "uptime_seconds": round(time.monotonic() - self.started_at, 3),
        } | ({} if self.cluster is None else {"node_id": self.cluster.node_id, "nodes": len(self.cluster.nodes)})


async def _describe_connection(ref: ActorRef[Any]) -> dict[str, Any]:
    try:
        answer: dict[str, Any] = await ref.ask(DescribeConnection(), block=False)
        return answer
    except pykka.ActorDeadError:
        return {"acked_seq": None, "queued_bytes": 0, "transport": None}


class OpenConnection:
    """A client connection as the broker counts it: from its handshake to its socket's close."""

    __slots__ = ("connection_id", "ref", "session_id", "user_id")

    def __init__(self, connection_id: str, session_id: str, user_id: str | None, ref: ActorRef[Any]) -> None:
        self.connection_id = connection_id
        self.session_id = session_id
        self.user_id = user_id
        #: the connection's actor (it may have stopped while the socket closes)
        self.ref = ref


async def _stopped(ref: ActorRef[Any]) -> None:
    with contextlib.suppress(pykka.ActorDeadError):
        await ref.stop(block=False)


def _decrement(counts: dict[str, int], key: str) -> None:
    remaining = counts.get(key, 0) - 1
    if remaining > 0:
        counts[key] = remaining
    else:
        counts.pop(key, None)
