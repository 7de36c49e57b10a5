"""The messages actors exchange. Immutable where they cross actors.

A `Frame` is the one exception worth explaining: it is an encoded message
(orjson bytes) made once by a session and shared, by reference, with every
connection it goes to. The session owns its `delivered` flag; connections
only read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from pykka import ActorRef

    from actors.filters import EventFilter


def encode(message: dict[str, Any]) -> bytes:
    """JSON bytes of a message, in an allocation of their own size.

    orjson's result keeps its whole working buffer (about 4 KiB) alive as
    long as the bytes live; history and queues hold frames by the thousand,
    so the one copy here saves about 4 KiB a frame.
    """
    return bytes(memoryview(orjson.dumps(message)))


class Frame:
    """One encoded message on its way to sockets."""

    __slots__ = ("born", "data", "delivered", "seq", "sse", "task_id", "type", "wire")

    def __init__(self, data: bytes, type: str, seq: int | None = None, task_id: str | None = None) -> None:
        #: the JSON text, encoded once for every connection
        self.data = data
        #: the message's "type", for filters and compaction
        self.type = type
        #: the session seq (None for connection-level messages)
        self.seq = seq
        #: for task_progress: its task, so a newer one can supersede it in a slow queue
        self.task_id = task_id
        #: set by the session once it was queued to at least one connection (replay=missed)
        self.delivered = False
        #: the transport's encoding of `data` (a WebSocket frame), made by the first
        #: connection that writes it and reused by every other one
        self.wire: bytes | None = None
        #: the same for Server-Sent Events (an `id:` and `data:` event), made by the first SSE connection
        self.sse: bytes | None = None
        #: clock.monotonic() when the session made it (for publish-to-write latency); 0 if unknown
        self.born = 0.0

    def __repr__(self) -> str:
        return f"Frame({self.type!r}, seq={self.seq}, {len(self.data)} bytes)"


# -- to a session --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Publish:
    """Validated events for this session; the reply is one seq (or None) per event."""

    events: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Attach:
    """A connection joins: greet it, replay what it asks for, then send it live messages."""

    connection: ActorRef[Any]
    connection_id: str
    user_id: str | None
    filter: EventFilter
    #: "all" | "missed" | "none"; ignored when last_seq is given
    replay: str
    last_seq: int | None
    epoch: str | None
    #: "connected" on /ws, "connection_established" on /ws/research/{id}
    greeting_type: str


@dataclass(frozen=True, slots=True)
class Detach:
    connection_id: str


@dataclass(frozen=True, slots=True)
class ChangeFilter:
    """subscribe / unsubscribe from a client; items were validated by the connection."""

    connection_id: str
    subscribe: bool
    items: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DescribeSession:
    """Ask: the session's state for GET /api/sessions/{id}."""


@dataclass(frozen=True, slots=True)
class CloseSession:
    """DELETE /api/sessions/{id}: tell clients, close them, forget everything."""


@dataclass(frozen=True, slots=True)
class FlushHeld:
    """Timer: a held task_progress may be due."""

    task_id: str


@dataclass(frozen=True, slots=True)
class ExpiryCheck:
    """Timer: the session may have outlived session_ttl."""


# -- to a connection -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Replay:
    """Frames from history (and the greeting before them), written flow-controlled."""

    frames: list[Frame]


@dataclass(frozen=True, slots=True)
class CloseConnection:
    """Close after what is queued before it was written (graceful), or at once."""

    code: int
    reason: str
    immediately: bool = False


@dataclass(frozen=True, slots=True)
class ClientMessage:
    """A frame the client sent: str for text, bytes for binary."""

    data: str | bytes


@dataclass(frozen=True, slots=True)
class TransportClosed:
    """The socket is gone (client left, network died, or we closed it)."""

    #: the peer's close code and reason, when it sent one (for the connection_closed log line)
    code: int | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class DescribeConnection:
    """Ask: this connection's acked seq and unsent bytes."""


@dataclass(frozen=True, slots=True)
class TokenExpiry:
    """Timer: the connection's token may have expired."""


class FlushNow:
    """A connection's own reminder to write what its turn queued, in one write."""

    __slots__ = ()


FLUSH_NOW = FlushNow()


class FollowSettings:
    """The broker's settings were reloaded: apply what applies to a live session."""

    __slots__ = ()


FOLLOW_SETTINGS = FollowSettings()


class Flushed:
    """The transport took the previous write."""

    __slots__ = ()


FLUSHED = Flushed()


class KeepaliveCheck:
    """Timer: write a keepalive if nothing was written for keepalive_interval."""

    __slots__ = ()


KEEPALIVE_CHECK = KeepaliveCheck()


# -- agent queries -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartQuery:
    """A client's validated query; the session runs one at a time."""

    connection: ActorRef[Any]
    connection_id: str
    user_id: str | None
    message: dict[str, Any]


@dataclass(frozen=True, slots=True)
class QueryEvent:
    """What a query backend produced: kind is "chunk", "done" or "error"."""

    query_id: str
    kind: str
    text: str = ""


@dataclass(frozen=True, slots=True)
class BroadcastFrame:
    """A connection-level message for every connection of the session; reply: how many."""

    frame: Frame


# -- a session on one node of a cluster (actors/mirror.py) ----------------------


@dataclass(frozen=True, slots=True)
class HistorySlice:
    """Part of a session's shared history, as the cluster's store holds it."""

    #: the session's epoch ("" when the store has no such session)
    epoch: str
    #: the oldest seq the store still holds (last_seq + 1 when it holds none)
    first_seq: int
    #: the session's newest seq (0: none yet)
    last_seq: int
    #: the messages read, in seq order, each with its seq
    frames: list[Frame]


@dataclass(frozen=True, slots=True)
class Loaded:
    """The store answered a mirror's read: its first load (the tail of the history) or a fill of a hole."""

    slice: HistorySlice


@dataclass(frozen=True, slots=True)
class LoadFailed:
    """The store could not be read; the mirror tries again (the node's backoff) or waits for Resync."""

    error: str


@dataclass(frozen=True, slots=True)
class Committed:
    """Messages the cluster committed to this session, in seq order, as pub/sub carried them."""

    epoch: str
    frames: list[Frame]


@dataclass(frozen=True, slots=True)
class Echoed:
    """Messages this node's own publish committed, from the script's reply, ahead of their pub/sub copy.

    The mirror delivers them only when they are exactly the next seqs it
    expects; otherwise it drops them and the copy (always sent) delivers them
    in order, with the hole-filling `Committed` has.
    """

    epoch: str
    frames: list[Frame]


class Resync:
    """The node's subscription was restored after an outage: read what may have been missed."""

    __slots__ = ()


RESYNC = Resync()


@dataclass(frozen=True, slots=True)
class SessionDeleted:
    """The session was deleted (on any node): close its connections here."""

    epoch: str


@dataclass(frozen=True, slots=True)
class MissedLoaded:
    """The seqs no connection of the cluster was sent yet, taken for one attaching connection (replay=missed)."""

    connection_id: str
    seqs: frozenset[int]


@dataclass(frozen=True, slots=True)
class QueryLocked:
    """The cluster's one-query-at-a-time lock answered a client's query."""

    request: StartQuery
    granted: bool
