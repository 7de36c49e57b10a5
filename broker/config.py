"""Settings: one frozen object, defaults that run with no configuration at all.

Every key of PROTOCOL.md section 6 is here with its default, so code reads
`settings.buffer_size` and never a dict. Loading from TOML and environment
builds on this (the daemon issue); tests build variants with `replace()`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from actors.filters import DEFAULT_PRESETS


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8050
    #: messages of history kept per session (replay, recovery by last_seq)
    buffer_size: int = 100
    #: seconds a session lives after its last connection left and last event arrived
    session_ttl: float = 3600.0
    #: seconds an event_id is remembered for idempotent publishing
    dedup_window: float = 300.0
    #: task_progress throttling: smallest change delivered at once, and trailing-edge interval
    min_delta: float = 5.0
    max_interval_ms: int = 1000
    keepalive_interval: float = 25.0
    ws_ping_interval: float = 20.0
    ws_ping_timeout: float = 10.0
    max_message_size: int = 64 * 1024
    max_queue_bytes: int = 1024 * 1024
    max_body_size: int = 1024 * 1024
    max_client_errors: int = 10
    max_client_rate: int = 50
    max_connections: int = 50_000
    max_connections_per_session: int = 1000
    allowed_origins: tuple[str, ...] = ()
    api_keys: tuple[str, ...] = ()
    jwt_secret: str = ""
    jwt_public_key: str = ""
    query_backend: str = "demo"
    query_upstream_url: str = ""
    research_upstream_url: str = ""
    backend: str = "memory"
    redis_url: str = ""
    log_level: str = "info"
    log_format: str = "auto"
    shutdown_timeout: float = 30.0
    presets: Mapping[str, frozenset[str]] = dataclasses.field(
        default_factory=lambda: MappingProxyType(dict(DEFAULT_PRESETS))
    )

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


DEFAULT_SETTINGS = Settings()
