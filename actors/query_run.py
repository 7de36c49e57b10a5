"""A session's agent query: one at a time, from `query_start` to `complete` or `error`.

The session actor owns one `QueryRunner` and hands it what concerns queries
(a client's StartQuery, the backend's QueryEvents, the session's end); the
runner decides what the session publishes and hands each event back through
`commit`, so every query message gets its seq in the session's one order
(docs/protocol.md section 3.7).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from actors.ids import new_event_id
from actors.queries import QueryRequest, QuerySink
from actors.wire import error_frame, iso_timestamp

if TYPE_CHECKING:
    from pykka import ActorRef

    from actors.clock import Clock, TimerHandle
    from actors.messages import Frame, QueryEvent, StartQuery
    from actors.queries import QueryBackend

log = structlog.get_logger("actor_broker.session")

BUSY = "a query is already running in this session; wait for its complete or error"


class _RunningQuery:
    __slots__ = ("chunks", "handle", "query_id", "sink")

    def __init__(self, query_id: str, sink: QuerySink) -> None:
        self.query_id = query_id
        self.sink = sink
        self.chunks: list[str] = []
        self.handle: TimerHandle | None = None


class QueryRunner:
    """The running query of one session, if any, and the events it turns into."""

    __slots__ = ("_clock", "_commit", "_session", "_session_id", "running")

    def __init__(
        self, session_id: str, session: ActorRef[Any], commit: Callable[[dict[str, Any]], int], clock: Clock
    ) -> None:
        self._session_id = session_id
        self._session = session
        #: publishes a session-made event (history, seq, fan-out); returns its seq
        self._commit = commit
        self._clock = clock
        self.running: _RunningQuery | None = None

    def start(self, request: StartQuery, backend: QueryBackend | None) -> Frame | None:
        """Start the client's query; an `error` (code busy) for its sender alone if one runs already."""
        if self.running is not None:
            return error_frame("busy", BUSY, self._clock.time())
        query_id = "q-" + uuid.uuid4().hex[:16]
        sink = QuerySink(self._session, query_id)
        running = self.running = _RunningQuery(query_id, sink)
        message = request.message
        self._emit("query_start", query_id, query=message["query"], query_id=query_id, user_id=request.user_id)
        try:
            if backend is None:
                raise RuntimeError("no query backend is configured")
            running.handle = backend.start(
                QueryRequest(self._session_id, request.user_id, message["query"], message), sink, self._clock
            )
        except Exception as exc:  # noqa: BLE001 - a backend that cannot start ends the query, not the session
            log.warning("query_backend_failed", session_id=self._session_id, error=str(exc))
            sink.fail(f"the query backend could not start: {exc}")
        return None

    def on_event(self, event: QueryEvent) -> bool:
        """What the backend produced; True if it ended the query."""
        running = self.running
        if running is None or running.query_id != event.query_id:
            return False  # a late report from an abandoned query
        if event.kind == "chunk":
            running.chunks.append(event.text)
            number = len(running.chunks)
            self._emit("chunk", running.query_id, content=event.text, chunk_number=number, query_id=running.query_id)
            return False
        self.running = None
        if event.kind == "done":
            self._emit(
                "complete",
                running.query_id,
                full_response="".join(running.chunks),
                total_chunks=len(running.chunks),
                query_id=running.query_id,
            )
        else:
            self._emit("error", running.query_id, error=event.text, code="query_failed", query_id=running.query_id)
        return True

    def abandon(self) -> None:
        """The session ends: stop the backend; its late reports are ignored."""
        running, self.running = self.running, None
        if running is not None:
            running.sink.fail("session closed")
            if running.handle is not None:
                running.handle.cancel()

    def close(self) -> None:
        """The session has stopped: abandon any query and let go of the session's commit.

        The commit is a method of the session actor, which holds this runner:
        a cycle that reference counting cannot free. Cut, a stopped session is
        freed at once, instead of waiting for a full collection that the
        daemon's garbage-collector set-up (broker/gc_tuning.py) may have frozen it
        out of until the next thaw: a node on Redis ends a session mirror each
        time the last follower of a session on it leaves.
        """
        self.abandon()
        self._commit = _closed

    def _emit(self, etype: str, correlation_id: str, **fields: Any) -> None:
        """An event the session itself emits, shaped like a published one; correlated by query."""
        self._commit(
            {
                "type": etype,
                "session_id": self._session_id,
                **fields,
                "event_id": new_event_id(),
                "correlation_id": correlation_id,
                "timestamp": iso_timestamp(self._clock.time()),
            }
        )


def _closed(_event: dict[str, Any]) -> int:
    """The commit of a runner whose session has stopped: nothing is published any more."""
    return 0
