"""What `broker.client` raises, each naming what the broker said.

Every error is a `ClientError`. The ones a program usually catches:

* `RejectedError`: the broker refused the connection in a way retrying cannot fix
  (a close code 4001, 4003, 1008 or 1009, or an HTTP 4xx at the handshake);
  `code` and `reason` are the broker's (docs/protocol.md section 3.11).
* `GaveUpError`: `max_retries` consecutive connection attempts failed.
* `PublishError`: a publish was answered with a 4xx (never retried), or
  retries ran out; `status`, `error` and `details` are the broker's answer
  (docs/protocol.md section 2.5).
* `QueryError` / `QueryBusyError`: a query ended with an `error`, or the session
  was already answering one (docs/protocol.md section 3.7).
* `RequestError`: the broker answered a `subscribe`, `unsubscribe` or
  `refresh` with an `error` (docs/protocol.md section 3.10).
"""

from __future__ import annotations

from typing import Any

from actors.wire import CloseCode

__all__ = [
    "ClientError",
    "ConnectionLostError",
    "GaveUpError",
    "PublishError",
    "QueryBusyError",
    "QueryError",
    "RejectedError",
    "RequestError",
]

#: What each non-retried close code means, for the exception's text.
_ADVICE: dict[int, str] = {
    CloseCode.UNAUTHORIZED: "get a new token, then connect again",
    CloseCode.FORBIDDEN: "the token does not cover this session or user; do not retry with it",
    CloseCode.POLICY_VIOLATION: "a handshake parameter or the client's messages broke the protocol; fix them",
    CloseCode.MESSAGE_TOO_BIG: "a message sent was larger than max_message_size",
}


class ClientError(Exception):
    """Base class of everything `broker.client` raises on purpose."""


class RejectedError(ClientError):
    """The broker refused this connection for a reason a retry cannot fix; not retried.

    `code` is the WebSocket close code (4001, 4003, 1008, 1009) or the HTTP
    status of a refused handshake (403, 404, ...); `reason` is the broker's text.
    """

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason
        advice = _ADVICE.get(code, "not retried")
        kind = "closed the connection with" if code >= CloseCode.NORMAL else "refused the handshake with HTTP"
        super().__init__(f"the broker {kind} {code} ({reason or 'no reason given'}): {advice}")


class GaveUpError(ClientError):
    """`max_retries` consecutive attempts to connect failed; `last` is the last failure."""

    def __init__(self, attempts: int, last: str) -> None:
        self.attempts = attempts
        self.last = last
        super().__init__(f"gave up after {attempts} failed attempts to connect; last: {last}")


class ConnectionLostError(ClientError):
    """The connection dropped while a request (subscribe, unsubscribe, refresh) awaited its answer.

    The stream itself reconnects; only the request is lost. Send it again.
    """


class RequestError(ClientError):
    """The broker answered one of our requests with an `error` (`code`, `error`)."""

    def __init__(self, code: str, error: str) -> None:
        self.code = code
        self.error = error
        super().__init__(f"{code}: {error}")


class QueryError(ClientError):
    """A query ended with an `error` message (or could not start); `message` is that message."""

    def __init__(self, code: str, error: str, message: dict[str, Any] | None = None) -> None:
        self.code = code
        self.error = error
        self.message = message
        super().__init__(f"query failed ({code}): {error}")


class QueryBusyError(QueryError):
    """The session was already answering a query (the broker's `busy`); try again after it ends."""


class PublishError(ClientError):
    """A publish was refused (4xx: never retried) or could not be made (retries exhausted).

    `status` is the HTTP status (599 for a connection failure or a timeout),
    `error` the broker's text and `details` its per-event problems (a 422).
    """

    def __init__(self, status: int, error: str, details: list[dict[str, Any]] | None = None) -> None:
        self.status = status
        self.error = error
        self.details = details or []
        shown = "; ".join(
            f"event {d.get('index')}, {d.get('field') or 'event'}: {d.get('error')}" for d in self.details[:5]
        )
        super().__init__(f"publish failed with {status}: {error}" + (f" [{shown}]" if shown else ""))
