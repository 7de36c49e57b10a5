"""The broker inside your own asyncio program: no daemon, same wire protocol.

An application that runs its agents in-process can host actor-broker next
to them and publish straight into it, while its UIs connect over WebSocket
as they would to the daemon::

    from broker.embed import embedded_broker

    async with embedded_broker(port=8050) as running:
        await running.broker.publish_events({"type": "session_started", "session_id": "s1"})
        running.broker.emit(...)            # from any other thread
        print(running.url)                  # http://127.0.0.1:8050

It does what the daemon does to serve (actor dispatcher on the running
loop, `Broker`, the route table) and leaves the process to you: no signal
handlers, no logging set-up, no sd_notify, no GC tuning, no graceful drain
(clients are closed with 1001 on exit).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop

from actors.runtime import LoopDispatcher, install_dispatcher
from actors.wire import CloseCode
from broker.app import SERVER_MAX_BODY, make_app
from broker.config import Settings
from broker.core import Broker

__all__ = ["RunningBroker", "embedded_broker"]


#: How long the broker's actors get to stop when the `async with` ends.
STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class RunningBroker:
    """What `embedded_broker` serves: the broker to publish into, and where clients reach it."""

    broker: Broker
    host: str
    port: int

    @property
    def url(self) -> str:
        """The HTTP base URL (WebSockets are at the same host and port, `ws://`)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@contextlib.asynccontextmanager
async def embedded_broker(
    settings: Settings | None = None, *, host: str | None = None, port: int | None = None
) -> AsyncIterator[RunningBroker]:
    """Serve a broker on the running loop for the duration of the `async with`.

    `host` and `port` override the settings' (`port=0`: a free port, read it
    from `RunningBroker.port`). Must be entered on the thread that runs the
    loop; actors started meanwhile run on it and are stopped on exit.
    """
    settings = settings if settings is not None else Settings()
    host = settings.host if host is None else host
    port = settings.port if port is None else port
    dispatcher = LoopDispatcher(IOLoop.current())
    previous = install_dispatcher(dispatcher)
    server: HTTPServer | None = None
    broker: Broker | None = None
    try:
        broker = Broker(settings.replace(host=host, port=port))
        listening = _listen(host, port)
        server = HTTPServer(make_app(broker), max_body_size=SERVER_MAX_BODY)
        server.add_socket(listening)
        broker.ready = True
        await broker.start()
        yield RunningBroker(broker, host, listening.getsockname()[1])
    finally:
        if server is not None:
            server.stop()
        if broker is not None:
            broker.close_all(CloseCode.GOING_AWAY, "server shutdown")
            await broker.stop_actors(STOP_TIMEOUT)
            await broker.close()
        if server is not None:
            await server.close_all_connections()
        install_dispatcher(previous)


def _listen(host: str, port: int) -> socket.socket:
    """One listening socket; closed again if it cannot bind (tornado's bind_sockets leaks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listening = socket.create_server((host, port), family=family, backlog=128)
    listening.setblocking(False)
    return listening
