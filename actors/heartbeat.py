"""Heartbeat: when a connection probes its peer, gives up on it, or sends a keepalive.

A plain policy object, numbers in and decisions out, read by the connection
actor's single timer (docs/protocol.md section 3.9): a
`keepalive` message after `keepalive_interval` seconds without a write, a
liveness probe (a WebSocket ping) every `ws_ping_interval`, and a peer that
has not answered a probe within `ws_ping_timeout` is dead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from actors.settings import ActorSettings

#: Never re-arm the timer sooner than this (a burst of zero-delay timers helps nobody).
MIN_DELAY = 0.05


@dataclass(frozen=True, slots=True)
class Beat:
    """What one tick of the timer must do."""

    #: the last probe went unanswered: close the connection (and nothing else)
    dead: bool = False
    #: send a liveness probe now
    probe: bool = False
    #: send a keepalive message now
    keepalive: bool = False


_DEAD = Beat(dead=True)


class Heartbeat:
    __slots__ = ("next_probe", "probe_due")

    def __init__(self, now: float, settings: ActorSettings) -> None:
        self.next_probe = now + settings.ws_ping_interval
        #: when the probe in flight must have been answered; None if none is
        self.probe_due: float | None = None

    def tick(self, now: float, last_write: float, answered: bool, writing: bool, settings: ActorSettings) -> Beat:
        """Decide at `now`; `answered`: the peer answered the last probe; `writing`: a write is in flight."""
        if self.probe_due is not None and now >= self.probe_due:
            self.probe_due = None
            if not answered:
                return _DEAD
        probe = settings.ws_ping_interval > 0 and now >= self.next_probe
        if probe:
            self.probe_due = now + min(settings.ws_ping_timeout, settings.ws_ping_interval)
            self.next_probe = now + settings.ws_ping_interval
        interval = settings.keepalive_interval
        keepalive = interval > 0 and now - last_write >= interval and not writing
        return Beat(probe=probe, keepalive=keepalive)

    def delay(self, now: float, last_write: float, settings: ActorSettings) -> float | None:
        """Seconds until the next tick is due; None if nothing ever is."""
        dues = []
        if settings.keepalive_interval > 0:
            dues.append(last_write + settings.keepalive_interval)
        if settings.ws_ping_interval > 0:
            dues.append(self.next_probe)
        if self.probe_due is not None:
            dues.append(self.probe_due)
        return max(MIN_DELAY, min(dues) - now) if dues else None
