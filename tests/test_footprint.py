"""Per-connection memory: what a connection holds stays out of instance dicts.

A connection's actor and its WebSocket handler live as long as the client
does, 50 000 of them in a full process. Their state sits in `__slots__`, and
the handler's instance dict (Tornado's own attributes) stays small enough to
share its keys with every other handler's; an attribute added outside the
slots would cost each connection a private dict of 1.5 KiB. bench/ measures
the memory itself; these tests keep the layout that bench result relies on.
"""

from __future__ import annotations

from broker.testing import WebSocketClient

#: CPython 3.11 shares an instance dict's keys among the instances of a class
#: up to this many keys; past it every instance has its own, ~1.5 KiB table.
SHARED_KEYS_LIMIT = 30


async def open_connection(broker, port):
    client = await WebSocketClient.connect(port, "/ws/research/footprint")
    await client.expect(type="connection_established")
    session = broker.directory.get("footprint")._actor_weakref()
    (member,) = session.members.values()
    return client, member.ref._actor_weakref()


async def test_a_connection_actor_keeps_its_state_in_slots(broker, port):
    client, actor = await open_connection(broker, port)
    try:
        assert vars(actor) == {}, f"attributes outside __slots__: {sorted(vars(actor))}"
        assert vars(actor.actor_ref) == {}, f"ref attributes outside __slots__: {sorted(vars(actor.actor_ref))}"
    finally:
        client.close()


async def test_a_websocket_handler_dict_stays_within_the_shared_keys_limit(broker, port):
    client, actor = await open_connection(broker, port)
    try:
        handler = actor.transport.handler
        assert len(vars(handler)) <= SHARED_KEYS_LIMIT, sorted(vars(handler))
    finally:
        client.close()
