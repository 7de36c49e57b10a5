"""broker.gc_tuning: long-lived objects are frozen, so no full collection walks them.

Freezing is only safe because the server's per-connection and per-request
objects are freed by reference counting, not left as cycles: the wire test
at the end holds the server to that.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import orjson
import pytest

from actors.connection import ConnectionActor
from broker.gc_tuning import GcPauses
from broker.testing import WebSocketClient
from handlers.base import ApiHandler
from handlers.ws import BrokerWebSocket


class Node:
    """A container that can sit in a reference cycle and be watched by a weakref."""

    def __init__(self) -> None:
        self.other: Any = None


@pytest.fixture
def freezing():
    """GcPauses installed, and only the test's own collections running.

    Automatic collections are off meanwhile: one set off by another thread's
    allocations (a thread an earlier test left winding down) would freeze
    at a moment the test does not expect.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    pauses = GcPauses(freeze_survivors=True).install()
    yield pauses
    pauses.uninstall()
    gc.unfreeze()
    if was_enabled:
        gc.enable()


def test_survivors_of_a_middle_generation_collection_are_frozen(freezing):
    survivors = [[] for _ in range(1000)]
    gc.collect(1)
    frozen = gc.get_freeze_count()
    assert frozen >= len(survivors)
    gc.collect(0)  # a young collection freezes nothing new: its survivors may still die young
    # (the count may shrink: a frozen object is still freed when its last reference goes)
    assert gc.get_freeze_count() <= frozen
    assert sum(freezing.by_generation[1].counts) >= 1


def test_survivors_of_a_full_collection_are_frozen(freezing):
    survivors = [[] for _ in range(1000)]
    gc.collect()
    assert gc.get_freeze_count() >= len(survivors)
    assert sum(freezing.by_generation[2].counts) >= 1


def test_a_cycle_that_dies_frozen_waits_for_the_thaw(freezing):
    a, b = Node(), Node()
    a.other, b.other = b, a
    watch = weakref.ref(a)
    gc.collect(1)  # both frozen
    del a, b
    gc.collect()
    assert watch() is not None, "a frozen cycle is not collected"
    GcPauses.thaw()
    assert watch() is None, "the thaw collects it"
    assert gc.get_freeze_count() > 0, "and freezes what survives again"


def test_without_freezing_nothing_is_frozen():
    pauses = GcPauses().install()
    try:
        gc.collect()
        assert gc.get_freeze_count() == 0
    finally:
        pauses.uninstall()


async def test_connections_and_requests_leave_no_reference_cycles(broker, port, http_server_client):
    """What a connection or a publish leaves behind is freed by reference counting."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        clients = [await WebSocketClient.connect(port, f"/ws/research/cyc{i % 3}") for i in range(12)]
        for client in clients:
            await client.expect(type="connection_established")
        for i in range(20):
            response = await http_server_client.fetch(
                f"/api/sessions/cyc{i % 3}/events",
                method="POST",
                headers={"Content-Type": "application/json"},
                body=orjson.dumps({"type": "task_started", "task_id": f"t{i}"}),
            )
            assert response.code == 202
        bad = await http_server_client.fetch(
            "/api/sessions/cyc0/events", method="POST", body=b"{nope", raise_error=False
        )
        assert bad.code in (400, 415)
        for n, client in enumerate(clients):
            await client.expect(type="task_started")
            if n % 2:
                client.close()  # a closing handshake
            else:
                client.conn.protocol.stream.close()  # the TCP connection dropped
        for _ in range(500):
            if broker.open_connections == 0 and broker.stats.active_connections == 0:
                break
            await http_server_client.fetch("/healthz")  # one round trip per try, no sleeps
        assert broker.open_connections == 0 and broker.stats.active_connections == 0
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        server_side = (BrokerWebSocket, ApiHandler, ConnectionActor)
        cyclic = [type(o).__name__ for o in gc.garbage if isinstance(o, server_side)]
        assert cyclic == [], f"server objects left in reference cycles: {cyclic}"
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was_enabled:
            gc.enable()


def test_a_thaw_is_due_every_interval_and_never_at_0(freezing):
    start = freezing._thawed_at
    assert not freezing.thaw_when_due(600.0, start + 599.0)
    assert freezing.thaw_when_due(600.0, start + 600.5)
    assert not freezing.thaw_when_due(600.0, start + 1000.0), "the interval counts from the last thaw"
    assert freezing.thaw_when_due(600.0, start + 1201.0)
    assert not freezing.thaw_when_due(0.0, start + 10_000.0)


def test_a_frozen_object_is_still_freed_when_its_last_reference_goes(freezing):
    survivor = Node()
    watch = weakref.ref(survivor)
    gc.collect(1)
    assert gc.is_tracked(survivor) and watch() is not None
    del survivor
    assert watch() is None, "reference counting frees it at once, frozen or not"
