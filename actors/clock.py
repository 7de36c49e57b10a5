"""Clocks: where actors read the time and schedule timers.

Throttling, keepalive, TTL and timeouts all read a `Clock` instead of calling
`time` directly, so tests move time with `ManualClock.advance()` instead of
sleeping. `LoopClock` is the real one, backed by the asyncio loop.
"""

from __future__ import annotations

import contextvars
import heapq
import itertools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import asyncio

__all__ = ["Clock", "LoopClock", "ManualClock", "TimerHandle"]



class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """Time as actors see it. Only used on the dispatcher thread."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back; for intervals."""
        ...

    def time(self) -> float:
        """Seconds since the epoch; for timestamps shown to people."""
        ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        """Run `callback` on the dispatcher thread after `delay` seconds."""
        ...


class LoopClock:
    """The real clock: `time.monotonic()` and the asyncio loop's timers."""

    __slots__ = ("_loop",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        # A fresh context, as for dispatcher turns: timers fire outside any request.
        return self._loop.call_later(max(0.0, delay), callback, context=contextvars.Context())


class _ManualTimer:
    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """A clock that moves only when a test calls `advance()`.

    Timers fire in order of due time (ties in the order they were set), each
    with the clock reading its due time. `after_fire`, when given, runs after
    each timer; the test harness uses it to let actors handle what the timer
    sent before the next timer fires.
    """

    def __init__(self, start: float = 1_000.0, wall_start: float = 1_767_225_600.0) -> None:
        self._now = start
        self._wall_offset = wall_start - start
        self._timers: list[tuple[float, int, _ManualTimer]] = []
        self._counter = itertools.count()
        self.after_fire: Callable[[], object] | None = None  # its result is ignored

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self._now + self._wall_offset

    def call_later(self, delay: float, callback: Callable[[], None]) -> _ManualTimer:
        timer = _ManualTimer(self._now + max(0.0, delay), callback)
        heapq.heappush(self._timers, (timer.when, next(self._counter), timer))
        return timer

    def pending(self) -> int:
        """Timers set and neither fired nor cancelled."""
        return sum(1 for _, _, t in self._timers if not t.cancelled)

    def advance(self, seconds: float) -> None:
        """Move time forward by `seconds`, firing every timer that falls due."""
        if seconds < 0:
            raise ValueError("a clock does not go back")
        target = self._now + seconds
        while self._timers and self._timers[0][0] <= target:
            when, _, timer = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            self._now = max(self._now, when)
            timer.callback()
            if self.after_fire is not None:
                self.after_fire()
        self._now = target
