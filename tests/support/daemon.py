"""A real `python -m broker serve` process for tests: started, waited for, read, stopped.

One helper for every test that runs the daemon as a user does (the systemd
tests, the hostile-socket tests, the browser tests, the cluster tests): it
starts the process with an environment of the test's choosing (and, when
asked, a low open-file limit set before the broker starts), writes its
stdout and stderr to files in the test's directory, finds the port in the
`listening` log line (`--port 0`), reads the JSON log lines back, and makes
sure the process is gone at teardown.

Every wait is bounded. The daemon tells nothing but its log file and its
exit, so the waits here are polls of those, each marked as such.

    daemon = BrokerProcess(tmp_path, env=settings_env(buffer_size=10))
    await daemon.started()                      # or daemon.wait_started() outside a loop
    response = await daemon.fetch("/readyz")
    await daemon.wait_log(event="backend_deaf")
    daemon.kill()                               # SIGKILL: a crash
    daemon.stop()                               # teardown, whatever state it is in
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
from tornado.httpclient import AsyncHTTPClient, HTTPResponse

__all__ = ["POLL", "ROOT", "WAIT", "BrokerProcess", "clean_env", "settings_env"]

ROOT = Path(__file__).resolve().parents[2]
#: Upper bound of any one wait on the daemon (it starts in well under a second, plus imports).
WAIT = 15.0
#: Interval of the bounded polls of the daemon's log file and exit.
POLL = 0.02

#: The child lowers its own open-file limit (soft and hard), then runs `python -m broker`:
#: a limit set by the child itself, with no preexec_fn (unsafe in a process with threads).
_LIMITED = (
    "import resource, runpy, sys; limit = int(sys.argv.pop(1)); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)); sys.argv[0] = 'broker'; "
    "runpy.run_module('broker', run_name='__main__', alter_sys=True)"
)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without broker settings or systemd variables, plus `extra`.

    A developer's own BROKER_ variables (or a CI's NOTIFY_SOCKET) must not
    change what a test's daemon does.
    """
    drop = ("BROKER_", "WEBSOCKET_", "NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return {**env, **extra}


def settings_env(**settings: Any) -> dict[str, str]:
    """Settings as the daemon reads them from the environment: `BROKER_<KEY>`, lists and tables as JSON."""
    return {
        f"BROKER_{key.upper()}": value if isinstance(value, str) else orjson.dumps(value).decode()
        for key, value in settings.items()
    }


class BrokerProcess:
    """`python -m broker serve --port PORT [args]` in a subprocess, its output in `directory`.

    `env` is added to a clean environment (`clean_env`); `nofile` sets the
    open-file limit (soft and hard) the daemon starts with.
    """

    def __init__(
        self,
        directory: Path,
        *args: str,
        env: Mapping[str, str] | None = None,
        nofile: int | None = None,
        port: int = 0,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.stdout_path = directory / "stdout.log"
        self.stderr_path = directory / "stderr.log"
        limited = [sys.executable, "-c", _LIMITED, str(nofile)]
        command = [sys.executable, "-m", "broker"] if nofile is None else limited
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                [*command, "serve", "--port", str(port), *args],
                cwd=ROOT,
                env=clean_env(**(env or {})),
                stdout=out,
                stderr=err,
            )
        #: the port it listens on, from its `listening` line (0 until `started()`)
        self.port = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    # -- logs ----------------------------------------------------------------

    def logs(self) -> list[dict[str, Any]]:
        """Every complete line on stdout, each of which must be one JSON object."""
        text = self.stdout_path.read_text(errors="replace")
        lines = text.split("\n")[:-1]  # the last piece may be a line still being written
        events = []
        for line in lines:
            try:
                event = orjson.loads(line)
            except orjson.JSONDecodeError:
                raise AssertionError(f"stdout line is not JSON: {line!r}") from None
            assert isinstance(event, dict), line
            events.append(event)
        return events

    def find_log(self, **fields: Any) -> dict[str, Any] | None:
        """The first log line so far with these fields, or None."""
        for event in self.logs():
            if all(event.get(k) == v for k, v in fields.items()):
                return event
        return None

    def count_logs(self, **fields: Any) -> int:
        """How many log lines so far have these fields."""
        return sum(1 for event in self.logs() if all(event.get(k) == v for k, v in fields.items()))

    def _found(self, fields: dict[str, Any]) -> dict[str, Any] | None:
        """The line with these fields, None while there is none; fails once the process has exited without it."""
        event = self.find_log(**fields)
        if event is None and self.process.poll() is not None:
            raise AssertionError(f"no log line with {fields} (exit {self.process.poll()}): {self.output()}")
        return event

    async def wait_log(self, timeout: float = WAIT, **fields: Any) -> dict[str, Any]:
        """The first log line with these fields; fails if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while (event := self._found(fields)) is None:
            assert time.monotonic() < deadline, f"no log line with {fields} within {timeout} s: {self.output()}"
            await asyncio.sleep(POLL)  # noqa: sleep - bounded poll of another process's log file
        return event

    def wait_log_blocking(self, timeout: float = WAIT, **fields: Any) -> dict[str, Any]:
        """`wait_log` for callers outside an event loop (sync tests, module fixtures)."""
        deadline = time.monotonic() + timeout
        while (event := self._found(fields)) is None:
            assert time.monotonic() < deadline, f"no log line with {fields} within {timeout} s: {self.output()}"
            time.sleep(POLL)  # noqa: sleep - bounded poll of another process's log file
        return event

    def output(self) -> str:
        """The end of stdout and all of stderr, for failure messages."""
        return self.stdout_path.read_text(errors="replace")[-4000:] + self.stderr_path.read_text(errors="replace")

    # -- life ------------------------------------------------------------------

    async def started(self) -> BrokerProcess:
        """Wait for the `listening` line and take the port from it (`--port 0`)."""
        event = await self.wait_log(event="listening")
        self.port = int(event["port"])
        return self

    def wait_started(self) -> BrokerProcess:
        """`started()` for callers outside an event loop."""
        event = self.wait_log_blocking(event="listening")
        self.port = int(event["port"])
        return self

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def send(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL and reap it: what a crash (`kill -9`) looks like to everyone else."""
        if self.alive:
            self.process.kill()
        self.process.wait(timeout=WAIT)

    async def exited(self, timeout: float = WAIT) -> int:
        """Its exit code, once it has exited; fails after `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                return code
            await asyncio.sleep(POLL)  # noqa: sleep - bounded poll for another process to exit
        raise AssertionError(f"the daemon did not exit within {timeout} s: {self.output()}")

    def stop(self) -> None:
        """Teardown: whatever state the test left the process in, it goes (SIGKILL if still running)."""
        if self.alive:
            self.process.kill()
        self.process.wait(timeout=WAIT)

    # -- HTTP --------------------------------------------------------------------

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def fetch(self, path: str, **kwargs: Any) -> HTTPResponse:
        """A request to the daemon; the answer whatever its status (tests.support.wire's `Fetcher`)."""
        kwargs.setdefault("raise_error", False)
        kwargs.setdefault("request_timeout", 5.0)
        return await AsyncHTTPClient().fetch(self.url(path), **kwargs)
