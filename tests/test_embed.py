"""broker.embed: the broker served inside the caller's own loop, on a real port."""

from __future__ import annotations

import pytest
from pykka import ActorRegistry

from actors.runtime import current_dispatcher, install_dispatcher
from broker.config import Settings
from broker.embed import RunningBroker, embedded_broker
from broker.testing import ManualDispatcher, WebSocketClient


async def test_clients_follow_what_the_host_program_publishes_and_are_closed_1001_at_exit():
    before = install_dispatcher(None)
    try:
        async with embedded_broker(port=0) as running:
            assert running.port > 0 and running.url == f"http://127.0.0.1:{running.port}"
            client = await WebSocketClient.connect(running.port, "/ws/research/emb1")
            await client.expect(type="connection_established", last_seq=0)
            seqs = await running.broker.publish_events(
                {"type": "session_started", "session_id": "emb1"},
                {"type": "task_started", "session_id": "emb1", "task_id": "t1"},
            )
            assert seqs == [1, 2]
            await client.expect(type="session_started", seq=1)
            await client.expect(type="task_started", seq=2, task_id="t1")
            dispatcher = current_dispatcher()
        assert await client.closed() == (1001, "server shutdown")
        assert [ref for ref in ActorRegistry.get_all() if ref.actor_inbox.dispatcher is dispatcher] == []
    finally:
        install_dispatcher(before)


async def test_the_previous_dispatcher_is_back_after_exit():
    mine = ManualDispatcher()
    before = install_dispatcher(mine)
    try:
        async with embedded_broker(Settings(buffer_size=7), port=0) as running:
            assert running.broker.settings.buffer_size == 7
            assert current_dispatcher() is not mine
        assert current_dispatcher() is mine
    finally:
        install_dispatcher(before)


async def test_a_port_in_use_is_an_error_at_entry_and_leaves_nothing_installed():
    before = install_dispatcher(None)
    try:
        async with embedded_broker(port=0) as first:
            with pytest.raises(OSError):
                async with embedded_broker(port=first.port):
                    pass
            assert current_dispatcher() is not None
    finally:
        install_dispatcher(before)


@pytest.mark.parametrize(("host", "url"), [("127.0.0.1", "http://127.0.0.1:80"), ("::1", "http://[::1]:80")])
def test_url_brackets_ipv6_hosts(host, url):
    assert RunningBroker(broker=None, host=host, port=80).url == url  # type: ignore[arg-type]
