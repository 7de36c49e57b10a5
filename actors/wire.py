"""The protocol's vocabulary: close codes, frames, ids, types, timestamps.

Everything a client can see by name or number is defined here once, below
both `actors` and `broker`/`handlers`, so a rule and the text that explains
it to a client cannot drift apart between the places that enforce it (the
publish validator, the WebSocket and SSE handshakes, research start, the
filter grammar). See docs/protocol.md sections 1 to 3 (close codes: 3.11).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any

from actors.messages import Frame, encode

__all__ = [
    "RESERVED_FIELDS",
    "SESSION_ID_PATTERN",
    "SESSION_ID_RE",
    "TYPE_PATTERN",
    "TYPE_RE",
    "CloseCode",
    "control_frame",
    "error_frame",
    "error_message",
    "iso_timestamp",
    "session_id_problem",
]


class CloseCode(IntEnum):
    """Every WebSocket close code the broker sends (docs/protocol.md section 3.11)."""

    #: a normal end: the client asked, the session was deleted, a dead peer's pings timed out
    NORMAL = 1000
    #: the server is shutting down (after `server_shutdown`)
    GOING_AWAY = 1001
    #: a bad handshake parameter, or too many bad messages
    POLICY_VIOLATION = 1008
    #: a frame over max_message_size
    MESSAGE_TOO_BIG = 1009
    #: the connection's actor failed
    INTERNAL_ERROR = 1011
    #: no token, or a malformed, badly signed or expired one
    UNAUTHORIZED = 4001
    #: a valid token that does not name this session or user
    FORBIDDEN = 4003
    #: the client did not read its output (max_queue_bytes)
    SLOW_CONSUMER = 4008


# `$` also matches before a trailing newline, so `re.match(r"^...$", "abc\n")`
# would pass: the patterns end in `\Z`. The `*_PATTERN` strings are how the
# rules are shown to people, in the protocol's own notation.
TYPE_PATTERN = "^[a-z][a-z0-9_.]{0,63}$"
TYPE_RE: re.Pattern[str] = re.compile(r"^[a-z][a-z0-9_.]{0,63}\Z")
SESSION_ID_PATTERN = "^[A-Za-z0-9_.:-]{1,128}$"
SESSION_ID_RE: re.Pattern[str] = re.compile(r"^[A-Za-z0-9_.:-]{1,128}\Z")

#: Fields the broker adds to every session message; a payload may not use them.
RESERVED_FIELDS: frozenset[str] = frozenset({"seq", "epoch"})


def session_id_problem(value: object) -> str | None:
    """What is wrong with a session id, in words a client can act on; None if it is good."""
    if isinstance(value, str) and SESSION_ID_RE.match(value):
        return None
    return f"session_id must be a string matching {SESSION_ID_PATTERN}"


def iso_timestamp(epoch_seconds: float) -> str:
    """Format a POSIX time as the protocol's `2025-10-25T12:34:56.123Z`.

    Milliseconds are truncated, never rounded up, so a timestamp never names
    a moment that has not happened yet and the seconds never carry over.
    """
    moment = datetime.fromtimestamp(epoch_seconds, UTC).replace(tzinfo=None)
    return moment.isoformat(timespec="milliseconds") + "Z"


def control_frame(message: dict[str, Any]) -> Frame:
    """A connection-level message: no seq, never in history, passes every filter."""
    return Frame(encode(message), message["type"])


def error_message(code: str, error: str, at: float) -> dict[str, Any]:
    """An `error` answering one connection's own input (`bad_json`, `busy`, ...), at POSIX time `at`."""
    return {"type": "error", "code": code, "error": error, "timestamp": iso_timestamp(at)}


def error_frame(code: str, error: str, at: float) -> Frame:
    """`error_message` as a frame, ready for one connection's queue."""
    return control_frame(error_message(code, error, at))
