"""Hostile sockets against the real daemon (docs/protocol.md section 5, "Sockets"; issue 15).

Each daemon runs as `python -m broker serve` with a low open-file limit (soft
and hard, set before it starts), so running out of descriptors takes a few
hundred sockets and the suite stays fast. The attackers are raw sockets in
this process: half-finished requests that trickle header lines, idle
connections that send nothing, connections that stall a body. What is
checked is what a user of the broker would notice: well-behaved clients keep
their events, health checks and publishing answer, a handshake past the
budget is a 503 answer (not a reset), the log stays short, the CPU stays
idle, and service is back within a second once the attackers let go.

Waiting is bounded everywhere. The sleeps here are the attackers' pace (a
header line every quarter second) and the windows over which the daemon's
CPU time is measured, never a way to wait for something to happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from broker.config import ConfigError, load_settings
from handlers.hosts import host_allowed, request_hostname
from tests.support.daemon import POLL, WAIT
from tests.test_daemon import DaemonProcess

#: The daemons' open-file limit: a few hundred sockets exhaust it.
NOFILE = 256
#: fd_reserve's default: the budget is NOFILE - RESERVE.
RESERVE = 64
#: Slack on the timeouts' bounds: a shared 2-core machine delays timers a little.
SLACK = 2.0
#: How long the daemon's CPU time is measured while attackers hold their sockets.
HOLD = 2.0
#: A busy loop is a whole core (1.0); an idle daemon holding sockets is near 0.
CPU_FRACTION_LIMIT = 0.25
#: After the attackers let go, service is back within this long (the issue's bound).
RECOVERY = 1.0


class LimitedDaemon(DaemonProcess):
    """`DaemonProcess` with an open-file limit (soft and hard) set before the broker starts."""

    def __init__(self, tmp_path: Path, *args: str, nofile: int = NOFILE, **env: str) -> None:
        super().__init__(tmp_path, *args, notify=False, nofile=nofile, **{"BROKER_LOG_FORMAT": "json", **env})

    def events(self, *names: str) -> list[dict[str, Any]]:
        return [event for event in self.logs() if event.get("event") in names]

    def cpu_seconds(self) -> float:
        """User plus system CPU time of the daemon so far (/proc/<pid>/stat, fields 14 and 15)."""
        stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def open_descriptors(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    async def metrics(self) -> dict[str, float]:
        response = await self.fetch("/metrics")
        assert response.code == 200, response.body
        values = {}
        for line in response.body.decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Start limited daemons (awaitable: returns one that is listening); killed at teardown."""
    daemons: list[LimitedDaemon] = []

    async def started(*args: str, nofile: int = NOFILE, **env: str) -> LimitedDaemon:
        directory = tmp_path / f"d{len(daemons)}"
        directory.mkdir()
        daemon = LimitedDaemon(directory, *args, nofile=nofile, **env)
        daemons.append(daemon)
        return await daemon.started()  # type: ignore[return-value]

    yield started
    for daemon in daemons:
        daemon.stop()


# -- raw sockets: the attackers ------------------------------------------------------


class Sockets:
    """Raw client sockets, all closed at the end of the `with`."""

    #: Connections opened at once: fewer than the listen backlog (128), so none waits for a SYN retry.
    BATCH = 64

    def __init__(self) -> None:
        self.open: list[socket.socket] = []
        #: when each socket's connect() completed (the server accepts it then or later)
        self.connected_at: dict[socket.socket, float] = {}

    def __enter__(self) -> Sockets:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_all()

    def close_all(self) -> None:
        for sock in self.open:
            sock.close()
        self.open.clear()

    async def connect(self, port: int, count: int = 1) -> list[socket.socket]:
        loop = asyncio.get_running_loop()

        async def one() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            self.open.append(sock)
            await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), WAIT)
            self.connected_at[sock] = time.monotonic()
            return sock

        opened: list[socket.socket] = []
        while len(opened) < count:
            opened += await asyncio.gather(*(one() for _ in range(min(self.BATCH, count - len(opened)))))
        return opened


async def send(sock: socket.socket, data: bytes) -> bool:
    """Send; False if the server has closed the connection."""
    try:
        await asyncio.get_running_loop().sock_sendall(sock, data)
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


async def closed_by_server(sock: socket.socket, timeout: float = WAIT) -> float:
    """Wait until the server closes (EOF or reset), discarding what it sent; the time it did."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            data = await asyncio.wait_for(loop.sock_recv(sock, 65536), max(0.0, deadline - loop.time()))
        except ConnectionResetError:
            return time.monotonic()
        if not data:
            return time.monotonic()


async def read_response(sock: socket.socket, timeout: float = WAIT) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response with a Content-Length body: (status, headers in lowercase, body)."""
    loop = asyncio.get_running_loop()
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), timeout)
        assert chunk, f"closed before an answer: {received!r}"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), timeout)
        assert chunk, f"closed inside the body: {body!r}"
        body += chunk
    return int(status_line.split()[1]), headers, body


def get(path: str, host: str = "127.0.0.1") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


def handshake(session_id: str, host: str = "127.0.0.1") -> bytes:
    return (
        f"GET /ws?session_id={session_id} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def handshake_status(port: int, session_id: str, host: str = "127.0.0.1") -> tuple[int, bytes]:
    """A WebSocket handshake on a fresh socket: the status and, for a refusal, its body."""
    with Sockets() as sockets:
        [sock] = await sockets.connect(port)
        assert await send(sock, handshake(session_id, host))
        loop = asyncio.get_running_loop()
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), WAIT)
            assert chunk, f"closed during the handshake (a reset, not an answer): {received!r}"
            received += chunk
        status = int(received.split(b" ", 2)[1])
        if status == 101:
            return status, b""
    with Sockets() as sockets:  # read the refusal again with its body
        [sock] = await sockets.connect(port)
        assert await send(sock, handshake(session_id, host))
        status, _, body = await read_response(sock)
        return status, body


async def until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll a condition on another process (its log, its descriptors) until it holds; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(POLL)  # noqa: sleep - bounded poll of another process


async def hold_cpu_window(daemon: LimitedDaemon) -> float:
    """The daemon's CPU time over HOLD seconds, as a fraction of one core."""
    cpu_before, started = daemon.cpu_seconds(), time.monotonic()
    await asyncio.sleep(HOLD)  # noqa: sleep - the measurement window, not a wait for an event
    return (daemon.cpu_seconds() - cpu_before) / (time.monotonic() - started)


async def publish_until(daemon: LimitedDaemon, session_id: str, done: asyncio.Event) -> int:
    """Publish numbered events one after another until `done`; how many were published."""
    count = 0
    while not done.is_set() and count < 100_000:
        response = await daemon.publish(session_id, {"type": "calm.tick", "n": count})
        assert response.code == 202, response.body
        count += 1
    return count


async def expect_every_event(client: Any, count: int) -> None:
    """The client receives seq 1..count in order, each once (keepalives aside)."""
    expected = 1
    while expected <= count:
        message = await client.receive()
        assert message is not None, client.close_info()
        if message["type"] == "keepalive":
            continue
        assert (message["type"], message["seq"]) == ("calm.tick", expected), message
        expected += 1


# -- timeouts ------------------------------------------------------------------------


async def test_half_finished_requests_are_closed_within_header_timeout_while_a_websocket_keeps_receiving(start):
    header_timeout = 1.0
    # 1024 descriptors: room for all 300, so what closes them is the timeout, not the budget.
    daemon = await start(nofile=1024, BROKER_HEADER_TIMEOUT=str(header_timeout))
    calm = await daemon.client("calm", replay="none")
    await calm.expect(type="connected")
    with Sockets() as sockets:
        attackers = await sockets.connect(daemon.port, 300)
        for index, sock in enumerate(attackers):  # half of them on the way to a WebSocket upgrade
            opening = handshake("calm").split(b"\r\n\r\n")[0] + b"\r\n" if index % 2 else get("/healthz")[:-2]
            assert await send(sock, opening)
        closes = [asyncio.ensure_future(closed_by_server(sock)) for sock in attackers]

        async def trickle() -> None:
            """One more header line on every connection each quarter second, never the blank line."""
            while not all(close.done() for close in closes):
                for sock, close in zip(attackers, closes, strict=True):
                    if not close.done():
                        await send(sock, b"X-Slow: 1\r\n")
                await asyncio.sleep(0.25)  # noqa: sleep - the attacker's pace

        done = asyncio.Event()
        publishing = asyncio.ensure_future(publish_until(daemon, "calm", done))
        trickling = asyncio.ensure_future(trickle())
        closed_at = await asyncio.gather(*closes)
        done.set()
        published = await publishing
        await trickling

    held = [at - sockets.connected_at[sock] for sock, at in zip(attackers, closed_at, strict=True)]
    # Held until the timeout ran out (not dropped early), and closed once it had.
    assert min(held) >= header_timeout * 0.9, min(held)
    assert max(held) <= header_timeout + SLACK, max(held)
    assert published > 0
    await expect_every_event(calm, published)
    info = orjson.loads((await daemon.fetch("/api/sessions/calm")).body)
    assert len(info["connections"]) == 1, info  # no half-finished handshake became a connection
    metrics = await daemon.metrics()
    assert metrics['broker_connection_timeouts_total{phase="headers"}'] >= 300
    # One line a second at most about them, with the count (the last one a second after the one before).
    await until(
        lambda: sum(line.get("headers", 0) for line in daemon.events("slow_requests_closed")) >= 300,
        "every timeout counted in the log",
    )
    assert len(daemon.events("slow_requests_closed")) <= max(held) + 2


async def test_idle_keep_alive_outlives_header_timeout_and_closes_after_idle_timeout(start):
    daemon = await start(BROKER_HEADER_TIMEOUT="1", BROKER_IDLE_TIMEOUT="3")
    with Sockets() as sockets:
        keep_alive, late_headers, stalled_body = await sockets.connect(daemon.port, 3)

        async def idle_between_requests() -> float:
            assert await send(keep_alive, get("/healthz"))
            assert (await read_response(keep_alive))[0] == 200
            await asyncio.sleep(1.5)  # noqa: sleep - idle past header_timeout, as a client between requests
            assert await send(keep_alive, get("/healthz"))
            assert (await read_response(keep_alive))[0] == 200  # still open: idling is not slow headers
            answered = time.monotonic()
            return await closed_by_server(keep_alive) - answered

        async def headers_after_idling() -> float:
            assert await send(late_headers, get("/healthz"))
            assert (await read_response(late_headers))[0] == 200
            await asyncio.sleep(0.5)  # noqa: sleep - the client idles, then starts its next request
            first_byte = time.monotonic()
            assert await send(late_headers, b"GET /healthz HTTP/1.1\r\n")
            close = asyncio.ensure_future(closed_by_server(late_headers))
            while not close.done():
                await send(late_headers, b"X-Slow: 1\r\n")
                await asyncio.sleep(0.25)  # noqa: sleep - the attacker's pace
            return await close - first_byte

        async def body_that_stops() -> float:
            head = (
                "POST /api/sessions/s/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            )
            assert await send(stalled_body, head.encode() + b'{"type":')
            last_byte = time.monotonic()
            return await closed_by_server(stalled_body) - last_byte

        idle, late, stalled = await asyncio.gather(idle_between_requests(), headers_after_idling(), body_that_stops())
    assert 3.0 * 0.9 <= idle <= 3.0 + SLACK, idle
    assert 1.0 * 0.9 <= late <= 1.0 + SLACK, late  # header_timeout from the first byte, not idle_timeout
    assert 3.0 * 0.9 <= stalled <= 3.0 + SLACK, stalled
    metrics = await daemon.metrics()
    assert metrics['broker_connection_timeouts_total{phase="idle"}'] >= 1
    assert metrics['broker_connection_timeouts_total{phase="headers"}'] >= 1
    assert metrics['broker_connection_timeouts_total{phase="body"}'] >= 1
    assert (await daemon.fetch("/api/sessions/s")).code == 404  # the stalled publish published nothing


# -- descriptors -----------------------------------------------------------------------


async def test_with_descriptors_exhausted_by_idle_sockets_health_and_publishing_answer_and_handshakes_get_503(start):
    # Long timeouts: the idle sockets stay for the whole test unless the daemon sheds them.
    daemon = await start(BROKER_HEADER_TIMEOUT="60", BROKER_IDLE_TIMEOUT="60")
    [budget_line] = daemon.events("descriptor_budget")
    assert (budget_line["limit"], budget_line["fd_reserve"]) == (NOFILE, RESERVE)
    assert budget_line["budget"] == NOFILE - RESERVE
    [warning] = daemon.events("max_connections_over_budget")  # 50000 connections cannot fit in 256 descriptors
    assert warning["max_connections"] == 50000 and warning["connections_that_fit"] < NOFILE - RESERVE
    calm = await daemon.client("calm", replay="none")
    await calm.expect(type="connected")
    descriptors_before = daemon.open_descriptors()

    with Sockets() as sockets:
        await sockets.connect(daemon.port, 400)  # far more than the daemon may open
        deadline = time.monotonic() + WAIT
        while (await daemon.metrics())["broker_connections_shed_total"] < 400 - (NOFILE - RESERVE):
            assert time.monotonic() < deadline, "the daemon never took in every idle socket"
        assert daemon.open_descriptors() <= NOFILE - RESERVE + 2  # the reserve is still free

        cpu = await hold_cpu_window(daemon)
        assert cpu < CPU_FRACTION_LIMIT, f"the daemon used {cpu:.0%} of a core holding idle sockets"

        assert (await daemon.fetch("/healthz")).code == 200
        assert (await daemon.fetch("/readyz")).code == 200
        assert (await daemon.publish("calm", {"type": "calm.tick", "n": 0})).code == 202
        status, body = await handshake_status(daemon.port, "newcomer")
        assert status == 503, (status, body)  # an answer, not a reset
        assert "descriptors" in orjson.loads(body)["error"]
        [stream] = await sockets.connect(daemon.port)  # an event stream is refused alike
        assert await send(stream, get("/sse?session_id=newcomer"))
        status, _, body = await read_response(stream)
        assert status == 503 and "descriptors" in orjson.loads(body)["error"], (status, body)
        await expect_every_event(calm, 1)  # the established client was never at risk

        metrics = await daemon.metrics()
        assert metrics['broker_limit_refusals_total{limit="fd_budget"}'] >= 2
        assert metrics["broker_descriptors_budget"] == NOFILE - RESERVE
        assert metrics["broker_descriptors_limit"] == NOFILE
        assert metrics["broker_accept_failures_total"] == 0  # shedding kept accept() from running out
        # A handful of lines about all this: at most one a second.
        trouble = daemon.events("connections_shed", "accept_failed")
        assert 1 <= len(trouble) <= 8, trouble
        assert sum(line.get("shed", 0) for line in trouble) >= 400 - (NOFILE - RESERVE)

        sockets.close_all()
        let_go = time.monotonic()
        while (await handshake_status(daemon.port, "newcomer"))[0] != 101:
            assert time.monotonic() - let_go < RECOVERY, "handshakes still refused a second after the sockets closed"
    assert (await daemon.fetch("/healthz")).code == 200
    await until(lambda: daemon.open_descriptors() <= descriptors_before, "descriptors back to where they were")


async def test_past_the_last_descriptor_accept_backs_off_without_a_busy_loop_and_resumes(start):
    # fd_reserve = 0: WebSockets may take every descriptor, so accept() itself runs out.
    daemon = await start(BROKER_FD_RESERVE="0", BROKER_HEADER_TIMEOUT="60", BROKER_IDLE_TIMEOUT="60")
    descriptors_before = daemon.open_descriptors()
    with Sockets() as sockets:
        for sock in await sockets.connect(daemon.port, NOFILE + 40):  # the last ones wait in the backlog
            assert await send(sock, handshake("crowd"))
        await daemon.wait_log(event="accept_failed")
        lines_before = len(daemon.events("accept_failed"))

        cpu = await hold_cpu_window(daemon)
        assert cpu < CPU_FRACTION_LIMIT, f"the daemon used {cpu:.0%} of a core while out of descriptors"
        failures = daemon.events("accept_failed")
        assert len(failures) - lines_before <= HOLD + 2, failures  # at most one line a second
        assert failures[-1]["error"] == "EMFILE" and failures[-1]["limit"] == NOFILE
        assert sum(line["refusals"] for line in failures) > len(failures)  # counted, not logged one by one

        sockets.close_all()
        let_go = time.monotonic()
        while True:
            with contextlib.suppress(OSError, TimeoutError):
                if (await daemon.fetch("/healthz", request_timeout=RECOVERY)).code == 200:
                    break
            assert time.monotonic() - let_go < RECOVERY, "not serving a second after the sockets closed"
    metrics = await daemon.metrics()
    assert metrics["broker_accept_failures_total"] >= 1
    await until(lambda: daemon.open_descriptors() <= descriptors_before, "descriptors back to where they were")
    status, _ = await handshake_status(daemon.port, "after")
    assert status == 101


# -- allowed_hosts -----------------------------------------------------------------------


async def test_a_foreign_host_gets_421_on_every_route_when_allowed_hosts_is_set(start):
    daemon = await start(BROKER_ALLOWED_HOSTS='["broker.example.com", ".internal"]')
    foreign = "evil.example:8050"
    with Sockets() as sockets:
        for request in (
            get("/healthz", foreign),
            get("/readyz", foreign),
            get("/metrics", foreign),
            get("/api/websocket/stats", foreign),
            get("/no/such/path", foreign),
            handshake("s", foreign),
            get("/sse?session_id=s", foreign),
            (
                f"POST /api/sessions/s/events HTTP/1.1\r\nHost: {foreign}\r\nContent-Type: application/json\r\n"
                'Content-Length: 16\r\n\r\n{"type":"x.y"}\r\n'
            ).encode(),
            b"GET /healthz HTTP/1.0\r\n\r\n",  # no Host at all
        ):
            [sock] = await sockets.connect(daemon.port)
            assert await send(sock, request)
            status, headers, body = await read_response(sock)
            assert status == 421, (request, status, body)
            assert headers["content-type"] == "application/json"
            assert "allowed_hosts" in orjson.loads(body)["error"]
        for host in ("broker.example.com", "BROKER.example.com.:443", "api.internal", "internal"):
            [sock] = await sockets.connect(daemon.port)
            assert await send(sock, get("/healthz", host))
            assert (await read_response(sock))[0] == 200, host
        assert (await handshake_status(daemon.port, "s", "broker.example.com:8050"))[0] == 101
        [sock] = await sockets.connect(daemon.port)
        assert await send(sock, get("/api/sessions/s", "broker.example.com"))
        status, _, body = await read_response(sock)
        assert status == 200  # the WebSocket made the session; the refused publish put nothing in it
        assert orjson.loads(body)["last_seq"] == 0, body


async def test_allowed_hosts_changes_on_sighup(start, tmp_path):
    config = tmp_path / "broker.toml"
    config.write_text("allowed_hosts = []\n")
    daemon = await start("--config", str(config))
    with Sockets() as sockets:
        [sock] = await sockets.connect(daemon.port)
        assert await send(sock, get("/healthz", "anything.example"))
        assert (await read_response(sock))[0] == 200
        config.write_text('allowed_hosts = ["only.example"]\n')
        daemon.send(signal.SIGHUP)
        await daemon.wait_log(event="config_reloaded")
        assert await send(sock, get("/healthz", "anything.example"))  # the same kept-alive connection
        assert (await read_response(sock))[0] == 421


async def test_without_allowed_hosts_any_host_is_served(http_server_client):
    response = await http_server_client.fetch("/healthz", headers={"Host": "rebound.attacker.example"})
    assert response.code == 200


@pytest.mark.parametrize(
    ("host", "allowed", "expected"),
    [
        ("broker.example.com", ("broker.example.com",), True),
        ("broker.example.com:8050", ("broker.example.com",), True),
        ("Broker.Example.Com.", ("broker.example.com",), True),
        ("evil.example", ("broker.example.com",), False),
        ("broker.example.com.evil.example", ("broker.example.com",), False),
        ("a.b.example.com", (".example.com",), True),
        ("example.com", (".example.com",), True),
        ("notexample.com", (".example.com",), False),
        ("[::1]:8050", ("[::1]",), True),
        ("[::1]", ("::1",), True),
        ("[::2]", ("[::1]",), False),
        ("127.0.0.1:8050", ("127.0.0.1",), True),
        ("anything", ("*",), True),
        ("anything", (), True),
        (None, ("broker.example.com",), False),
        ("", ("broker.example.com",), False),
        ("broker.example.com:x", ("broker.example.com",), False),
        ("[::1]junk", ("::1",), False),
    ],
)
def test_host_matching_ignores_port_case_and_trailing_dot(host, allowed, expected):
    assert host_allowed(host, allowed) is expected


def test_request_hostname_takes_the_name_out_of_a_host_header():
    assert request_hostname("Example.COM:80") == "example.com"
    assert request_hostname("[2001:db8::1]:443") == "2001:db8::1"
    assert request_hostname("[unterminated") is None


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('allowed_hosts = ["broker.example.com:8050"]', "allowed_hosts"),
        ('allowed_hosts = ["https://broker.example.com"]', "allowed_hosts"),
        ('allowed_hosts = "broker.example.com"', "allowed_hosts"),
        ("header_timeout = 0", "header_timeout"),
        ("idle_timeout = -1", "idle_timeout"),
        ("fd_reserve = -1", "fd_reserve"),
        ("fd_reserve = 1.5", "fd_reserve"),
    ],
)
def test_bad_socket_settings_stop_start_up_naming_the_key(tmp_path, text, key):
    path = tmp_path / "broker.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: {key}: expected "):
        load_settings(str(path), env={})


def test_socket_settings_load_from_the_environment():
    settings = load_settings(
        env={
            "BROKER_HEADER_TIMEOUT": "2.5",
            "BROKER_IDLE_TIMEOUT": "30",
            "BROKER_FD_RESERVE": "0",
            "BROKER_ALLOWED_HOSTS": '["broker.example.com", ".internal", "[::1]", "*"]',
        }
    )
    assert (settings.header_timeout, settings.idle_timeout, settings.fd_reserve) == (2.5, 30.0, 0)
    assert settings.allowed_hosts == ("broker.example.com", ".internal", "[::1]", "*")
