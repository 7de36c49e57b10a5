"""The narrow interface between a session and whatever answers its queries.

Backends (the demo agent, an HTTP upstream) live in `broker.queries`; the
session only sees `QueryBackend.start()` and a `QuerySink` to report to.
The sink turns each report into a message to the session, so a backend may
call it from any thread and the session's own order stays the truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from actors.messages import QueryEvent

if TYPE_CHECKING:
    from pykka import ActorRef

    from actors.clock import Clock, TimerHandle


@dataclass(frozen=True, slots=True)
class QueryRequest:
    session_id: str
    user_id: str | None
    query: str
    #: the client's whole query message (include_context, system_prompt, ...)
    message: dict[str, Any]


class QuerySink:
    """Where a running query reports. Thread-safe; reports after the end are ignored."""

    __slots__ = ("_ended", "_query_id", "_session")

    def __init__(self, session: ActorRef[Any], query_id: str) -> None:
        self._session = session
        self._query_id = query_id
        self._ended = False

    def chunk(self, text: str) -> None:
        if text and not self._ended:
            self._tell("chunk", text)

    def done(self) -> None:
        if not self._ended:
            self._ended = True
            self._tell("done", "")

    def fail(self, error: str) -> None:
        if not self._ended:
            self._ended = True
            self._tell("error", error)

    @property
    def ended(self) -> bool:
        return self._ended

    def _tell(self, kind: str, text: str) -> None:
        if self._session.is_alive():
            self._session.tell(QueryEvent(self._query_id, kind, text))


class QueryBackend(Protocol):
    def start(self, request: QueryRequest, sink: QuerySink, clock: Clock) -> TimerHandle:
        """Begin answering; return a handle whose cancel() abandons the query."""
        ...
