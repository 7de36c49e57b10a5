"""What a connection actor writes to: a WebSocket, a Server-Sent Events stream.

Keeping actors behind this protocol means they never import Tornado's web
layer and never know which wire they feed: the connection actor hands over
frames (a message's JSON, plus its type and seq), asks for a liveness probe,
and closes with a protocol close code; each transport renders those in its
own terms (a WebSocket text frame and close frame; an SSE `data:` event, a
comment, the end of the stream). Tests drive actors with
`broker.testing.RecordingTransport`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from actors.messages import Frame


class Transport(Protocol):
    #: the wire's name in session stats: "websocket" or "sse"
    kind: str

    def write(self, frames: list[Frame], on_flushed: Callable[[], None]) -> bool:
        """Send each frame's `data` as one text message, in order.

        Return True if the socket took all of it at once; `on_flushed` is
        then never called. Otherwise return False and call `on_flushed` once
        it has.

        A transport may cache its encoding of a frame on the frame (a slot of
        its own, e.g. `frame.wire` for WebSockets): the same Frame object goes
        to every connection that receives it. A `keepalive` frame may be
        rendered in the transport's own idiom (an SSE comment).

        Call `on_flushed` (on the dispatcher thread) once the socket has
        taken all of them; until then the connection sends nothing more.
        Raise if the socket is already closed.
        """
        ...

    def probe(self) -> None:
        """Start a liveness probe (a WebSocket ping); `probe_answered()` is False until the peer answers.

        A transport without one (SSE) does nothing and always reports answered:
        a dead peer shows there as a failed write.
        """
        ...

    def probe_answered(self) -> bool:
        """Whether the peer answered since the last `probe()`."""
        ...

    def close(self, code: int, reason: str) -> None:
        """End the connection with a protocol close code (actors.wire.CloseCode); idempotent.

        A WebSocket sends it as its close frame; a transport without close
        codes renders what the client must know (SSE: a final `error` for
        4008) and ends the stream.
        """
        ...
