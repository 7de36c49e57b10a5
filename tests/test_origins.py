"""Browser origins (docs/protocol.md section 6): the `allowed_origins` rule, at WebSocket handshakes and as CORS.

`handlers.origins.origin_allowed` is tested pure first; then over real
sockets: what a refused handshake leaves behind, and CORS on the HTTP API
(answers echo an allowed `Origin`, preflights are answered 204 or 403).
The handshake cases of every default and configured rule are in
tests/test_wire_ws.py (section 9); they are not repeated here.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from tornado.httpclient import HTTPClientError, HTTPResponse

from handlers.origins import origin_allowed
from tests.support import with_settings
from tests.support.wire import metrics, post, post_events, session_info, stats

HOST = "broker.example:8050"
LOCAL_UI = "http://localhost:3000"
EVIL = "https://evil.example"


# -- the rule, pure -------------------------------------------------------------------


@pytest.mark.parametrize("allowed", [(), ("https://app.example",), ("*",)], ids=["default", "list", "star"])
@pytest.mark.parametrize("origin", [None, ""], ids=["absent", "empty"])
def test_a_request_without_origin_is_not_a_browser_and_is_allowed(origin, allowed):
    assert origin_allowed(origin, HOST, allowed)


@pytest.mark.parametrize("allowed", [(), ("https://app.example",)], ids=["default", "list"])
@pytest.mark.parametrize(
    ("origin", "host"),
    [
        ("http://broker.example:8050", "broker.example:8050"),
        ("https://broker.example:8050", "broker.example:8050"),
        ("https://Broker.Example", "broker.example"),
        ("http://10.0.0.5:8050", "10.0.0.5:8050"),
        ("http://[::1]:8050", "[::1]:8050"),
    ],
)
def test_the_pages_own_origin_is_always_allowed(origin, host, allowed):
    assert origin_allowed(origin, host, allowed)


def test_same_origin_trusts_the_host_header():
    """So DNS rebinding is not stopped here: a page at evil.example:8050, re-pointed at 127.0.0.1,
    sends Host and Origin that agree. docs/security.md lists it as not defended."""
    assert origin_allowed("http://evil.example:8050", "evil.example:8050", ())


@pytest.mark.parametrize(
    "origin",
    [
        "http://localhost",
        "http://localhost:3000",
        "https://localhost:8443",
        "http://127.0.0.1:5173",
        "http://[::1]:8080",
        "HTTP://LOCALHOST:3000",
    ],
)
def test_by_default_local_origins_on_any_port_are_allowed(origin):
    assert origin_allowed(origin, HOST, ())


@pytest.mark.parametrize(
    "origin",
    [
        "http://evil.example",
        "https://evil.example:8050",  # the broker's port on another host
        "http://broker.example:9999",  # the broker's host on another port
        "http://localhost.evil.example",
        "http://127.0.0.1.evil.example",
        "http://localhost@evil.example",
        "http://localhost:3000@evil.example",
        "http://evil.example#@localhost",
        "http://127.0.0.2:3000",
        "http://0.0.0.0:8050",
        "http://[::2]:3000",
        "null",  # sandboxed iframes, file:// pages
        "file://",
    ],
)
def test_by_default_every_other_origin_is_refused(origin):
    assert not origin_allowed(origin, HOST, ())


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://app.example", True),
        ("https://APP.example", True),
        ("https://app.example/", True),
        ("http://broker.example:8050", True),  # same origin stays allowed
        ("http://app.example", False),  # another scheme
        ("https://app.example:8443", False),  # another port
        ("https://sub.app.example", False),
        ("http://localhost:3000", False),  # the list replaces the local default
        ("http://127.0.0.1:5173", False),
        (EVIL, False),
        ("null", False),
    ],
)
def test_a_configured_list_replaces_the_default(origin, allowed):
    assert origin_allowed(origin, HOST, ("https://app.example", "https://other.example/")) is allowed


@pytest.mark.parametrize("origin", [EVIL, "null", "http://localhost:3000", "chrome-extension://abc"])
def test_a_star_allows_every_origin(origin):
    assert origin_allowed(origin, HOST, ("*",))


# -- over the wire: settings per test -------------------------------------------------








async def fetch(http: Any, path: str, method: str = "GET", **kwargs: Any) -> HTTPResponse:
    return await http.fetch(path, method=method, raise_error=False, **kwargs)


def acao(response: HTTPResponse) -> str | None:
    return response.headers.get("Access-Control-Allow-Origin")


def listed(response: HTTPResponse, header: str) -> set[str]:
    """A comma-separated header as a set of lower-case items."""
    return {item.strip().lower() for item in response.headers.get(header, "").split(",") if item.strip()}


# -- WebSocket handshakes --------------------------------------------------------------


async def test_a_refused_origin_opens_nothing(connect, http_server_client):
    for research in (False, True):
        with pytest.raises(HTTPClientError) as refused:
            await connect.plain("ro1", research=research, headers={"Origin": EVIL})
        assert refused.value.code == 403
    assert (await session_info(http_server_client, "ro1"))[0] == 404, "no session was created"
    assert (await stats(http_server_client))["active_connections"] == 0
    samples = await metrics(http_server_client)
    assert samples.value("broker_connections") == 0
    assert samples.value("broker_sessions") == 0


async def test_an_ipv6_loopback_origin_is_accepted_at_the_handshake(connect):
    await connect("ro2", headers={"Origin": "http://[::1]:5173"})


@with_settings(allowed_origins=("https://app.example/",))
async def test_a_configured_origin_matches_ignoring_case_and_a_trailing_slash(connect):
    await connect("ro3", research=True, headers={"Origin": "https://App.Example"})


# -- CORS on the HTTP API ------------------------------------------------------------------

#: Every GET endpoint a browser dashboard might read.
READ_PATHS = ["/api/websocket/stats", "/ws/health", "/api/sessions/c1", "/healthz", "/readyz", "/metrics"]
#: Every state-changing endpoint, and the method a preflight asks for.
WRITE_PATHS = [
    ("/api/sessions/c1/events", "POST"),
    ("/api/events", "POST"),
    ("/api/research/start", "POST"),
    ("/api/broadcast", "POST"),
    ("/api/sessions/c1", "DELETE"),
]


async def test_without_an_origin_no_cors_headers_are_sent(http_server_client):
    response = await fetch(http_server_client, "/api/websocket/stats")
    assert response.code == 200
    assert acao(response) is None
    assert "origin" in listed(response, "Vary"), "a cache must not give one origin's answer to another"


async def publish_c1(http: Any, headers: dict[str, str] | None = None) -> None:
    response = await post_events(http, "c1", {"type": "session_started"}, headers=headers)
    assert response.code == 202, response.body


@pytest.mark.parametrize("path", READ_PATHS)
async def test_every_read_endpoint_answers_a_browser_and_echoes_an_allowed_origin(http_server_client, path):
    await publish_c1(http_server_client)
    response = await fetch(http_server_client, path, headers={"Origin": LOCAL_UI})
    assert response.code == 200
    assert acao(response) == LOCAL_UI
    assert "origin" in listed(response, "Vary")
    assert "x-request-id" in listed(response, "Access-Control-Expose-Headers")


async def test_a_foreign_origin_gets_the_answer_but_no_cors_headers(http_server_client):
    """The browser, not the server, withholds the answer from the page: it sees no Allow-Origin."""
    response = await fetch(http_server_client, "/api/websocket/stats", headers={"Origin": EVIL})
    assert response.code == 200
    assert acao(response) is None
    assert "origin" in listed(response, "Vary")


@pytest.mark.parametrize(("path", "method"), WRITE_PATHS)
async def test_a_preflight_from_an_allowed_origin_is_204(http_server_client, path, method):
    headers = {
        "Origin": LOCAL_UI,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    response = await fetch(http_server_client, path, "OPTIONS", headers=headers)
    assert response.code == 204
    assert acao(response) == LOCAL_UI
    assert method.lower() in listed(response, "Access-Control-Allow-Methods")
    assert {"authorization", "content-type"} <= listed(response, "Access-Control-Allow-Headers")
    assert int(response.headers["Access-Control-Max-Age"]) > 0


@with_settings(api_keys=("k1",))
async def test_a_preflight_needs_no_api_key(http_server_client):
    """Browsers never send Authorization on a preflight; the key comes with the real request."""
    headers = {"Origin": LOCAL_UI, "Access-Control-Request-Method": "POST"}
    response = await fetch(http_server_client, "/api/sessions/c1/events", "OPTIONS", headers=headers)
    assert response.code == 204
    assert acao(response) == LOCAL_UI
    await publish_c1(http_server_client, {"Origin": LOCAL_UI, "Authorization": "Bearer k1"})


@pytest.mark.parametrize(
    "origin",
    [
        pytest.param(EVIL, id="foreign"),
        pytest.param("null", id="null"),
        pytest.param(None, id="no-origin"),
    ],
)
async def test_a_preflight_from_any_other_origin_is_403(http_server_client, origin):
    headers = {"Access-Control-Request-Method": "POST"} | ({"Origin": origin} if origin else {})
    response = await fetch(http_server_client, "/api/sessions/c1/events", "OPTIONS", headers=headers)
    assert response.code == 403
    assert acao(response) is None
    assert isinstance(orjson.loads(response.body)["error"], str)


@with_settings(api_keys=("k1",))
async def test_an_allowed_origin_can_read_a_refusal(http_server_client):
    response = await post_events(http_server_client, "c1", {"type": "session_started"}, headers={"Origin": LOCAL_UI})
    assert response.code == 401
    assert acao(response) == LOCAL_UI


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
async def test_a_simple_cross_site_post_publishes_nothing(http_server_client, content_type):
    """What a foreign page can send without a preflight (a form, `fetch` with mode no-cors) is refused 415."""
    body = {"type": "session_started"}
    response = await post(http_server_client, "/api/sessions/c1/events", body, content_type, {"Origin": EVIL})
    assert response.code == 415
    assert (await fetch(http_server_client, "/api/sessions/c1")).code == 404


@with_settings(allowed_origins=("https://app.example",))
async def test_cors_follows_a_configured_list(http_server_client):
    listed_origin = await fetch(http_server_client, "/api/websocket/stats", headers={"Origin": "https://app.example"})
    assert acao(listed_origin) == "https://app.example"
    local = await fetch(http_server_client, "/api/websocket/stats", headers={"Origin": LOCAL_UI})
    assert acao(local) is None, "a configured list replaces the localhost default"
    headers = {"Origin": LOCAL_UI, "Access-Control-Request-Method": "POST"}
    assert (await fetch(http_server_client, "/api/events", "OPTIONS", headers=headers)).code == 403


@with_settings(allowed_origins=("*",))
async def test_cors_with_a_star_echoes_any_origin(http_server_client):
    response = await fetch(http_server_client, "/api/websocket/stats", headers={"Origin": EVIL})
    assert acao(response) == EVIL
