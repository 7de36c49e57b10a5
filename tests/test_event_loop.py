"""`event_loop`: the daemon runs on the loop it is told to, and serves on it as on the other.

Real daemon processes (tests/support/daemon.py): each starts with
`BROKER_EVENT_LOOP`, says in its `listening` line which loop it runs, takes a
WebSocket client and a publish, delivers the event, and drains on SIGTERM
(signal handlers are the loop's). uvloop is an optional extra: where it is not
installed its case is skipped with that reason, and asking for it stops
start-up like any bad setting (exit 2).
"""

from __future__ import annotations

import importlib.util
import signal
from pathlib import Path

import pytest

from broker.testing import WebSocketClient
from tests.support.daemon import BrokerProcess, settings_env
from tests.support.wire import post_events

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None
NO_UVLOOP = "uvloop is not installed here (pip install 'actor-broker[uvloop]')"


async def serves_a_publish(daemon: BrokerProcess) -> None:
    client = await WebSocketClient.connect(daemon.port, "/ws", session_id="loop", replay="none")
    try:
        await client.expect(type="connected")
        response = await post_events(daemon, "loop", {"type": "loop.tick", "n": 1})
        assert response.code == 202, response.body
        await client.expect(type="loop.tick", seq=1, n=1)
    finally:
        client.close()
    daemon.send(signal.SIGTERM)
    assert await daemon.exited() == 0, daemon.output()


@pytest.mark.parametrize(
    "choice",
    ["asyncio", pytest.param("uvloop", marks=pytest.mark.skipif(not HAVE_UVLOOP, reason=NO_UVLOOP))],
)
async def test_the_daemon_serves_on_the_loop_it_is_told_to(tmp_path: Path, choice: str) -> None:
    daemon = BrokerProcess(tmp_path, env=settings_env(event_loop=choice))
    try:
        await daemon.started()
        assert daemon.find_log(event="listening")["event_loop"] == choice
        await serves_a_publish(daemon)
    finally:
        daemon.stop()


async def test_auto_takes_uvloop_when_it_is_installed(tmp_path: Path) -> None:
    daemon = BrokerProcess(tmp_path)  # the default: event_loop = "auto"
    try:
        await daemon.started()
        assert daemon.find_log(event="listening")["event_loop"] == ("uvloop" if HAVE_UVLOOP else "asyncio")
        await serves_a_publish(daemon)
    finally:
        daemon.stop()


@pytest.mark.parametrize(
    "choice",
    ["libuv", pytest.param("uvloop", marks=pytest.mark.skipif(HAVE_UVLOOP, reason="uvloop is installed here"))],
)
async def test_a_loop_that_cannot_be_had_stops_start_up_with_exit_2(tmp_path: Path, choice: str) -> None:
    daemon = BrokerProcess(tmp_path, env=settings_env(event_loop=choice))
    try:
        assert await daemon.exited() == 2
        (line,) = daemon.stderr_path.read_text().splitlines()
        assert line.startswith("actor-broker: ") and "EVENT_LOOP" in line.upper() and "expected" in line, line
    finally:
        daemon.stop()
