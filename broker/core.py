"""The Broker: the one object handlers (and in-process publishers) talk to.

It owns the session directory, the counters and the settings, and turns
requests into actor messages. It holds no session state itself.
Everything here runs on the dispatcher (IOLoop) thread.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING, Any

import pykka

from actors.connection import ConnectionActor
from actors.directory import SessionDirectory
from actors.messages import (
    Attach,
    CloseSession,
    DescribeConnection,
    DescribeSession,
    Publish,
)
from actors.stats import BrokerStats
from broker.config import DEFAULT_SETTINGS, Settings

if TYPE_CHECKING:
    from pykka import ActorRef

    from actors.filters import EventFilter
    from actors.transport import Transport


async def resolve(value: Any) -> Any:
    """Await actor replies, including a reply that is itself a forwarded future."""
    while isinstance(value, pykka.Future):
        value = await value
    return value


class Broker:
    def __init__(self, settings: Settings = DEFAULT_SETTINGS) -> None:
        self.stats = BrokerStats()
        self.directory = SessionDirectory(settings, self.stats)
        self.started_at = time.monotonic()
        self.ready = False
        self.draining = False
        #: connections per session, counted at the handshake (limits are checked there)
        self.connection_counts: dict[str, int] = {}
        self.open_connections = 0

    @property
    def settings(self) -> Settings:
        return self.directory.settings

    @settings.setter
    def settings(self, value: Settings) -> None:
        self.directory.settings = value

    # -- publishing -------------------------------------------------------

    async def publish(self, events: list[dict[str, Any]]) -> list[int | None]:
        """Publish validated events (broker.validation.normalize_events); one seq per event.

        Events of one session keep their order; sessions are published to in
        parallel.
        """
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

    # -- connections ------------------------------------------------------

    def admit_connection(self, session_id: str) -> str | None:
        """Why a new connection for `session_id` must be refused (503), or None."""
        if self.draining:
            return "server is shutting down"
        if self.open_connections >= self.settings.max_connections:
            return "too many connections"
        if self.connection_counts.get(session_id, 0) >= self.settings.max_connections_per_session:
            return "too many connections for this session"
        return None

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
    ) -> ActorRef[Any]:
        """Start the connection actor and attach it to its session."""
        connection_id = "c-" + uuid.uuid4().hex[:16]
        session = self.directory.get_or_create(session_id)
        ref = ConnectionActor.start(connection_id, session_id, session, transport, self, self.stats)
        self.connection_counts[session_id] = self.connection_counts.get(session_id, 0) + 1
        self.open_connections += 1
        session.tell(
            Attach(ref, connection_id, user_id, event_filter, replay, last_seq, epoch, greeting_type)
        )
        return ref

    def connection_closed(self, session_id: str) -> None:
        self.open_connections -= 1
        count = self.connection_counts.get(session_id, 0) - 1
        if count > 0:
            self.connection_counts[session_id] = count
        else:
            self.connection_counts.pop(session_id, None)

    # -- sessions ---------------------------------------------------------

    async def describe_session(self, session_id: str) -> dict[str, Any] | None:
        ref = self.directory.get(session_id)
        if ref is None:
            return None
        try:
            info = await resolve(ref.ask(DescribeSession(), block=False))
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
        ref = self.directory.get(session_id)
        if ref is None:
            return False
        try:
            return bool(await resolve(ref.ask(CloseSession(), block=False)))
        except pykka.ActorDeadError:
            return False

    def session_exists(self, session_id: str) -> bool:
        return session_id in self.directory

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
        }


async def _describe_connection(ref: ActorRef[Any]) -> dict[str, Any]:
    try:
        return await ref.ask(DescribeConnection(), block=False)
    except pykka.ActorDeadError:
        return {"acked_seq": None, "queued_bytes": 0}
