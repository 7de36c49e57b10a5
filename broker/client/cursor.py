"""Where a follower is in a session's story: the rules that make delivery exactly once.

Pure state, no I/O: `Stream` feeds it every greeting, `gap` and session
message it reads, and asks it what to send when it reconnects. It keeps the
highest `seq` delivered (`last_seq`) and the session's `epoch`
(docs/protocol.md section 3.5) and decides, for each message:

* `DELIVER`: new and in order; hand it to the application;
* `DUPLICATE`: `seq` at or below `last_seq` (seen already, e.g. replayed
  after a reconnect raced a live copy); drop it;
* `HOLE`: the filter admits every type, yet a `seq` was skipped without a
  `gap` saying so; do not deliver it: reconnect with `last_seq`, and the
  broker sends what is missing first.

Holes can only be seen when the filter admits every type (`["*"]`): with any
other filter, skipped `seq`s are normal (docs/protocol.md section 1).
"""

from __future__ import annotations

from enum import Enum
from typing import Any

__all__ = ["Cursor", "Verdict"]


class Verdict(Enum):
    DELIVER = "deliver"
    DUPLICATE = "duplicate"
    HOLE = "hole"


class Cursor:
    """A session follower's position; survives reconnects, reset by an epoch change."""

    def __init__(self, last_seq: int | None = None, epoch: str | None = None) -> None:
        #: the highest seq delivered, or declared lost by a gap (0: none yet)
        self.last_seq = last_seq or 0
        #: the session's epoch, from the latest greeting or gap (None before the first)
        self.epoch = epoch
        #: True once a connection should resume with last_seq (after the first greeting,
        #: or from the start when the application gave a last_seq)
        self.resuming = last_seq is not None
        # The next seq must be _anchor + 1 (None: not known yet).
        self._anchor: int | None = None
        # The session's newest seq when this connection joined: live messages start after it.
        self._joined_at: int | None = None
        # replay=missed: messages up to _joined_at may be any subset, in order.
        self._loose = False

    def handshake(self, replay: str) -> dict[str, str]:
        """The recovery parameters of the next connection's URL."""
        if self.resuming:
            params = {"last_seq": str(self.last_seq)}
            if self.epoch is not None:
                params["epoch"] = self.epoch
            return params
        return {"replay": replay}

    def greeted(self, greeting: dict[str, Any], replay: str) -> None:
        """A connection's first message (`connected` / `connection_established`)."""
        joined_at = int(greeting.get("last_seq") or 0)
        self._joined_at = joined_at
        self._loose = False
        if self.resuming:
            self._anchor = self.last_seq  # a gap, if one follows, moves it
        elif replay == "none":
            self.last_seq = max(self.last_seq, joined_at)
            self._anchor = joined_at
        else:
            self._anchor = None  # the replay starts at the oldest message held: unknown
            self._loose = replay == "missed"
        if self.epoch is None or not self.resuming:
            self.epoch = greeting.get("epoch")
        self.resuming = True

    def gap(self, gap: dict[str, Any]) -> None:
        """A `gap`: `to_seq` None means the epoch changed (start over), else a lost range."""
        self.epoch = gap.get("epoch", self.epoch)
        to_seq = gap.get("to_seq")
        if to_seq is None:
            self.last_seq = 0
            self._anchor = None
            self._loose = False
        else:
            self.last_seq = max(self.last_seq, int(to_seq))
            self._anchor = self.last_seq

    def filter_widened(self) -> None:
        """The filter now admits every type: the next message anchors the contiguity check."""
        self._anchor = None
        self._joined_at = None
        self._loose = False

    def judge(self, seq: int, *, every_type: bool) -> Verdict:
        """What to do with a session message of this `seq`; DELIVER also advances the cursor."""
        if seq <= self.last_seq:
            return Verdict.DUPLICATE
        if every_type:
            if self._anchor is not None:
                if seq != self._anchor + 1:
                    return Verdict.HOLE
            elif self._joined_at is not None and seq > self._joined_at + 1:
                return Verdict.HOLE  # live messages start right after the join point
        self.last_seq = seq
        if not every_type:
            self._anchor = None
        elif self._anchor is not None or not self._loose or self._joined_at is None or seq >= self._joined_at:
            self._anchor = seq
        return Verdict.DELIVER
