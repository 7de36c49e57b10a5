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
  /metrics exports, so an operator can see pauses instead of guessing.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import structlog

from actors.stats import LatencyHistogram

log = structlog.get_logger("actor_broker.gc")

#: Seconds between thaws of frozen survivors (see GcPauses): how long a cycle
#: among long-lived objects may wait to be collected, and how often one full
#: collection walks everything.
THAW_INTERVAL = 600.0

#: A collection at least this long is logged: it stalled every client that long.
LONG_PAUSE = 0.02


class GcPauses:
    """Collection pauses by generation, measured through gc.callbacks.

    With `freeze_survivors`, whatever survives a full collection is frozen
    right after it: survivors are long-lived by definition (connections,
    sessions, their histories), and the next full collection then walks only
    what was promoted since, not the whole process again. Cycles among frozen
    objects are not collected until `thaw()`, which the daemon calls every
    THAW_INTERVAL seconds: the one full collection after it walks everything,
    reclaims such cycles, and its survivors are frozen again.
    """

    def __init__(self, *, freeze_survivors: bool = False) -> None:
        self.by_generation = [LatencyHistogram(), LatencyHistogram(), LatencyHistogram()]
        self.freeze_survivors = freeze_survivors
        self._started = 0.0

    @staticmethod
    def thaw() -> None:
        gc.unfreeze()

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        self.by_generation[info["generation"]].observe(pause)
        if self.freeze_survivors and info["generation"] == 2:
            gc.freeze()
        if pause >= LONG_PAUSE:
            log.warning(
                "gc_pause", generation=info["generation"], seconds=round(pause, 4), collected=info["collected"]
            )

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
