"""Shared fixtures: the actor harness, and the real application on a real loop."""

from __future__ import annotations

import asyncio

import pytest
from pykka import ActorRegistry

from actors.runtime import LoopDispatcher, install_dispatcher
from broker.app import make_app
from broker.config import Settings
from broker.core import Broker
from broker.testing import ActorHarness


@pytest.fixture
def harness():
    with ActorHarness() as h:
        yield h


@pytest.fixture
def settings() -> Settings:
    """Override in a test module (or parametrize) to run the app with other settings."""
    return Settings()


@pytest.fixture
def broker(io_loop, settings):
    dispatcher = LoopDispatcher(io_loop)
    previous = install_dispatcher(dispatcher)
    b = Broker(settings)
    b.ready = True
    yield b
    for ref in reversed(ActorRegistry.get_all()):
        if getattr(ref.actor_inbox, "dispatcher", None) is dispatcher and ref.is_alive():
            ref.stop(block=False)
    io_loop.run_sync(lambda: asyncio.sleep(0))
    install_dispatcher(previous)


@pytest.fixture
def app(broker):
    return make_app(broker)


@pytest.fixture
def port(http_server, http_server_port) -> int:
    return http_server_port[1]
