"""What the browser tests share: Chromium under Playwright, a daemon process, a publisher.

The browser is Debian's `/usr/bin/chromium`, driven by Playwright's sync API
(Playwright's own browser download is never used). Where Chromium or
Playwright is missing the browser tests skip with a reason that says so;
with `REQUIRE_BROWSER=1` (CI, `.ci/run`) they fail instead.

The daemon is a real `python -m broker serve` process on real sockets, as a
user runs it, so the tests can also stop and restart it. Tests are plain
(synchronous) functions: the sync API cannot run inside a running asyncio
loop, and the daemon and the proxy run in their own process and thread.
"""

from __future__ import annotations

import http.server
import os
import shutil
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.support.daemon import BrokerProcess, settings_env
from tests.support.proxy import CuttingProxy

CHROMIUM = "/usr/bin/chromium"
#: As root, without a sandbox or GPU, and with nothing that calls out to
#: Google's services (this machine's closed network refuses them).
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Upper bound of one wait on the daemon or the page, in seconds.
WAIT = 20.0
#: ... in milliseconds, for Playwright.
WAIT_MS = int(WAIT * 1000)
BLANK_PAGE = b"<!doctype html><meta charset=utf-8><title>app</title>"


def launch_browser() -> Iterator[Any]:
    """A Chromium for one test module (a generator for a fixture); skips or fails without one."""
    required = os.environ.get("REQUIRE_BROWSER") == "1"
    missing = None
    if shutil.which(CHROMIUM) is None:
        missing = f"{CHROMIUM} not found (apt-get install -y chromium)"
    else:
        try:
            import playwright.sync_api
        except ImportError:
            missing = "the playwright package is not installed (pip install -e '.[test]')"
    if missing is not None:
        message = f"BROWSER TESTS NOT RUN: {missing}"
        if required:
            pytest.fail(f"{message}; REQUIRE_BROWSER=1 makes this a failure")
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def new_page(browser: Any, **context_options: Any) -> Any:
    """A page in a fresh context; page errors fail the test at `check_page`."""
    context = browser.new_context(**context_options)
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    page.errors = []  # type: ignore[attr-defined]
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    return page


class AppOrigin:
    """A page origin that is not the daemon's: a blank page on `http://localhost:PORT`.

    Scripts on it import the client from the daemon (127.0.0.1) and connect
    to it cross-origin, as an application's own pages do. It is a real
    server on loopback: Chromium keeps pages that no local address served
    (Playwright's page.route) from reaching loopback addresses at all.
    """

    def __init__(self) -> None:
        class Blank(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(BLANK_PAGE)))
                self.end_headers()
                self.wfile.write(BLANK_PAGE)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Blank)
        self.url = f"http://localhost:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, name="app-origin", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def app_page(browser: Any, origin: AppOrigin, **context_options: Any) -> Any:
    """A blank page on another origin, for scripts that import the client from the daemon."""
    page = new_page(browser, **context_options)
    page.goto(origin.url)
    return page


def check_page(page: Any) -> None:
    """No uncaught error happened in the page."""
    assert page.errors == [], page.errors


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon(BrokerProcess):
    """The shared daemon process (tests/support/daemon.py), started at once; settings as keywords.

    Its HTTP helpers block (the browser tests are synchronous).
    """

    def __init__(self, directory: Path, *, port: int = 0, **settings: Any) -> None:
        super().__init__(directory, env=settings_env(log_format="json", **settings), port=port)
        try:
            self.wait_started()
        except AssertionError:
            self.stop()
            raise

    def terminate(self) -> int:
        """SIGTERM (a graceful drain: clients get server_shutdown) and wait for the exit."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(WAIT)

    # -- HTTP ------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else orjson.dumps(body)
        headers = {"Content-Type": "application/json"} if data is not None else {}
        request = urllib.request.Request(self.url(path), data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=WAIT) as answer:
                return answer.status, orjson.loads(answer.read() or b"null")
        except urllib.error.HTTPError as error:
            with error:
                return error.code, orjson.loads(error.read() or b"null")

    def publish(self, session_id: str, events: list[dict[str, Any]]) -> list[int | None]:
        status, answer = self.request("POST", f"/api/sessions/{session_id}/events", events)
        assert status == 202, (status, answer)
        return list(answer["seq"])

    def session(self, session_id: str) -> dict[str, Any]:
        status, answer = self.request("GET", f"/api/sessions/{session_id}")
        assert status == 200, (status, answer)
        return dict(answer)


def wait_until(condition: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """Poll a condition of another process (the daemon's stats) until it holds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s (last: {value!r})")
        time.sleep(0.05)  # noqa: sleep - a bounded poll of another process (no event to wait on)


class Publisher(threading.Thread):
    """Publishes `total` numbered events (`n` = 1..total) in batches, from a thread."""

    def __init__(self, daemon: Daemon, session_id: str, total: int, batch: int = 50) -> None:
        super().__init__(name="publisher", daemon=True)
        self.daemon_process = daemon
        self.session_id = session_id
        self.total = total
        self.batch = batch
        self.error: BaseException | None = None
        self.seqs: list[int | None] = []

    def run(self) -> None:
        try:
            for start in range(1, self.total + 1, self.batch):
                stop = min(start + self.batch, self.total + 1)
                events = [{"type": "tick", "n": n, "pad": "x" * 120} for n in range(start, stop)]
                self.seqs += self.daemon_process.publish(self.session_id, events)
        except BaseException as exc:  # noqa: BLE001 - re-raised by finish() in the test's thread
            self.error = exc

    def finish(self) -> None:
        self.join(WAIT * 3)
        assert not self.is_alive(), "the publisher did not finish"
        if self.error is not None:
            raise self.error
        assert self.seqs == list(range(1, self.total + 1)), "the broker numbered the events unexpectedly"


class HoldingProxy(CuttingProxy):
    """A CuttingProxy that can also refuse new connections for a while (an outage)."""

    holding = False

    async def _serve(self, client_reader: Any, client_writer: Any) -> None:
        if self.holding:
            self.accepted += 1
            client_writer.transport.abort()  # the network path is down: no answer at all
            return
        await super()._serve(client_reader, client_writer)
