"""A real `redis-server` of the test's own, on a free port: never a mock, never the shared one.

Where the binary is absent, tests that need it are skipped with a loud
reason; with `REQUIRE_REDIS=1` (set by `.ci/run`) they fail instead, so CI
cannot pass by skipping the backend.

    def test_x(redis_server):          # fixture from tests/conftest.py
        url = redis_server.url          # redis://127.0.0.1:<port>/0
        redis_server.stop() / .start()  # kill it and bring it back (same port, data kept if `persist`)
        redis_server.pause() / .resume()  # SIGSTOP / SIGCONT: a Redis that hangs instead of refusing
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

REDIS_BINARY = shutil.which("redis-server")


def require_redis() -> str:
    """The redis-server binary, or skip (fail under REQUIRE_REDIS=1) with the reason."""
    if REDIS_BINARY is not None:
        return REDIS_BINARY
    message = "redis-server is not installed: the Redis backend's tests cannot run (apt-get install redis-server)"
    if os.environ.get("REQUIRE_REDIS") == "1":
        pytest.fail(f"{message}; REQUIRE_REDIS=1 makes this a failure")
    pytest.skip(message)
    raise AssertionError("unreachable")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def server_port() -> int:
    """A free port below the ephemeral range, for a server that may start after its clients.

    A port from bind(0) is an ephemeral one: a client that keeps trying to reach
    it while nothing listens (a node started before Redis) may connect to itself
    from that very port (TCP self-connect), or another process's bind(0) may
    take it, and redis-server then cannot listen there.
    """
    candidates = list(range(20_000, min(_ephemeral_start(), 32_768)))
    random.shuffle(candidates)
    for port in candidates:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


class RedisServer:
    """One redis-server process in `directory`; `persist=True` keeps an append-only file across restarts."""

    def __init__(self, directory: Path, *, persist: bool = False) -> None:
        self.binary = require_redis()
        self.directory = directory
        self.persist = persist
        self.port = server_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.persist else "no",
            "--appendfsync", "always",
            "--maxmemory-policy", "noeviction",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.directory / 'redis.log').read_text()[-2000:]}")
            if self._answers():
                return self
            time.sleep(0.02)  # noqa: sleep - bounded wait for another process to listen
        raise RuntimeError("redis-server did not answer PING in time")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Kill it (SIGKILL: what a crash looks like); the port stays ours for `start()`."""
        if self.process is not None and self.process.poll() is None:
            self.resume()
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a hung Redis, or a network that holds packets)."""
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def command(self, *args: str) -> bytes:
        """One command over a raw socket (no client library involved); the raw reply."""
        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = arg.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as conn:
            conn.sendall(b"".join(parts))
            return conn.recv(65536)
