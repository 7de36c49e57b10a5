"""DedupWindow: the event ids a session accepted recently, and the seq each got.

Idempotent publishing (docs/protocol.md section 2.6): an event whose
`event_id` the session accepted within `dedup_window` seconds is answered
with the seq the first one has by then (None while it is held by throttling,
or if it was discarded) and not delivered again. A plain object with the time
passed in, so the rule is tested without a clock.

Only strings, numbers and tuples of them are kept: the garbage collector
need not walk a window of 300 s of events.
"""

from __future__ import annotations

from collections import deque


class DedupWindow:
    __slots__ = ("_order", "_seqs")

    def __init__(self) -> None:
        #: event_id -> the seq it got (None while held or if discarded)
        self._seqs: dict[str, int | None] = {}
        #: (accepted at, event_id), oldest first, to forget them after the window
        self._order: deque[tuple[float, str]] = deque()

    def seen(self, event_id: str) -> bool:
        return event_id in self._seqs

    def seq_of(self, event_id: str) -> int | None:
        """The seq of an accepted event (None while held, or if discarded)."""
        return self._seqs.get(event_id)

    def accept(self, event_id: str, now: float) -> None:
        """Remember an event taken at monotonic time `now`, with no seq yet."""
        self._seqs[event_id] = None
        self._order.append((now, event_id))

    def assign(self, event_id: str, seq: int) -> None:
        """The accepted event got its seq (at once, or when its throttle released it)."""
        if event_id in self._seqs:
            self._seqs[event_id] = seq

    def forget_before(self, horizon: float) -> None:
        """Forget what was accepted before monotonic time `horizon`."""
        order = self._order
        while order and order[0][0] < horizon:
            self._seqs.pop(order.popleft()[1], None)

    def __len__(self) -> int:
        return len(self._seqs)
