"""TokenLease: how long a connection's token lets it stay, and how a refresh extends that.

With tokens configured (docs/protocol.md sections 3.2 and 6), a connection lives
until its token's `exp` unless the client sends `refresh` with a new token
for the same session and user first. The check itself is the broker's
(it knows the keys); the lease only holds the outcome.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from actors.client_input import ClientInputError, check_refresh

if TYPE_CHECKING:
    from actors.clock import TimerHandle


class TokenLease:
    __slots__ = ("_check", "expires_at", "timer")

    def __init__(self, expires_at: float, check: Callable[[str], float]) -> None:
        #: wall-clock POSIX time at which the token expires
        self.expires_at = expires_at
        #: verifies a refresh token for this session and user: its expiry, or ValueError(reason)
        self._check = check
        #: the connection's timer for `expires_at`
        self.timer: TimerHandle | None = None

    def refresh(self, message: dict[str, Any]) -> float:
        """Take a `refresh` message's token; the new expiry, or ClientInputError(bad_token)."""
        token = check_refresh(message)
        try:
            self.expires_at = self._check(token)
        except ValueError as exc:
            raise ClientInputError("bad_token", str(exc)) from None
        return self.expires_at

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
