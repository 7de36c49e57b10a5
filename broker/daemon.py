"""Run the broker as a process: loop, dispatcher, HTTP server, signals."""

from __future__ import annotations

import asyncio
import signal

import structlog
import tornado.httpserver
from pykka import ActorRegistry
from tornado.ioloop import IOLoop

from actors.connection import ConnectionActor
from actors.messages import CloseConnection
from actors.runtime import LoopDispatcher, install_dispatcher
from actors.session import control_frame
from broker.app import SERVER_MAX_BODY, make_app
from broker.config import Settings
from broker.core import Broker
from broker.logs import configure_logging

log = structlog.get_logger("actor_broker.daemon")

#: How long clients are asked to wait before reconnecting after a shutdown.
RECONNECT_AFTER_MS = 2000


async def run(settings: Settings) -> None:
    install_dispatcher(LoopDispatcher(IOLoop.current()))
    broker = Broker(settings)
    app = make_app(broker)
    server = tornado.httpserver.HTTPServer(app, max_body_size=SERVER_MAX_BODY, xheaders=False)
    server.listen(settings.port, settings.host)
    broker.ready = True
    log.info("listening", host=settings.host, port=settings.port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining", connections=broker.stats.active_connections)
    await drain(broker, settings.shutdown_timeout)
    server.stop()
    log.info("stopped")


async def drain(broker: Broker, timeout: float) -> None:
    """Refuse new work, tell every client to come back later, close them with 1001."""
    broker.draining = True
    broker.ready = False
    notice = control_frame({"type": "server_shutdown", "reconnect_after_ms": RECONNECT_AFTER_MS})
    for ref in ActorRegistry.get_by_class(ConnectionActor):
        if ref.is_alive():
            ref.tell(notice)
            ref.tell(CloseConnection(1001, "server shutdown"))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while broker.stats.active_connections and loop.time() < deadline:
        await asyncio.sleep(0.05)
    for ref in reversed(ActorRegistry.get_all()):
        if ref.is_alive():
            ref.stop(block=False)


def serve(settings: Settings) -> int:
    configure_logging(settings.log_level, settings.log_format)
    IOLoop.current().run_sync(lambda: run(settings))
    return 0
