"""The settings actors read, as a protocol: what actors need, and no more.

`broker.config.Settings` satisfies it. Actors get the current settings from
one getter (`SettingsGetter`, the session directory's `current_settings`),
called when they need a value, so a SIGHUP reload reaches every session and
connection without a reference from actors up into `broker`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

__all__ = ["ActorSettings", "SettingsGetter"]


class ActorSettings(Protocol):
    """Read-only view of the settings sessions and connections follow (docs/protocol.md section 5)."""

    @property
    def buffer_size(self) -> int: ...
    @property
    def session_ttl(self) -> float: ...
    @property
    def dedup_window(self) -> float: ...
    @property
    def min_delta(self) -> float: ...
    @property
    def max_interval_ms(self) -> int: ...
    @property
    def keepalive_interval(self) -> float: ...
    @property
    def ws_ping_interval(self) -> float: ...
    @property
    def ws_ping_timeout(self) -> float: ...
    @property
    def max_queue_bytes(self) -> int: ...
    @property
    def max_client_errors(self) -> int: ...
    @property
    def max_client_rate(self) -> float: ...
    @property
    def presets(self) -> Mapping[str, frozenset[str]]: ...


#: Returns the settings in force now.
SettingsGetter = Callable[[], ActorSettings]
