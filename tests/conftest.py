"""Shared fixtures: the actor harness, and the real application on a real loop."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from tornado.httpserver import HTTPServer

from actors.runtime import LoopDispatcher, install_dispatcher
from broker.app import make_app
from broker.config import Settings
from broker.core import Broker
from broker.testing import ActorHarness
from handlers.ws import FRAME_LOOP
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


#: The backends wire tests run against: the memory one, and a node on a Redis of the test's own.
#: Every test that uses the application fixture runs on both (docs/protocol.md section 7); a test of
#: memory-only behaviour is marked `memory_only` with its reason and skipped on Redis at collection
#: (`redis_only` the other way round).
#: `BROKER_TEST_BACKENDS=memory` (or `redis`) runs one of them only.
BACKENDS = os.environ.get("BROKER_TEST_BACKENDS", "memory,redis").split(",")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:  # skipped before any fixture runs (a server socket made and then skipped would leak)
        marker = item.get_closest_marker("memory_only")
        if marker is not None and "[redis" in item.nodeid:
            item.add_marker(pytest.mark.skip(reason=f"memory backend only: {marker.args[0]}"))
        marker = item.get_closest_marker("redis_only")
        if marker is not None and "[memory" in item.nodeid:
            item.add_marker(pytest.mark.skip(reason=f"Redis backend only: {marker.args[0]}"))


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Which backend the application runs on. A test of memory-only behaviour says so, and why:
    `@pytest.mark.memory_only("reason")`; it is skipped on Redis with that reason (at collection)."""
    return str(request.param)


@pytest.fixture
def broker(io_loop, settings, backend, request):
    if backend == "redis":
        redis_server = request.getfixturevalue("redis_server")
        settings = settings.replace(backend="redis", redis_url=redis_server.url, backend_check_interval=0.5)
    dispatcher = LoopDispatcher(io_loop)
    previous = install_dispatcher(dispatcher)
    b = Broker(settings)
    b.ready = True
    io_loop.run_sync(b.start)
    deadline = time.monotonic() + 10
    while not b.ready and time.monotonic() < deadline:  # a node is ready once its canary came back
        io_loop.run_sync(lambda: asyncio.sleep(0.01))  # noqa: sleep - bounded wait for the node's first canary
    assert b.ready, "the broker did not become ready"
    yield b
    for ref in reversed(dispatcher.actors()):
        ref.stop(block=False)
    io_loop.run_sync(lambda: asyncio.sleep(0))  # noqa: sleep - one loop turn so the stops run
    io_loop.run_sync(b.close)
    io_loop.run_sync(frame_loops_ended)
    install_dispatcher(previous)


async def frame_loops_ended() -> None:
    """End each WebSocket's frame task before the loop closes.

    A task still pending when its loop closes (its socket is closed with the
    loop's descriptors, after this) is destroyed later by the collector, and
    pytest pins that "Task was destroyed" on whichever test runs then. The
    actors are stopped by now, so each task is cancelled and awaited.
    """
    pending = [t for t in asyncio.all_tasks() if t.get_name() == FRAME_LOOP]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=5)


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


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium (Debian's), one per module; skipped loudly where absent (tests/browser/harness.py)."""
    from tests.browser.harness import launch_browser

    yield from launch_browser()


@pytest.fixture(scope="module")
def origin() -> Iterator[Any]:
    """A second origin on localhost that serves the browser tests' pages."""
    from tests.browser.harness import AppOrigin

    server = AppOrigin()
    yield server
    server.close()
