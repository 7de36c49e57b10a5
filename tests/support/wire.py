"""Speaking to the broker over the wire the way publishers, clients and operators do.

One set of helpers for every test that talks to the real application (the
pytest-tornasync `http_server_client`) or to a daemon process (anything with
an awaitable `fetch(path, **kwargs)`): publishing, reading JSON answers and
`/metrics`, opening WebSocket clients that are all closed at teardown (the
`connect` fixture in tests/conftest.py is a `Clients`), and reading a
client's session messages.

Tests of what an operator sees read it here too: `stats()` is
`GET /api/websocket/stats`, `session_info()` is `GET /api/sessions/{id}`,
`metrics()` is `/metrics` parsed into samples; none of them reads the
broker's own objects. `wait_until` polls one of those with a deadline (each
try is an awaited request, so no sleep is needed between tries).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import orjson
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import HTTPResponse

from broker.testing import WebSocketClient

__all__ = [
    "JSON",
    "Clients",
    "Fetcher",
    "Samples",
    "get_json",
    "json_of",
    "metrics",
    "next_message",
    "post",
    "post_events",
    "post_json",
    "publish",
    "refusals",
    "send_raw",
    "session_info",
    "session_messages",
    "stats",
    "wait_until",
]

JSON = "application/json"
#: Greeting type of each endpoint (docs/protocol.md section 3).
GREETINGS = {"ws": "connected", "research": "connection_established"}

T = TypeVar("T")


class Fetcher(Protocol):
    """What the helpers talk through: pytest-tornasync's `http_server_client`, or a daemon process."""

    def fetch(self, path: str, **kwargs: Any) -> Awaitable[HTTPResponse]: ...


# -- HTTP ---------------------------------------------------------------------------


async def post(
    http: Fetcher, path: str, body: Any, content_type: str = JSON, headers: dict[str, str] | None = None
) -> HTTPResponse:
    """POST `body` (bytes as they are, anything else as JSON); the answer whatever its status."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    sent = {"Content-Type": content_type, **(headers or {})}
    return await http.fetch(path, method="POST", headers=sent, body=data, raise_error=False)


async def post_events(
    http: Fetcher, session_id: str | None, events: Any, headers: dict[str, str] | None = None
) -> HTTPResponse:
    """POST events (an object or a list) as JSON; session_id=None posts to /api/events."""
    path = "/api/events" if session_id is None else f"/api/sessions/{session_id}/events"
    return await post(http, path, events, headers=headers)


async def publish(http: Fetcher, session_id: str | None, events: Any) -> list[int | None]:
    """Publish and return the seqs of the 202 answer, failing the test on any other status."""
    response = await post_events(http, session_id, events)
    assert response.code == 202, (response.code, response.body)
    seqs: list[int | None] = json_of(response)["seq"]
    return seqs


def json_of(response: HTTPResponse) -> Any:
    """The JSON body of an answer, which must say it is JSON."""
    assert response.headers.get("Content-Type", "").startswith(JSON), (response.code, response.headers)
    return orjson.loads(response.body)


async def post_json(http: Fetcher, path: str, body: Any) -> tuple[int, Any]:
    """POST `body` as JSON; (status, JSON answer)."""
    response = await post(http, path, body)
    return response.code, json_of(response)


async def get_json(http: Fetcher, path: str, **kwargs: Any) -> tuple[int, Any]:
    """GET `path`; (status, JSON answer)."""
    response = await http.fetch(path, raise_error=False, **kwargs)
    return response.code, json_of(response)


async def stats(http: Fetcher) -> dict[str, Any]:
    """`GET /api/websocket/stats`, which must answer 200."""
    code, body = await get_json(http, "/api/websocket/stats")
    assert code == 200, body
    answer: dict[str, Any] = body
    return answer


async def session_info(http: Fetcher, session_id: str) -> tuple[int, Any]:
    """`GET /api/sessions/{id}`: (200, the session) or (404, the error)."""
    return await get_json(http, f"/api/sessions/{session_id}")


async def send_raw(port: int, data: bytes, *, half_close: bool = False, timeout: float = 10.0) -> bytes:
    """Write bytes as they are (no client defaults added) and read all the server sends until it closes.

    `half_close` ends our side after the bytes, so a server waiting for
    more sees the end of the stream.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if half_close:
            writer.write_eof()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        await writer.wait_closed()


# -- /metrics -----------------------------------------------------------------------

Labels = tuple[tuple[str, str], ...]


class Samples:
    """One scrape of /metrics: every sample's value by its name and labels."""

    def __init__(self, text: str) -> None:
        self.values: dict[tuple[str, Labels], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def __contains__(self, name: object) -> bool:
        """True if some sample has this name (with any labels)."""
        return any(key[0] == name for key in self.values)

    def value(self, name: str, **labels: str) -> float:
        """The value of the sample with exactly these labels; the test fails if there is none."""
        key = (name, tuple(sorted(labels.items())))
        assert key in self.values, f"no sample {name}{labels or ''} in /metrics"
        return self.values[key]

    def by(self, name: str, label: str) -> dict[str, float]:
        """Samples of `name` by the value of their `label` (e.g. refusals by limit)."""
        return {dict(labels)[label]: value for (sample, labels), value in self.values.items() if sample == name}

    def refusals(self) -> dict[str, float]:
        """`broker_limit_refusals_total` by limit."""
        return self.by("broker_limit_refusals_total", "limit")


async def metrics(http: Fetcher, **kwargs: Any) -> Samples:
    """Scrape /metrics as Prometheus does: 200, its text format, never cached."""
    response = await http.fetch("/metrics", raise_error=False, **kwargs)
    assert response.code == 200, response.body
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4"), response.headers
    assert response.headers["Cache-Control"] == "no-store"
    return Samples(response.body.decode())


async def refusals(http: Fetcher) -> dict[str, float]:
    """The refusals an operator sees, by limit, leaving out the limits never hit."""
    return {limit: count for limit, count in (await metrics(http)).refusals().items() if count}


# -- waiting ------------------------------------------------------------------------


async def wait_until(
    check: Callable[[], Awaitable[T]], done: Callable[[T], bool] = bool, *, timeout: float = 5.0, what: str = ""
) -> T:
    """Await `check()` until `done(answer)`; return that answer, or fail once `timeout` seconds passed.

    `check` is an awaited request (an HTTP round trip through the loop the
    server runs on), so the server makes progress between tries: no sleep.
    """
    deadline = time.monotonic() + timeout
    while True:
        answer = await check()
        if done(answer):
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"{what or 'the broker'} never reached the expected state; last answer {answer!r}")


# -- WebSocket clients --------------------------------------------------------------


class Clients:
    """Opens WebSocket clients to the application under test; `close_all()` closes every one.

    `await connect(session_id)` opens `/ws?session_id=...` (`research=True`:
    `/ws/research/{id}`; `path=`: any path, e.g. a `ws_url` an answer gave,
    with `session_id` as a query parameter unless the path is a research one),
    reads the greeting and returns `(client, greeting)`. `connect.plain(...)`
    takes the same arguments and reads nothing: for handshakes that are
    refused or closed before a greeting, and tests that read the greeting
    themselves. Other keywords are query parameters (None leaves one out).
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.opened: list[WebSocketClient] = []

    async def plain(
        self,
        session_id: str | None = None,
        *,
        research: bool = False,
        path: str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 5.0,
        **params: Any,
    ) -> WebSocketClient:
        if path is None:
            path = f"/ws/research/{session_id}" if research else "/ws"
        if not path.startswith("/ws/research/"):
            params.setdefault("session_id", session_id)  # a research path names its session itself
        client = await WebSocketClient.connect(self.port, path, timeout=timeout, headers=headers, **params)
        self.opened.append(client)
        return client

    async def __call__(
        self, session_id: str | None = None, *, research: bool = False, path: str | None = None, **options: Any
    ) -> tuple[WebSocketClient, dict[str, Any]]:
        client = await self.plain(session_id, research=research, path=path, **options)
        endpoint = "research" if research or (path or "").startswith("/ws/research/") else "ws"
        expected: dict[str, Any] = {"type": GREETINGS[endpoint]}
        if session_id is not None:
            expected["session_id"] = session_id
        greeting = await client.expect(**expected)
        return client, greeting

    def close_all(self) -> None:
        for client in self.opened:
            client.close()
        self.opened.clear()


# -- reading a client's session -----------------------------------------------------


async def next_message(client: WebSocketClient, what: str = "") -> dict[str, Any]:
    """The next message that is not a keepalive; the test fails if the server closes first."""
    while True:
        message = await client.receive()
        assert message is not None, f"{what + ': ' if what else ''}closed {client.close_info()}"
        if message["type"] != "keepalive":
            return message


async def session_messages(client: WebSocketClient, count: int) -> list[dict[str, Any]]:
    """The next `count` session messages (each must carry a seq); keepalives are skipped."""
    messages: list[dict[str, Any]] = []
    while len(messages) < count:
        message = await next_message(client, f"after {len(messages)} of {count} session messages")
        assert "seq" in message, f"expected a session message, got {message!r}"
        messages.append(message)
    return messages
