"""What the application got through, told to the broker in `ack`s, batched.

The broker shows each connection's highest acknowledged `seq` in the
session's stats (docs/protocol.md sections 3.6 and 4): who saw up to where.
A message counts as processed once the application comes back for the next
one (or closes the stream), not when it was merely read off the socket.
One `ack` per interval at most, whatever the message rate, keeps well under
the broker's `max_client_rate`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import orjson
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClientConnection, WebSocketClosedError

__all__ = ["Acks"]


class Acks:
    """The processed position and what the current connection has been told of it."""

    def __init__(self, interval: float, epoch: Callable[[], str | None]) -> None:
        self.interval = interval
        #: the session's current epoch (an ack of another epoch's seq would mean nothing)
        self._epoch = epoch
        self.seq = 0
        self._seq_epoch: str | None = None
        self._sent = 0
        self._wanted = asyncio.Event()

    def processed(self, message: dict[str, Any]) -> None:
        """The application is done with this message."""
        seq = message.get("seq")
        if not isinstance(seq, int):
            return
        epoch = message.get("epoch")
        if epoch != self._seq_epoch:
            self._seq_epoch, self.seq, self._sent = epoch, seq, 0
        elif seq > self.seq:
            self.seq = seq
        else:
            return
        self._wanted.set()

    def connected(self) -> None:
        """A new connection knows nothing yet: acknowledgements are per connection."""
        self._sent = 0
        if self.seq:
            self._wanted.set()

    async def run(self, connection: Callable[[], WebSocketClientConnection | None]) -> None:
        """Send what is due, at most once per interval, on whatever connection is current."""
        while True:
            await self._wanted.wait()
            await asyncio.sleep(self.interval)  # the batching: one ack per interval at most
            self._wanted.clear()
            conn = connection()
            if conn is not None:
                with contextlib.suppress(WebSocketClosedError, StreamClosedError):
                    await self.flush(conn)

    async def flush(self, conn: WebSocketClientConnection) -> None:
        """Send an `ack` now if the connection has not been told the latest processed seq."""
        if self.seq > self._sent and self._seq_epoch == self._epoch():
            self._sent = self.seq
            await conn.write_message(orjson.dumps({"type": "ack", "seq": self.seq}).decode())
