"""What a connection actor writes to. The Tornado WebSocket handler is one.

Keeping actors behind this protocol means they never import Tornado's web
layer, and tests drive them with `broker.testing.RecordingTransport`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Transport(Protocol):
    def write(self, frames: list[bytes], on_flushed: Callable[[], None]) -> None:
        """Send each item as one text message, in order.

        Call `on_flushed` (on the dispatcher thread) once the socket has
        taken all of them; until then the connection sends nothing more.
        Raise if the socket is already closed.
        """
        ...

    def close(self, code: int, reason: str) -> None:
        """Close the socket with a WebSocket close code; idempotent."""
        ...
