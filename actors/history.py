"""Session history: the last `buffer_size` messages, with seq assignment.

Behind a small interface (`History`) so that a Redis-backed history can
replace the in-memory ring without the session actor changing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Protocol

from actors.messages import Frame


class History(Protocol):
    @property
    def last_seq(self) -> int:
        """The newest seq ever assigned (0 before the first message)."""
        ...

    @property
    def first_seq(self) -> int:
        """The oldest seq still held (last_seq + 1 when empty)."""
        ...

    def next_seq(self) -> int: ...

    def append(self, frame: Frame) -> int:
        """Store a frame whose seq is next_seq(); return how many were evicted."""
        ...

    def since(self, seq: int) -> list[Frame]:
        """Held frames with seq > `seq`, oldest first."""
        ...

    def restart(self, last_seq: int) -> None:
        """Forget every frame and continue after `last_seq` (a mirror loading a shared history)."""
        ...

    def resize(self, buffer_size: int) -> int:
        """Change the capacity; return how many were evicted."""
        ...

    def __iter__(self) -> Iterator[Frame]: ...

    def __len__(self) -> int: ...


class MemoryHistory:
    """A ring of frames in memory; seqs are contiguous, so lookup is arithmetic."""

    __slots__ = ("_frames", "_last_seq", "_size")

    def __init__(self, buffer_size: int) -> None:
        self._size = buffer_size
        self._frames: deque[Frame] = deque()
        self._last_seq = 0

    @property
    def last_seq(self) -> int:
        return self._last_seq

    @property
    def first_seq(self) -> int:
        return self._last_seq - len(self._frames) + 1

    def next_seq(self) -> int:
        return self._last_seq + 1

    def append(self, frame: Frame) -> int:
        assert frame.seq == self._last_seq + 1, "seqs must have no holes"
        self._last_seq = frame.seq
        self._frames.append(frame)
        return self._trim()

    def _trim(self) -> int:
        evicted = 0
        while len(self._frames) > self._size:
            self._frames.popleft()
            evicted += 1
        return evicted

    def restart(self, last_seq: int) -> None:
        """Forget every frame and continue after `last_seq` (a mirror loading a shared history)."""
        self._frames.clear()
        self._last_seq = last_seq

    def since(self, seq: int) -> list[Frame]:
        start = max(0, seq - self.first_seq + 1)
        frames = self._frames
        return [frames[i] for i in range(start, len(frames))]

    def resize(self, buffer_size: int) -> int:
        self._size = buffer_size
        return self._trim()

    def __iter__(self) -> Iterator[Frame]:
        return iter(self._frames)

    def __len__(self) -> int:
        return len(self._frames)
