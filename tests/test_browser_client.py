"""actor-broker.js in headless Chromium, against a daemon process, through real faults.

The page runs on another origin (tests/browser/harness.py AppOrigin) and
imports the client from the daemon's `/client/actor-broker.js`, as an
application would. Faults are real: `CuttingProxy` drops the TCP connection
without a close frame every few hundred messages while a publisher sends
thousands; `HoldingProxy` keeps the path down while the session's history
overflows. The seed's own plain WebSocket chat code runs unchanged next to it.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from tests.browser.harness import (
    WAIT_MS,
    AppOrigin,
    Daemon,
    HoldingProxy,
    Publisher,
    app_page,
    check_page,
    wait_until,
)
from tests.support.proxy import CuttingProxy

#: Starts a client inside the page and records what it delivers: `window.seen`
#: gets [seq, n] of every session message in delivery order, `window.gaps` every
#: gap, `window.opens` counts greetings, `window.recovered` the recovery reports,
#: `window.refreshed` the exp of each refreshed token (`nextToken`: what getToken gives).
START_CLIENT = """
async ({ module, url, options, nextToken }) => {
  const { connect } = await import(module);
  Object.assign(window, { seen: [], gaps: [], opens: 0, recovered: [], closes: [], refreshed: [] });
  if (nextToken) options.getToken = async () => nextToken;
  const client = connect(url, options);
  client.on("refreshed", (m) => window.refreshed.push(m.exp));
  window.client = client;
  client.on("open", () => { window.opens += 1; });
  client.on("recovered", (r) => window.recovered.push(r));
  client.on("closed", (c) => window.closes.push(c));
  (async () => {
    for await (const msg of client) {
      if (msg.type === "gap") window.gaps.push({ from_seq: msg.from_seq, to_seq: msg.to_seq });
      else window.seen.push([msg.seq, msg.n ?? null]);
    }
  })();
  await new Promise((resolve) => client.on("open", resolve));
}
"""

#: Fast reconnects keep the test short; the rules are the same at any pace.
FAST = {"initialMs": 50, "maxMs": 300}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the module, with history enough to cover any outage here."""
    process = Daemon(tmp_path_factory.mktemp("daemon"), buffer_size=10_000, max_queue_bytes=64 * 1024 * 1024)
    yield process
    process.stop()


def start_client(page: Any, daemon: Daemon, url: str, next_token: str | None = None, **options: Any) -> None:
    module = daemon.url("/client/actor-broker.js")
    page.evaluate(START_CLIENT, {"module": module, "url": url, "options": options, "nextToken": next_token})


def test_every_message_arrives_once_and_in_order_across_cut_connections(
    browser: Any, origin: AppOrigin, daemon: Daemon
) -> None:
    total = 4000
    page = app_page(browser, origin)
    # A tick frame is about 330 bytes: a cut every 200 or so messages.
    with CuttingProxy(daemon.port, cut_every=64_000) as proxy:
        start_client(page, daemon, f"ws://127.0.0.1:{proxy.port}", session="once", backoff=FAST)
        publisher = Publisher(daemon, "once", total)
        publisher.start()
        page.wait_for_function("total => window.seen.length >= total", arg=total, timeout=WAIT_MS * 3)
        publisher.finish()
        seen = page.evaluate("window.seen")
        cuts = proxy.cuts
        opens = page.evaluate("window.opens")
        # The acks (batched) reach the broker: the connection's cursor is the last seq.
        connection = wait_until(
            lambda: next((c for c in daemon.session("once")["connections"] if c["acked_seq"] == total), None),
            "the client's ack of the last seq",
        )
    assert [seq for seq, _ in seen] == list(range(1, total + 1)), "not every seq once, in order"
    assert all(seq == n for seq, n in seen), "a message's payload does not match its seq"
    assert page.evaluate("window.gaps") == []
    assert cuts >= 10, f"the proxy cut only {cuts} connections; the test proves little"
    assert opens >= cuts  # every cut was followed by a resumed connection
    assert connection["transport"] == "websocket"
    check_page(page)
    page.evaluate("window.client.close()")


def test_an_outage_longer_than_the_history_is_reported_as_a_gap(
    browser: Any, origin: AppOrigin, tmp_path: Path
) -> None:
    daemon = Daemon(tmp_path, buffer_size=20)
    try:
        page = app_page(browser, origin)
        with HoldingProxy(daemon.port) as proxy:
            start_client(page, daemon, f"ws://127.0.0.1:{proxy.port}/ws?session_id=short", backoff=FAST)
            daemon.publish("short", [{"type": "tick", "n": n} for n in range(1, 6)])
            page.wait_for_function("window.seen.length === 5")
            proxy.holding = True
            assert proxy.cut() == 1
            # Seq 6..55 while the client cannot connect; history keeps 36..55.
            daemon.publish("short", [{"type": "tick", "n": n} for n in range(6, 56)])
            page.wait_for_function("window.client.state === 'reconnecting' && window.client.attempt >= 2")
            proxy.holding = False
            page.wait_for_function("window.seen.length === 25")
        assert page.evaluate("window.gaps") == [{"from_seq": 6, "to_seq": 35}]
        assert [seq for seq, _ in page.evaluate("window.seen")] == [*range(1, 6), *range(36, 56)]
        page.wait_for_function("window.recovered.length === 1")
        assert page.evaluate("window.recovered") == [{"count": 20, "from_seq": 6, "to_seq": 55}]
        check_page(page)
    finally:
        daemon.stop()


def test_query_streams_chunks_and_subscribe_changes_the_filter(browser: Any, origin: AppOrigin, daemon: Daemon) -> None:
    page = app_page(browser, origin)
    start_client(page, daemon, daemon.url("/"), session="ask", endpoint="chat", user="reader")
    answer = page.evaluate(
        """async () => {
          const stream = window.client.query("What is back-pressure?");
          const chunks = [];
          for await (const chunk of stream) chunks.push(chunk.content);
          const complete = await stream.done;
          let busy = null;
          const first = window.client.query("one");
          const second = window.client.query("two");
          try { for await (const _ of second) {} } catch (err) { busy = err.code; }
          for await (const _ of first) {}
          const narrowed = await window.client.unsubscribe(["chunk"]);
          const widened = await window.client.subscribe(["all"]);
          return { chunks, complete, busy, narrowed, widened };
        }"""
    )
    assert len(answer["chunks"]) == 9
    assert answer["complete"]["full_response"] == "".join(answer["chunks"])
    assert "What is back-pressure?" in answer["complete"]["full_response"]
    assert answer["busy"] == "busy"  # one query at a time per session: the second is refused
    assert answer["narrowed"] == ["*", "-chunk"]
    assert answer["widened"] == ["*"]
    seqs = [seq for seq, _ in page.evaluate("window.seen")]
    assert seqs == list(range(1, len(seqs) + 1))  # the query's messages are session messages too
    check_page(page)


def test_the_seeds_plain_websocket_chat_client_works_unchanged(browser: Any, origin: AppOrigin, daemon: Daemon) -> None:
    page = app_page(browser, origin)
    # The seed's chat example as a UI developer writes it: no library at all.
    received = page.evaluate(
        """(port) => new Promise((resolve, reject) => {
          const sessionId = "seed-chat";
          const ws = new WebSocket(`ws://127.0.0.1:${port}/ws?session_id=${sessionId}&user_id=user1`);
          const messages = [];
          ws.onopen = () => {
            ws.send(JSON.stringify({ type: "query", query: "How do actors handle back-pressure?",
                                     session_id: sessionId, include_context: true }));
          };
          ws.onmessage = (event) => {
            const data = JSON.parse(event.data);
            messages.push(data);
            if (data.type === "complete") { ws.close(); resolve(messages); }
            if (data.type === "error") reject(new Error(data.error));
          };
          ws.onerror = () => reject(new Error("websocket error"));
        })""",
        daemon.port,
    )
    types = [m["type"] for m in received]
    assert types == ["connected", "query_start", *["chunk"] * 9, "complete"]
    chunks = [m for m in received if m["type"] == "chunk"]
    assert [c["chunk_number"] for c in chunks] == list(range(1, 10))
    assert received[-1]["full_response"] == "".join(c["content"] for c in chunks)
    assert received[-1]["total_chunks"] == 9
    check_page(page)


def test_tokens_a_missing_one_is_reported_and_not_retried_a_fresh_one_is_sent_before_exp(
    browser: Any, origin: AppOrigin, tmp_path: Path
) -> None:
    secret = "s" * 32
    daemon = Daemon(tmp_path, jwt_secret=secret)
    try:
        page = app_page(browser, origin)
        closed = page.evaluate(
            """async (module) => {
              const { connect } = await import(module);
              const client = connect(module, { session: "locked" });
              const states = [];
              client.on("state", (s) => states.push(s.state));
              let error = null;
              try { for await (const _ of client) {} } catch (err) { error = { code: err.code, message: err.message }; }
              return { error, states, state: client.state };
            }""",
            daemon.url("/client/actor-broker.js"),
        )
        assert closed["error"]["code"] == 4001
        assert "token is required" in closed["error"]["message"]
        assert closed["state"] == "failed"
        assert "reconnecting" not in closed["states"]

        # With getToken, the client replaces its token before exp (refresh) and
        # the connection outlives the first token (which would close it 4001).
        now = int(time.time())
        tokens = [
            jwt.encode({"sub": "viewer", "sessions": ["locked"], "exp": now + exp}, secret, algorithm="HS256")
            for exp in (3, 3600)
        ]
        start_client(
            page, daemon, daemon.url("/"), session="locked", token=tokens[0], next_token=tokens[1], refreshMarginMs=2000
        )
        page.wait_for_function("() => window.refreshed.length === 1")
        assert page.evaluate("window.refreshed") == [now + 3600]
        page.wait_for_function(f"() => Date.now() > {(now + 4) * 1000}")  # past the first token's exp
        daemon.publish("locked", [{"type": "tick", "n": 1}])
        page.wait_for_function("() => window.seen.length === 1")
        assert page.evaluate("[window.opens, window.closes.length, window.client.state]") == [1, 0, "connected"]
        check_page(page)
    finally:
        daemon.stop()


def test_the_client_module_is_served_with_caching_headers(daemon: Daemon) -> None:
    with urllib.request.urlopen(daemon.url("/client/actor-broker.js")) as answer:
        etag = answer.headers["ETag"]
        assert answer.headers["Content-Type"] == "text/javascript; charset=utf-8"
        assert answer.headers["Cache-Control"] == "no-cache"
        assert b"export function connect" in answer.read()
    again = urllib.request.Request(daemon.url("/client/actor-broker.js"), headers={"If-None-Match": etag})
    with pytest.raises(urllib.error.HTTPError) as not_modified:
        urllib.request.urlopen(again)
    with not_modified.value as answer:
        assert answer.code == 304
        assert answer.headers["ETag"] == etag
        assert answer.read() == b""
