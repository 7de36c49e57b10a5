"""Server-Sent Events in headless Chromium: a plain EventSource, and actor-broker.js over SSE.

A plain `EventSource` on `/sse/research/{id}` is what a UI developer writes
where WebSockets do not pass: its own reconnect sends `Last-Event-ID`, and
the broker resumes from it (no duplicate, nothing missing). The JS client's
`transport: "auto"` is shown behind a proxy that refuses WebSocket upgrades,
as some corporate proxies do: it falls back to SSE and keeps its guarantees
across a cut connection. Both run on another origin (CORS by allowed_origins).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.harness import WAIT_MS, AppOrigin, Daemon, app_page, check_page
from tests.support.proxy import CuttingProxy


class NoWebSocketProxy(CuttingProxy):
    """Forwards plain HTTP (SSE included) and drops every WebSocket handshake unanswered."""

    #: WebSocket handshakes refused so far
    refused = 0

    async def admit(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> bytes | None:
        try:
            head = await client_reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return None
        if b"upgrade: websocket" in head.lower():
            self.refused += 1
            return None
        return head


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    process = Daemon(tmp_path_factory.mktemp("daemon"))
    yield process
    process.stop()


def ticks(start: int, stop: int) -> list[dict[str, Any]]:
    return [{"type": "tick", "n": n} for n in range(start, stop)]


def test_a_plain_eventsource_follows_a_session_and_resumes_with_last_event_id(
    browser: Any, origin: AppOrigin, daemon: Daemon
) -> None:
    page = app_page(browser, origin)
    with CuttingProxy(daemon.port) as proxy:
        # What a UI developer writes, nothing more.
        page.evaluate(
            """(url) => new Promise((resolve) => {
              window.received = [];
              const source = new EventSource(url);
              source.onmessage = (event) => {
                window.received.push({ id: event.lastEventId, data: JSON.parse(event.data) });
                if (window.received.length === 1) resolve();
              };
              window.source = source;
            })""",
            f"http://127.0.0.1:{proxy.port}/sse/research/plain-sse",
        )
        daemon.publish("plain-sse", ticks(1, 4))
        page.wait_for_function("() => window.received.length === 4")
        assert proxy.cut() == 1
        daemon.publish("plain-sse", ticks(4, 7))  # while the browser waits to reconnect
        page.wait_for_function("() => window.received.filter(m => m.data.type === 'tick').length >= 6")
        received = page.evaluate("window.received")
        page.evaluate("window.source.close()")
    types = [m["data"]["type"] for m in received]
    assert types == ["connection_established", "tick", "tick", "tick", "connection_established", "tick", "tick", "tick"]
    session = [m for m in received if m["data"]["type"] == "tick"]
    assert [m["data"]["seq"] for m in session] == [1, 2, 3, 4, 5, 6]  # exactly once across the reconnect
    epoch = received[0]["data"]["epoch"]
    assert [m["id"] for m in session] == [f"{epoch}/{seq}" for seq in range(1, 7)]
    check_page(page)


def test_the_client_falls_back_to_sse_where_websockets_do_not_pass(
    browser: Any, origin: AppOrigin, daemon: Daemon
) -> None:
    page = app_page(browser, origin)
    with NoWebSocketProxy(daemon.port) as proxy:
        outcome = page.evaluate(
            """async ({ module, url }) => {
              const { connect } = await import(module);
              window.seen = [];
              const backoff = { initialMs: 50, maxMs: 200 };
              const client = connect(url, { session: "fallback", transport: "auto", backoff });
              window.client = client;
              (async () => { for await (const m of client) window.seen.push(m.seq ?? m.type); })();
              await new Promise((resolve) => client.on("open", resolve));
              let refusal = null;
              try { client.query("hello"); } catch (err) { refusal = err.kind; }
              return { transport: client.transport, refusal };
            }""",
            {"module": daemon.url("/client/actor-broker.js"), "url": f"http://127.0.0.1:{proxy.port}"},
        )
        assert outcome == {"transport": "sse", "refusal": "unsupported"}  # queries need a WebSocket
        assert proxy.refused >= 2
        daemon.publish("fallback", ticks(1, 101))
        page.wait_for_function("() => window.seen.length >= 100")
        assert proxy.cut() == 1
        daemon.publish("fallback", ticks(101, 201))
        page.wait_for_function("() => window.seen.length >= 200", timeout=WAIT_MS)
        seen = page.evaluate("window.seen")
        connections = daemon.session("fallback")["connections"]
    assert seen == list(range(1, 201))
    assert [c["transport"] for c in connections] == ["sse"]
    check_page(page)
    with contextlib.suppress(Exception):
        page.evaluate("window.client.close()")


def test_a_refused_sse_stream_is_reported_with_its_code(browser: Any, origin: AppOrigin, tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, jwt_secret="sse-secret-" + "y" * 24)
    try:
        page = app_page(browser, origin)
        error = page.evaluate(
            """async (module) => {
              const { connect } = await import(module);
              const client = connect(module, { session: "locked", transport: "sse" });
              try { for await (const _ of client) {} } catch (err) { return { code: err.code, message: err.message }; }
              return null;
            }""",
            daemon.url("/client/actor-broker.js"),
        )
        assert error is not None and error["code"] == 4001
        assert "token" in error["message"]
        check_page(page)
    finally:
        daemon.stop()
