"""Throttling policy for `task_progress` events (docs/protocol.md section 2.7).

This is only the decision: it never reads a clock, sets a timer or sends
anything. The session actor passes `now` in and acts on the answer, so the
rules can be tested with plain numbers and the actor keeps the I/O. One
instance serves one session; state is kept per task_id.

Timers: the caller keeps at most one timer per task. `offer()` asks for one
(`flush_at`) only when none is pending, and `flush()` is what the timer calls;
it either delivers the held event, asks for a later timer, or finds nothing
to do because a delivery or `finish()` got there first.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

__all__ = ["Event", "Offer", "ProgressThrottle", "Verdict"]

Event = dict[str, Any]  # a validated `task_progress` event, as published


class Verdict(enum.Enum):
    DELIVER = "deliver"  # deliver this event now
    HOLD = "hold"  # held; deliver later via flush()
    DISCARD = "discard"  # never delivered (task finished)


@dataclass(frozen=True, slots=True)
class Offer:
    """What to do with an offered event.

    `superseded` is the earlier held event that will now never be delivered
    (the caller counts it in `throttled_events`); `flush_at` is set only when
    the caller must start a timer, so a burst of holds costs one timer.
    """

    verdict: Verdict
    superseded: Event | None
    flush_at: float | None


class _Task:
    """One task's state: what was last delivered, and what waits to be."""

    __slots__ = ("finished", "held", "last_action", "last_at", "last_progress", "timer_pending")

    def __init__(self) -> None:
        self.last_at: float | None = None  # None: nothing delivered yet, next one is "first"
        self.last_progress: float = 0
        self.last_action: Any = None
        self.held: Event | None = None
        self.finished = False
        # Survives finish()/start(): the caller's timer is still out there, and
        # counting it keeps the one-timer-per-task promise across a restart.
        self.timer_pending = False

    def deliver(self, event: Event, now: float) -> Event | None:
        """Record `event` as delivered; return the held event this discards."""
        dropped, self.held = self.held, None
        self.last_at = now
        self.last_progress = event["progress"]
        self.last_action = event.get("current_action")
        return dropped


class ProgressThrottle:
    """Per-session policy deciding which `task_progress` events go out, and when.

    `min_delta` and `max_interval` (seconds) are plain attributes so reloaded
    settings apply to the next decision without rebuilding the state.
    """

    __slots__ = ("_tasks", "max_interval", "min_delta")

    def __init__(self, min_delta: float = 5, max_interval: float = 1.0) -> None:
        self.min_delta = min_delta
        self.max_interval = max_interval
        self._tasks: dict[str, _Task] = {}

    def _wanted(self, task: _Task, event: Event) -> bool:
        """True when the event carries news worth sending right away."""
        progress = event["progress"]
        return (
            task.last_at is None
            or progress in (0, 100)
            or abs(progress - task.last_progress) >= self.min_delta
            or event.get("current_action") != task.last_action
        )

    def offer(self, task_id: str, event: Event, now: float) -> Offer:
        """Decide on one `task_progress` event arriving at `now`."""
        task = self._tasks.get(task_id)
        if task is None:
            task = self._tasks[task_id] = _Task()
        if task.finished:
            return Offer(Verdict.DISCARD, None, None)
        if self._wanted(task, event):
            return Offer(Verdict.DELIVER, task.deliver(event, now), None)
        superseded, task.held = task.held, event
        if task.timer_pending:
            return Offer(Verdict.HOLD, superseded, None)
        task.timer_pending = True
        assert task.last_at is not None  # a hold always follows a delivery
        return Offer(Verdict.HOLD, superseded, max(now, task.last_at + self.max_interval))

    def flush(self, task_id: str, now: float) -> tuple[Event | None, float | None]:
        """The task's timer fired: deliver what is held if it is due."""
        task = self._tasks.get(task_id)
        if task is None:
            return None, None
        task.timer_pending = False
        if task.held is None:  # delivered or discarded since the timer was set
            return None, None
        assert task.last_at is not None  # a hold always follows a delivery
        due = task.last_at + self.max_interval
        if now < due:  # max_interval grew since the timer was set
            task.timer_pending = True
            return None, due
        event = task.held
        task.deliver(event, now)
        return event, None

    def finish(self, task_id: str) -> Event | None:
        """`task_completed` / `task_failed`: drop what is held, refuse what follows."""
        task = self._tasks.get(task_id)
        if task is None:
            task = self._tasks[task_id] = _Task()
        dropped, task.held = task.held, None
        task.finished = True
        return dropped

    def start(self, task_id: str) -> None:
        """`task_started`: a finished task runs again and its next progress is "first"."""
        task = self._tasks.get(task_id)
        if task is None or not task.finished:
            return
        fresh = _Task()
        fresh.timer_pending = task.timer_pending
        self._tasks[task_id] = fresh

    def held_count(self) -> int:
        """How many tasks have an event waiting for their timer."""
        return sum(1 for task in self._tasks.values() if task.held is not None)

    def forget(self) -> None:
        """Drop all state: the session is gone, and so are its timers."""
        self._tasks.clear()
