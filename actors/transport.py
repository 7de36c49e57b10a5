"""What a connection actor writes to. The Tornado WebSocket handler is one.

Keeping actors behind this protocol means they never import Tornado's web
layer, and tests drive them with `broker.testing.RecordingTransport`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from actors.messages import Frame


class Transport(Protocol):
    def write(self, frames: list[Frame], on_flushed: Callable[[], None]) -> bool:
        """Send each frame's `data` as one text message, in order.

        Return True if the socket took all of it at once; `on_flushed` is
        then never called. Otherwise return False and call `on_flushed` once
        it has.

        A transport may cache its encoding of a frame in `frame.wire`: the
        same Frame object goes to every connection that receives it.

        Call `on_flushed` (on the dispatcher thread) once the socket has
        taken all of them; until then the connection sends nothing more.
        Raise if the socket is already closed.
        """
        ...

    def ping(self) -> None:
        """Send a WebSocket-level ping; `pong_received()` turns False until a pong comes."""
        ...

    def pong_received(self) -> bool:
        """Whether a pong arrived since the last `ping()`."""
        ...

    def close(self, code: int, reason: str) -> None:
        """Close the socket with a WebSocket close code; idempotent."""
        ...
