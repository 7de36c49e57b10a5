"""A TCP proxy that cuts connections on demand: faults for client tests.

Clients (the Python client, the browser client, an EventSource) connect to
the proxy instead of the daemon; the test then cuts every live connection
(`cut()`), or lets the proxy cut each one after it has carried a number of
bytes towards the client (`cut_every`), while a publisher keeps going. Cut
means both sockets closed at once, without a WebSocket close frame: what a
client sees when a network path dies.

It runs on an asyncio loop of its own in a background thread, so it serves
the same way under pytest-tornasync's loop, Playwright's sync API, or a
test that only talks to real processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any


class CuttingProxy:
    """Forward 127.0.0.1:`port` to `target_host`:`target_port`.

    Use as a context manager (starts and stops the thread)::

        with CuttingProxy(daemon_port, cut_every=20_000) as proxy:
            ws_url = f"ws://127.0.0.1:{proxy.port}/ws/research/s1"
            ...
            proxy.cut()           # drop every connection now
            proxy.cuts            # how many connections were cut so far
    """

    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1", cut_every: int | None = None) -> None:
        self.target_host = target_host
        self.target_port = target_port
        #: cut each connection after it carried this many bytes to the client (None: never by itself)
        self.cut_every = cut_every
        #: connections cut so far (by cut() or by cut_every)
        self.cuts = 0
        #: connections accepted so far
        self.accepted = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._ready = threading.Event()

    # -- lifecycle -------------------------------------------------------------

    def __enter__(self) -> CuttingProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cutting-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the proxy did not start")

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = None

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        self._server = loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            for pair in list(self._pairs):
                self._close_pair(pair)
            pending = asyncio.all_tasks(loop)  # connections still being served: end them, don't abandon them
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    # -- faults ----------------------------------------------------------------

    def cut(self) -> int:
        """Close every live connection at once (no close frame); returns how many. Thread-safe."""
        loop = self._loop
        if loop is None:
            return 0
        done: asyncio.Future[int] = asyncio.run_coroutine_threadsafe(self._cut_all(), loop)  # type: ignore[assignment]
        return done.result(10)

    async def _cut_all(self) -> int:
        pairs = list(self._pairs)
        for pair in pairs:
            self._cut(pair)
        return len(pairs)

    def _cut(self, pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        if pair in self._pairs:
            self.cuts += 1
            self._close_pair(pair)

    def _close_pair(self, pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        self._pairs.discard(pair)
        for writer in pair:
            with contextlib.suppress(Exception):
                writer.transport.abort()

    # -- forwarding ------------------------------------------------------------

    async def admit(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> bytes | None:
        """What to forward before pumping (bytes already read from the client), or None to drop the client.

        Forwards everything as it comes; a subclass may read the request first and refuse some.
        """
        return b""

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        head = await self.admit(client_reader, client_writer)
        if head is None:
            client_writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            client_writer.transport.abort()
            return
        if head:
            upstream_writer.write(head)
        pair = (client_writer, upstream_writer)
        self._pairs.add(pair)
        await asyncio.gather(
            self._pump(client_reader, upstream_writer, pair, downstream=False),
            self._pump(upstream_reader, client_writer, pair, downstream=True),
            return_exceptions=True,
        )
        self._close_pair(pair)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pair: Any, *, downstream: bool
    ) -> None:
        carried = 0
        while pair in self._pairs:
            data = await reader.read(65536)
            if not data:
                break
            if downstream and self.cut_every is not None and carried + len(data) >= self.cut_every:
                # Forward part of it, then cut in the middle of whatever message it was.
                writer.write(data[: max(0, self.cut_every - carried)])
                with contextlib.suppress(Exception):
                    await writer.drain()
                self._cut(pair)
                return
            carried += len(data)
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(Exception):
            writer.write_eof()
