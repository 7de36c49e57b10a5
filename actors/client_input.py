"""What a client may send over a WebSocket, checked before anything acts on it.

Pure functions and two small counters, no actor: the connection actor calls
them and turns a `ClientInputError` into the `error` message the protocol
prescribes (docs/protocol.md sections 3.6 and 3.10).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Container
from typing import Any

import orjson

__all__ = ["ERROR_WINDOW", "ClientInputError", "ErrorWindow", "RateBucket", "parse_client_message"]

#: Window for counting a client's errors (docs/protocol.md section 3.10: a sliding 60 s).
ERROR_WINDOW = 60.0


class ClientInputError(ValueError):
    """Bad client input: `code` is the error message's code, `str(exc)` its text."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code


def parse_client_message(data: str | bytes, accepted: Container[str]) -> dict[str, Any]:
    """A client frame as a message object whose `type` is one of `accepted`, or ClientInputError."""
    if isinstance(data, bytes):
        raise ClientInputError("bad_json", "binary frames are not accepted; send JSON text")
    try:
        message = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ClientInputError("bad_json", f"not valid JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ClientInputError("bad_json", "a message must be a JSON object")
    mtype = message.get("type")
    if not isinstance(mtype, str) or not mtype:
        raise ClientInputError("bad_message", "a message needs a string 'type'")
    if mtype not in accepted:
        raise ClientInputError("unknown_type", f"the server does not take {mtype[:64]!r} from clients")
    return message


def check_query(message: dict[str, Any], session_id: str) -> None:
    """A `query` message's fields; ClientInputError(bad_message) names the first bad one."""
    query = message.get("query")
    if not isinstance(query, str) or not query.strip():
        raise ClientInputError("bad_message", "query needs 'query', a non-empty string")
    named = message.get("session_id")
    if named is not None and named != session_id:
        raise ClientInputError("bad_message", "the query's session_id is not this connection's session")
    for name, kind in (("include_context", bool), ("system_prompt", str)):
        if name in message and not isinstance(message[name], kind):
            raise ClientInputError("bad_message", f"'{name}' must be a {'boolean' if kind is bool else 'string'}")


def check_ack(message: dict[str, Any]) -> int:
    """An `ack` message's seq."""
    seq = message.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise ClientInputError("bad_message", "ack needs 'seq', a non-negative integer")
    return seq


def check_refresh(message: dict[str, Any]) -> str:
    """A `refresh` message's token."""
    token = message.get("token")
    if not isinstance(token, str) or not token:
        raise ClientInputError("bad_token", "refresh needs 'token', a string")
    return token


class RateBucket:
    """A token bucket of `rate` messages, refilled at `rate` per second (max_client_rate)."""

    __slots__ = ("_at", "_tokens")

    def __init__(self, rate: float, now: float) -> None:
        self._tokens = float(rate)
        self._at = now

    def take(self, rate: float, now: float) -> bool:
        """Take one token; False (and nothing taken) when the bucket is empty.

        `rate` is passed each time so a reloaded max_client_rate applies at once.
        """
        self._tokens = min(float(rate), self._tokens + (now - self._at) * rate)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class ErrorWindow:
    """How many errors a client caused within the last ERROR_WINDOW seconds."""

    __slots__ = ("_times",)

    def __init__(self) -> None:
        self._times: deque[float] = deque()

    def add(self, now: float) -> int:
        """Count one more error at `now`; the count within the window, this one included."""
        times = self._times
        times.append(now)
        while times and times[0] <= now - ERROR_WINDOW:
            times.popleft()
        return len(times)
