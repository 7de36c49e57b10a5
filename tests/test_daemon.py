"""The daemon as systemd runs it: a real process, real signals, a real notify socket.

Each test starts `python -m broker serve --port 0` in a subprocess with its
own environment, binds the service manager's end of `NOTIFY_SOCKET` itself
(an AF_UNIX datagram socket in the test's temporary directory), and reads the
daemon's JSON log lines from the file its stdout goes to. Every wait is
bounded; the few polls (of a log file, of a process's exit) are marked.

The in-process tests at the end cover what needs no process: the request id
on log lines, the JSON 500, the sd_notify helpers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog
import tornado.web
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port
from tornado.websocket import websocket_connect

from broker.logs import log_request
from broker.sdnotify import SdNotifier, watchdog_period
from broker.testing import WebSocketClient
from handlers.base import ApiHandler
from tests.support.daemon import POLL, ROOT, WAIT, BrokerProcess
from tests.support.wire import metrics, post_events

UNIT = ROOT / "config" / "actor-broker.service"


class NotifyListener:
    """The service manager's side of `NOTIFY_SOCKET`: receives and parses datagrams."""

    def __init__(self, directory: Path) -> None:
        path = directory / "notify.sock"
        if len(os.fsencode(path)) > 100:  # sun_path holds 108 bytes
            path = Path(tempfile.mkdtemp(prefix="ab-")) / "notify.sock"
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        #: every datagram so far, each as {KEY: VALUE}, with its arrival time
        self.received: list[tuple[float, dict[str, str]]] = []

    async def receive(self, timeout: float = WAIT) -> dict[str, str]:
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, 4096), timeout)
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.received.append((time.monotonic(), fields))
        return fields

    async def wait_for(self, key: str, value: str | None = None, timeout: float = WAIT) -> dict[str, str]:
        """Read datagrams until one sets `key` (to `value`, if given)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {key}={value or '*'} within {timeout} s; got {self.keys()}")
            try:
                fields = await self.receive(remaining)
            except TimeoutError:
                continue
            if key in fields and (value is None or fields[key] == value):
                return fields

    def keys(self) -> list[str]:
        return [",".join(fields) for _, fields in self.received]

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


class DaemonProcess(BrokerProcess):
    """The shared daemon process (tests/support/daemon.py) as systemd runs it: with a notify socket.

    Settings come as keyword arguments named as the environment variables
    (`BROKER_SHUTDOWN_TIMEOUT="4"`); `notify=False` runs it without a service manager,
    `nofile` with that open-file limit.
    """

    def __init__(self, tmp_path: Path, *args: str, notify: bool = True, nofile: int | None = None, **env: str) -> None:
        self.tmp_path = tmp_path
        self.notify = NotifyListener(tmp_path) if notify else None
        if self.notify is not None:
            env["NOTIFY_SOCKET"] = str(self.notify.path)
        super().__init__(tmp_path, *args, env=env, nofile=nofile)
        self.clients: list[WebSocketClient] = []

    async def publish(self, session_id: str, event: dict[str, Any]) -> HTTPResponse:
        return await post_events(self, session_id, event)

    async def client(self, session_id: str, **params: Any) -> WebSocketClient:
        client = await WebSocketClient.connect(self.port, "/ws", session_id=session_id, **params)
        self.clients.append(client)
        return client

    def stop(self) -> None:
        """Teardown: its clients close, the process goes, the notify socket too."""
        for client in self.clients:
            client.close()
        super().stop()
        if self.notify is not None:
            self.notify.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Start daemons; each is killed at teardown if the test did not stop it."""
    daemons: list[DaemonProcess] = []

    def start(*args: str, notify: bool = True, **env: str) -> DaemonProcess:
        directory = tmp_path / f"d{len(daemons)}"
        directory.mkdir()
        daemon = DaemonProcess(directory, *args, notify=notify, **env)
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        daemon.stop()


async def terminate(daemon: DaemonProcess) -> None:
    """SIGTERM after the test's clients left (a client with unread messages answers no close)."""
    for client in daemon.clients:
        client.close()
    daemon.send(signal.SIGTERM)
    assert await daemon.exited() == 0, daemon.output()


async def hold_socket_open(port: int, session_id: str) -> socket.socket:
    """A WebSocket client that reads its greeting and then nothing: it never answers the close.

    The server waits for its close frame, so the drain lasts until the
    deadline: long enough to look at the daemon while it drains.
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), WAIT)
    request = (
        f"GET /ws?session_id={session_id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    received = b""
    while b"\r\n\r\n" not in received or received.endswith(b"\r\n\r\n"):  # headers, then the greeting frame
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), WAIT)
        assert chunk, f"closed during the handshake: {received!r}"
        received += chunk
    assert received.startswith(b"HTTP/1.1 101"), received
    return sock


# -- start-up and systemd ---------------------------------------------------------


async def test_ready_is_sent_once_the_port_accepts_connections(spawn):
    daemon = spawn()
    ready = await daemon.notify.wait_for("READY", "1")
    await daemon.started()  # the port, from the log line written before READY=1
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=1.0):
        pass  # accepted: READY=1 did not come early
    assert "connections" in ready["STATUS"]
    assert (await daemon.fetch("/readyz")).code == 200
    assert (await daemon.fetch("/healthz")).code == 200
    await terminate(daemon)
    await daemon.notify.wait_for("STOPPING", "1")  # queued in the socket since SIGTERM


async def test_watchdog_pings_at_half_of_watchdog_usec(spawn):
    daemon = spawn(WATCHDOG_USEC="200000")
    await daemon.notify.wait_for("READY", "1")
    pings = []
    for _ in range(4):
        await daemon.notify.wait_for("WATCHDOG", "1", timeout=5.0)
        pings.append(time.monotonic())
    # Every 0.1 s; generous bounds, as a loaded CI machine delays timers.
    assert pings[-1] - pings[0] < 2.0
    await terminate(daemon)


async def test_sigterm_drains_clients_and_exits_0(spawn):
    daemon = spawn(BROKER_SHUTDOWN_TIMEOUT="4")
    await daemon.started()
    first = await daemon.client("s1")
    second = await daemon.client("s2")
    await first.expect(type="connected")
    await second.expect(type="connected")
    stubborn = await hold_socket_open(daemon.port, "s3")
    signalled = time.monotonic()
    daemon.send(signal.SIGTERM)
    await daemon.notify.wait_for("STOPPING", "1")

    # While it drains: HTTP answers, /readyz says 503, new WebSockets get 503.
    deadline = time.monotonic() + WAIT
    while (await daemon.fetch("/readyz")).code != 503:
        assert time.monotonic() < deadline, "readyz never turned 503"
        await asyncio.sleep(POLL)  # noqa: sleep - bounded poll of another process
    with pytest.raises(HTTPClientError) as refused:
        await asyncio.wait_for(websocket_connect(f"ws://127.0.0.1:{daemon.port}/ws?session_id=late"), WAIT)
    assert refused.value.code == 503
    assert daemon.process.poll() is None, "the drain ended before the checks: the stubborn client did not hold it"

    for client in (first, second):
        notice = await client.expect(type="server_shutdown")
        assert isinstance(notice["reconnect_after_ms"], int) and notice["reconnect_after_ms"] > 0
        code, _reason = await client.closed()
        assert code == 1001
    assert await daemon.exited() == 0, daemon.output()
    assert time.monotonic() - signalled < 4 + 3, "the drain overran shutdown_timeout"
    stubborn.close()
    assert [e["event"] for e in daemon.logs() if e["event"] in {"draining", "stopped"}] == ["draining", "stopped"]


async def test_sigint_drains_too(spawn):
    daemon = spawn()
    await daemon.started()
    client = await daemon.client("s1")
    await client.expect(type="connected")
    daemon.send(signal.SIGINT)
    await client.expect(type="server_shutdown")
    assert (await client.closed())[0] == 1001
    assert await daemon.exited() == 0, daemon.output()
    await daemon.notify.wait_for("STOPPING", "1")


async def test_a_second_sigterm_forces_the_exit(spawn):
    daemon = spawn(BROKER_SHUTDOWN_TIMEOUT="60")
    await daemon.started()
    stubborn = await hold_socket_open(daemon.port, "s1")
    daemon.send(signal.SIGTERM)
    await daemon.wait_log(event="draining")
    daemon.send(signal.SIGTERM)
    assert await daemon.exited() == 128 + signal.SIGTERM
    await daemon.wait_log(event="forced_exit")
    stubborn.close()


# -- SIGHUP ---------------------------------------------------------------------


async def test_sighup_applies_live_settings_without_dropping_clients(spawn, tmp_path):
    config = tmp_path / "broker.toml"
    config.write_text('keepalive_interval = 25.0\nhost = "127.0.0.1"\n')
    daemon = spawn("--config", str(config))
    await daemon.started()
    await daemon.notify.wait_for("READY", "1")
    before = await daemon.client("s1")
    assert (await before.expect(type="connected"))["keepalive_interval"] == 25

    config.write_text('keepalive_interval = 7.0\nhost = "localhost"\n')
    daemon.send(signal.SIGHUP)
    reloaded = await daemon.wait_log(event="config_reloaded")
    assert reloaded["changed"] == ["keepalive_interval"]
    assert reloaded["path"] == str(config)
    restart = await daemon.wait_log(event="config_restart_required")
    assert restart["keys"] == ["host"]
    await daemon.notify.wait_for("READY", "1")  # the reload is over

    after = await daemon.client("s1")
    assert (await after.expect(type="connected"))["keepalive_interval"] == 7
    assert (await daemon.publish("s1", {"type": "task_started", "task_id": "t1"})).code == 202
    await before.expect(type="task_started", task_id="t1")  # the old client is still there
    await after.expect(type="task_started", task_id="t1")
    await terminate(daemon)


@pytest.mark.parametrize(
    "broken",
    ["keepalive_interval = [not toml\n", "keepalive_intervall = 7.0\n", "keepalive_interval = -1\n"],
    ids=["invalid-toml", "unknown-key", "out-of-range"],
)
async def test_a_broken_file_on_sighup_is_logged_and_changes_nothing(spawn, tmp_path, broken):
    config = tmp_path / "broker.toml"
    config.write_text("keepalive_interval = 25.0\n")
    daemon = spawn(BROKER_CONFIG=str(config))
    await daemon.started()
    client = await daemon.client("s1")
    await client.expect(type="connected")

    config.write_text(broken)
    daemon.send(signal.SIGHUP)
    failure = await daemon.wait_log(event="config_reload_failed")
    assert failure["path"] == str(config)
    assert str(config) in failure["error"] or "keepalive" in failure["error"]
    assert failure["level"] == "error"

    assert daemon.process.poll() is None
    assert (await daemon.fetch("/readyz")).code == 200
    again = await daemon.client("s1")
    assert (await again.expect(type="connected"))["keepalive_interval"] == 25
    assert (await daemon.publish("s1", {"type": "task_started", "task_id": "t1"})).code == 202
    await client.expect(type="task_started")
    await terminate(daemon)


# -- logs and metrics --------------------------------------------------------------


async def test_log_lines_are_json_with_ids_bound(spawn):
    daemon = spawn(BROKER_LOG_LEVEL="debug")
    await daemon.started()
    client = await daemon.client("logs-1")
    hello = await client.expect(type="connected")
    response = await post_events(
        daemon, "logs-1", {"type": "task_started", "task_id": "t1"}, headers={"X-Request-ID": "req-abc.123"}
    )
    assert response.code == 202
    assert response.headers["X-Request-ID"] == "req-abc.123"
    await client.expect(type="task_started")
    await client.send({"type": "disconnect"})
    await client.closed()
    await daemon.wait_log(event="connection_detached", connection_id=hello["connection_id"])

    access = await daemon.wait_log(event="http_request", request_id="req-abc.123")
    assert access["status"] == 202 and access["path"] == "/api/sessions/logs-1/events"
    events = daemon.logs()  # every line parses, or this fails
    about_connections = [e for e in events if e["event"].startswith("connection_")]
    assert about_connections, [e["event"] for e in events]
    for event in about_connections:
        assert event["session_id"] == "logs-1", event
        assert event["connection_id"] == hello["connection_id"], event
    assert all({"event", "level", "logger", "timestamp"} <= e.keys() for e in events)
    await terminate(daemon)


async def test_connections_come_and_go_in_the_log_at_the_default_level(spawn):
    daemon = spawn()  # log_level defaults to info
    await daemon.started()
    client = await daemon.client("seen-1", user_id="ana", events="essential", replay="none")
    hello = await client.expect(type="connected")
    assert (await daemon.publish("seen-1", {"type": "task_completed", "task_id": "t1"})).code == 202
    await client.expect(type="task_completed")
    await client.send({"type": "disconnect"})
    assert (await client.closed())[0] == 1000
    opened = await daemon.wait_log(event="connection_opened", connection_id=hello["connection_id"])
    assert opened["level"] == "info"
    assert {k: opened[k] for k in ("session_id", "user_id", "transport", "events", "replay", "remote_ip")} == {
        "session_id": "seen-1",
        "user_id": "ana",
        "transport": "websocket",
        "events": hello["events"],
        "replay": "none",
        "remote_ip": "127.0.0.1",
    }
    closed = await daemon.wait_log(event="connection_closed", connection_id=hello["connection_id"])
    assert closed["level"] == "info" and closed["session_id"] == "seen-1" and closed["user_id"] == "ana"
    assert (closed["code"], closed["reason"]) == (1000, "client disconnect")
    assert closed["messages_sent"] == 3  # connected, task_completed, disconnected
    assert closed["bytes_sent"] > 0 and closed["duration_s"] >= 0
    access = await daemon.wait_log(event="http_request", path="/api/sessions/seen-1/events")
    assert access["session_id"] == "seen-1"
    await terminate(daemon)


async def test_metrics_over_the_wire(spawn):
    daemon = spawn()
    await daemon.started()
    samples = await metrics(daemon)
    for name in ("broker_connections", "broker_events_received_total", "broker_actor_mailbox_messages"):
        assert name in samples, name
    await terminate(daemon)


async def test_the_daemon_freezes_long_lived_objects_and_thaws_them_every_gc_thaw_interval(spawn):
    daemon = spawn(BROKER_GC_THAW_INTERVAL="1", BROKER_LOG_LEVEL="info")
    await daemon.started()
    listening = await daemon.wait_log(event="listening")
    assert listening["gc_frozen_objects"] > 0, "start-up objects are frozen"
    client = await daemon.client("thaw-1")
    await client.expect(type="connected")
    # the check runs every 5 s (THAW_CHECK_INTERVAL); a thaw is due after 1 s
    thawed = await daemon.wait_log(event="gc_thawed", timeout=15)
    assert thawed["frozen_objects"] > 0, "what survived the thaw's collection is frozen again"
    await client.send({"type": "ping"})
    await client.expect(type="pong")
    await terminate(daemon)


# -- the unit file ------------------------------------------------------------------


def unit_directives() -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            directives.setdefault(key.strip(), []).append(value.strip())
    return directives


def test_the_unit_is_a_sandboxed_notify_service():
    d = unit_directives()
    assert d["Type"] == ["notify"]
    assert d["Restart"] == ["on-failure"]
    assert d["DynamicUser"] == ["yes"]
    assert int(d["WatchdogSec"][0]) > 0
    assert d["ProtectSystem"] == ["strict"]
    for switch in ("NoNewPrivileges", "PrivateTmp", "PrivateDevices", "ProtectHome", "ProtectKernelTunables"):
        assert d[switch] == ["yes"], switch
    assert "-HUP" in d["ExecReload"][0]
    # The stop timeout must leave room for the drain (shutdown_timeout defaults to 30 s).
    assert int(d["TimeoutStopSec"][0]) > 30


def test_the_unit_passes_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed here (it comes with systemd); the unit was not verified")
    # verify insists that ExecStart's program exists: point it at this interpreter.
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={sys.executable} -m broker", UNIT.read_text(), flags=re.M)
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    result = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False)
    output = result.stdout + result.stderr
    problems = [line for line in output.splitlines() if UNIT.name in line]
    assert result.returncode == 0 and not problems, output


# -- in process: request ids, JSON 500, sd_notify helpers ---------------------------


class Boom(ApiHandler):
    def get(self) -> None:
        structlog.get_logger("test").info("about_to_fail")
        raise RuntimeError("kaboom")


async def test_an_uncaught_error_is_a_json_500_logged_once_with_the_request_id(broker, caplog):
    app = tornado.web.Application([(r"/boom", Boom, {"broker": broker})], log_function=log_request)
    sock, port = bind_unused_port()
    server = HTTPServer(app)
    server.add_socket(sock)
    try:
        with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
            request = HTTPRequest(f"http://127.0.0.1:{port}/boom", headers={"X-Request-ID": "req-500"})
            response = await AsyncHTTPClient().fetch(request, raise_error=False)
    finally:
        server.stop()
    assert response.code == 500
    assert response.headers["X-Request-ID"] == "req-500"
    assert response.headers["Content-Type"] == "application/json"
    assert orjson.loads(response.body) == {"error": "internal server error", "request_id": "req-500"}
    by_event = {e["event"]: e for e in logs}
    assert by_event["about_to_fail"]["request_id"] == "req-500"  # bound, not passed
    failures = [e for e in logs if e.get("exc_info")]
    assert [e["event"] for e in failures] == ["request_failed"], logs
    assert failures[0]["request_id"] == "req-500"
    assert by_event["http_request"]["status"] == 500 and by_event["http_request"]["request_id"] == "req-500"
    assert not [r for r in caplog.records if r.name == "tornado.application"], "tornado logged it a second time"


async def test_a_request_id_that_is_not_an_id_is_replaced(http_server_client):
    response = await http_server_client.fetch("/api/websocket/stats", headers={"X-Request-ID": "a b\tc"})
    assert re.fullmatch(r"r-[0-9a-f]+", response.headers["X-Request-ID"])


def test_watchdog_period_is_half_of_watchdog_usec():
    assert watchdog_period({"WATCHDOG_USEC": "200000"}) == 0.1
    assert watchdog_period({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}) == 0.1
    assert watchdog_period({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}) is None  # meant for another process
    assert watchdog_period({}) is None
    assert watchdog_period({"WATCHDOG_USEC": "0"}) is None


def test_the_notifier_sends_one_datagram_and_is_inert_without_a_socket(tmp_path):
    assert not SdNotifier({}).enabled
    assert SdNotifier({}).ready() is False
    listener = NotifyListener(tmp_path)
    listener.sock.setblocking(True)
    listener.sock.settimeout(WAIT)
    notifier = SdNotifier({"NOTIFY_SOCKET": str(listener.path)})
    try:
        assert notifier.ready("2 connections\nand a newline") is True
        assert listener.sock.recv(4096) == b"READY=1\nSTATUS=2 connections and a newline"
    finally:
        listener.close()
    assert notifier.watchdog() is False  # the manager is gone: reported, never raised
    notifier.close()
