"""The garbage collector, tuned for a process that holds many small objects.

With an object graph per connection, a full collection walks every object
in the process and stalls the loop while it does (python-socketio's ~140 ms
tail latencies are mostly that). Two measures:

* `freeze_startup()`: after start-up, move everything that exists then
  (modules, classes, the app) to the permanent generation, so no collection
  ever walks it again. (Raising the young-generation threshold to 10 000 was
  measured too: it traded full collections for longer young ones, so the
  default thresholds stay.)
* `GcPauses`: time every collection, per generation, into a histogram that
  /metrics exports, so an operator can see pauses instead of guessing; and
  (`freeze_survivors`) freeze what survives the older collections, with a
  thaw every `gc_thaw_interval` seconds.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import structlog

from actors.stats import LatencyHistogram

log = structlog.get_logger("actor_broker.gc")

#: Seconds between checks whether a thaw is due (the interval itself is the
#: `gc_thaw_interval` setting, read at each check so that a reload applies).
THAW_CHECK_INTERVAL = 5.0

#: A collection at least this long is logged: it stalled every client that long.
LONG_PAUSE = 0.02


class GcPauses:
    """Collection pauses by generation, measured through gc.callbacks.

    With `freeze_survivors`, whatever survives a collection of the middle or
    the oldest generation is frozen right after it. An object that lived
    through two young collections is long-lived in this process (a
    connection's Tornado objects and actor, a session, its history frames):
    freezing it means no later collection walks it again, so the oldest
    generation stays nearly empty and a full collection costs about what a
    young one does. Without this, a full collection walks every connection
    promoted since the last one: 1 000 connections opening at once put about
    90 000 objects there, and the full collection that follows, whenever
    the counts trigger it, stalls every client for 20-35 ms (README.md,
    "Performance").

    Freezing costs no memory for objects freed by reference counting (they
    are freed as usual, frozen or not); a connection's or a request's objects
    form no cycles (tests/test_gc_tuning.py). Only cyclic garbage among
    frozen objects waits, for `thaw()`, which the daemon calls every
    `gc_thaw_interval` seconds (`thaw_when_due`): it unfreezes everything and
    collects it at once, and the survivors are frozen again. That one
    collection walks every connection: 40-50 µs each, so 260 ms for 5 000
    connections (bench/thaw.py), once per interval instead of at random moments.
    """

    def __init__(self, *, freeze_survivors: bool = False) -> None:
        self.by_generation = [LatencyHistogram(), LatencyHistogram(), LatencyHistogram()]
        self.freeze_survivors = freeze_survivors
        self._started = 0.0
        self._thawed_at = time.monotonic()

    @staticmethod
    def thaw() -> None:
        """Walk everything once: collect cycles among frozen objects (then refreeze the rest)."""
        gc.unfreeze()
        gc.collect()

    def thaw_when_due(self, interval: float, now: float) -> bool:
        """Thaw if `interval` seconds (0: never) have passed since the last thaw; whether it did."""
        if interval <= 0 or now - self._thawed_at < interval:
            return False
        self._thawed_at = now
        started = time.perf_counter()
        self.thaw()
        log.info("gc_thawed", seconds=round(time.perf_counter() - started, 4), frozen_objects=gc.get_freeze_count())
        return True

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        generation = info["generation"]
        self.by_generation[generation].observe(pause)
        if self.freeze_survivors and generation >= 1:
            gc.freeze()
        if pause >= LONG_PAUSE:
            log.warning("gc_pause", generation=generation, seconds=round(pause, 4), collected=info["collected"])

    def install(self) -> GcPauses:
        if self not in gc.callbacks:
            gc.callbacks.append(self)
        return self

    def uninstall(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)


def freeze_startup() -> int:
    """Collect once, then exempt every surviving object from future collections.

    Returns how many objects were frozen. Safe for objects that are freed
    later by reference counting (they are freed as usual); only cyclic
    garbage among them would stay, and start-up objects live as long as the
    process anyway.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
