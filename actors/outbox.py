"""Outbox: one connection's unsent output, and the rules for it.

A plain object, no actor and no clock, so its decisions are tested numbers
in, decisions out (like `actors.throttle.ProgressThrottle`). The connection
actor pushes frames in and asks for the next batch to write; the outbox
answers what to write, when a close is due, and whether the client is over
`max_queue_bytes` (docs/protocol.md section 3.9: a client that does not
read).

What it counts: live bytes queued plus live bytes of the write in flight.
Replayed history is written the same way but never counted and never
compacted, because replay is flow-controlled already (the next part goes out
only once the socket took the previous one).
"""

from __future__ import annotations

from collections import deque

from actors.messages import CloseConnection, Frame

#: Most bytes handed to the transport in one write; replay goes out in parts this size.
WRITE_CHUNK = 64 * 1024


class _Replayed:
    """A frame from history in the queue: written like any other, but not
    counted towards max_queue_bytes and never compacted. Live frames are
    queued as they are, without a wrapper (the common case)."""

    __slots__ = ("frame",)

    def __init__(self, frame: Frame) -> None:
        self.frame = frame


_Item = Frame | _Replayed | CloseConnection


class Outbox:
    """Queued frames (live and replayed), a pending close, and the write in flight."""

    # One per connection, and idle connections are the many: the deque exists
    # only while something waits.
    __slots__ = ("inflight", "inflight_live_bytes", "queue", "queued_live_bytes", "sent_bytes", "sent_messages")

    def __init__(self) -> None:
        self.queue: deque[_Item] | None = None
        self.queued_live_bytes = 0
        self.inflight_live_bytes = 0
        #: a write was handed to the transport and it has not taken it yet
        self.inflight = False
        #: frames and bytes handed to the transport over the connection's life
        self.sent_messages = 0
        self.sent_bytes = 0

    # -- in ------------------------------------------------------------------

    def push_live(self, frame: Frame) -> None:
        self._push(frame)
        self.queued_live_bytes += len(frame.data)

    def push_replayed(self, frames: list[Frame]) -> None:
        for frame in frames:
            self._push(_Replayed(frame))

    def push_close(self, request: CloseConnection) -> None:
        """Close once everything queued before it is written."""
        self._push(request)

    def _push(self, item: _Item) -> None:
        queue = self.queue
        if queue is None:
            queue = self.queue = deque()
        queue.append(item)

    def clear(self) -> None:
        self.queue = None
        self.queued_live_bytes = 0

    # -- decisions -------------------------------------------------------------

    @property
    def unsent_live_bytes(self) -> int:
        """What counts against max_queue_bytes: live bytes queued and in flight."""
        return self.queued_live_bytes + self.inflight_live_bytes

    @property
    def waiting(self) -> bool:
        return bool(self.queue)

    def shed(self, limit: int) -> tuple[int, bool]:
        """Over `limit` unsent live bytes: compact; how many frames went, and whether it is still over
        (a slow consumer).

        A single message, however large, is always written: with at most one
        item queued or in flight nothing is shed and nothing is over.
        """
        if self.unsent_live_bytes <= limit or len(self.queue or ()) + (1 if self.inflight else 0) <= 1:
            return 0, False
        dropped = self.compact()
        return dropped, self.unsent_live_bytes > limit

    def compact(self) -> int:
        """Drop queued live task_progress superseded by a newer one for the same task; how many went."""
        newest: set[str] = set()
        kept: deque[_Item] = deque()
        dropped = 0
        for item in reversed(self.queue or ()):
            if isinstance(item, Frame) and item.task_id is not None:
                if item.task_id in newest:
                    self.queued_live_bytes -= len(item.data)
                    dropped += 1
                    continue
                newest.add(item.task_id)
            kept.appendleft(item)
        self.queue = kept or None
        return dropped

    # -- out -----------------------------------------------------------------

    def next_batch(self, max_bytes: int = WRITE_CHUNK) -> list[Frame] | CloseConnection | None:
        """What to write next: frames (at least one, up to `max_bytes` unless the first is larger),
        a close that is now due (everything before it was written), or None for nothing.

        Frames returned are in flight until `taken()`.
        """
        queue = self.queue
        if not queue:
            return None
        batch: list[Frame] = []
        size = 0
        live_bytes = 0
        while queue:
            item = queue[0]
            if isinstance(item, CloseConnection):
                if batch:
                    break  # close once what is before it is written
                queue.popleft()
                self.clear()
                return item
            frame = item if isinstance(item, Frame) else item.frame
            if batch and size + len(frame.data) > max_bytes:
                break
            queue.popleft()
            batch.append(frame)
            size += len(frame.data)
            if item is frame:
                live_bytes += len(frame.data)
        if not queue:
            self.queue = None
        self.sent_messages += len(batch)
        self.sent_bytes += size
        self.queued_live_bytes -= live_bytes
        self.inflight_live_bytes = live_bytes
        self.inflight = True
        return batch

    def taken(self) -> None:
        """The transport took the write in flight."""
        self.inflight = False
        self.inflight_live_bytes = 0
