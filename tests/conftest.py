"""Shared fixtures: the actor harness, and the real application on a real loop."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from tornado.httpserver import HTTPServer

from actors.runtime import LoopDispatcher, install_dispatcher
from broker.app import make_app
from broker.config import Settings
from broker.core import Broker
from broker.testing import ActorHarness
from tests.support.redis import RedisServer
from tests.support.wire import Clients


@pytest.fixture
def harness():
    with ActorHarness() as h:
        yield h


@pytest.fixture
def settings(request) -> Settings:
    """Default settings, or what a test asked for with tests.support.with_settings."""
    return getattr(request, "param", Settings())


@pytest.fixture
def broker(io_loop, settings):
    dispatcher = LoopDispatcher(io_loop)
    previous = install_dispatcher(dispatcher)
    b = Broker(settings)
    b.ready = True
    yield b
    for ref in reversed(dispatcher.actors()):
        ref.stop(block=False)
    io_loop.run_sync(lambda: asyncio.sleep(0))  # noqa: sleep - one loop turn so the stops run
    install_dispatcher(previous)


@pytest.fixture
def app(broker):
    return make_app(broker)


@pytest.fixture
def http_server(io_loop, http_server_port, app):
    """pytest-tornasync's server, with `app` a declared dependency.

    The plugin looks `app` up at run time, which parametrized `settings`
    cannot reach; naming it here puts it in every wire test's fixture closure.
    """
    server = HTTPServer(app)
    server.add_socket(http_server_port[0])
    yield server
    server.stop()
    io_loop.run_sync(server.close_all_connections)


@pytest.fixture
def port(http_server, http_server_port) -> int:
    return http_server_port[1]


@pytest.fixture
def connect(port: int) -> Iterator[Clients]:
    """WebSocket clients to the application under test (tests.support.wire.Clients); all closed at teardown.

    `client, greeting = await connect("s1")` opens `/ws` and reads the
    greeting; `research=True` uses `/ws/research/{id}`; `connect.plain(...)`
    reads nothing. `port` puts `settings` in the test's closure (`with_settings`).
    """
    clients = Clients(port)
    yield clients
    clients.close_all()


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of this test's own on a free port (tests/support/redis.py); killed at teardown."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()
