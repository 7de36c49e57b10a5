"""What a session actor on one node of a cluster asks of the shared store.

The store (Redis, `broker/cluster/`) is reached only through this protocol,
so actors never import a client library and the harness can drive a mirror
with a fake. Every call returns at once; answers come back to the actor as
messages (actors/messages.py: Loaded, LoadFailed, MissedLoaded, QueryLocked),
and committed messages arrive as `Committed` from the node's subscription.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pykka import ActorRef

    from actors.messages import StartQuery

__all__ = ["MirrorBackend"]


class MirrorBackend(Protocol):
    def open(self, session_id: str, reply_to: ActorRef[Any]) -> None:
        """Subscribe to the session's messages, create it if new, then read its history: `Loaded`.

        Subscribing comes first, so a message committed meanwhile arrives as
        `Committed` and the mirror merges both by seq.
        """
        ...

    def fill(self, session_id: str, after_seq: int, reply_to: ActorRef[Any]) -> None:
        """Read what came after `after_seq` (a hole, or a catch-up after an outage): `Loaded`."""
        ...

    def closed(self, session_id: str) -> None:
        """The mirror stopped: unsubscribe."""
        ...

    def joined(self, session_id: str, connection_id: str, user_id: str | None, events: list[str]) -> None:
        """A connection joined here; the cluster counts it (replay=missed, stats, expiry)."""
        ...

    def left(self, session_id: str, connection_id: str) -> None:
        """A connection of this node left."""
        ...

    def take_missed(self, session_id: str, connection_id: str, events: list[str], reply_to: ActorRef[Any]) -> None:
        """Take the seqs no connection was sent yet that the filter echo `events` admits: `MissedLoaded`."""
        ...

    def publish(self, session_id: str, event: dict[str, Any]) -> None:
        """Publish an event the session itself made (query messages), in the order of the calls."""
        ...

    def lock_query(self, session_id: str, request: StartQuery, reply_to: ActorRef[Any]) -> None:
        """Take the session's query lock for this request: `QueryLocked`."""
        ...

    def unlock_query(self, session_id: str) -> None:
        """The session's query ended here: release the lock."""
        ...
