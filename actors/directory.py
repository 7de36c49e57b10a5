"""Which actor holds which session; creates sessions on demand.

Used only on the dispatcher thread (handlers and actors both run there), so
a dict serves. Sessions remove themselves when they expire or are deleted;
anything that reaches a session after that is forwarded here again and
lands on a fresh one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pykka import ActorRef

from actors.stats import BrokerStats

if TYPE_CHECKING:
    from actors.backend import MirrorBackend
    from actors.queries import QueryBackend
    from actors.settings import ActorSettings


class SessionDirectory:
    """Session ids to session actors, and the settings every actor follows."""

    def __init__(self, settings: ActorSettings, stats: BrokerStats | None = None) -> None:
        #: the settings in force; replaced whole on a reload (actors read them through current_settings)
        self.settings = settings
        self.stats = stats or BrokerStats()
        self._sessions: dict[str, ActorRef[Any]] = {}
        #: answers agent queries (broker.queries); set by the Broker
        self.query_backend: QueryBackend | None = None
        #: in a cluster, the shared store the sessions mirror (actors/mirror.py); None: sessions live here
        self.mirror_backend: MirrorBackend | None = None

    def current_settings(self) -> ActorSettings:
        """The one way settings reach actors (actors.settings.SettingsGetter)."""
        return self.settings

    def get(self, session_id: str) -> ActorRef[Any] | None:
        return self._sessions.get(session_id)

    def get_or_create(self, session_id: str) -> ActorRef[Any]:
        ref = self._sessions.get(session_id)
        if ref is None:
            if self.mirror_backend is not None:
                from actors.mirror import MirrorSessionActor

                ref = MirrorSessionActor.start(session_id, self, self.mirror_backend)
            else:
                from actors.session import SessionActor

                ref = SessionActor.start(session_id, self)
            self._sessions[session_id] = ref
        return ref

    def remove(self, session_id: str, ref: ActorRef[Any]) -> None:
        if self._sessions.get(session_id) is ref:
            del self._sessions[session_id]

    def refs(self) -> list[ActorRef[Any]]:
        return list(self._sessions.values())

    def items(self) -> list[tuple[str, ActorRef[Any]]]:
        return list(self._sessions.items())

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._sessions
