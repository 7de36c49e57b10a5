"""The access log: one structured line per request, at the level its status calls for."""

from __future__ import annotations

import io
import logging

import orjson
import pytest

from broker.logs import configure_logging, set_level


@pytest.fixture
def log_lines():
    """Route logging to a buffer of JSON lines for the test; restore the root handlers after."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    buffer = io.StringIO()
    configure_logging("warning", "json", stream=buffer)

    def lines() -> list[dict]:
        return [orjson.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]

    yield lines
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


def access_lines(lines) -> list[dict]:
    return [line for line in lines() if line.get("event") == "http_request"]


async def test_access_lines_follow_the_level_and_a_level_change(http_server_client, log_lines):
    await http_server_client.fetch("/healthz")
    missing = await http_server_client.fetch("/nope", raise_error=False)
    assert missing.code == 404
    logged = access_lines(log_lines)
    assert [(line["status"], line["level"], line["path"]) for line in logged] == [(404, "warning", "/nope")]

    set_level("info")  # what a SIGHUP with log_level = "info" does
    await http_server_client.fetch("/healthz", headers={"X-Request-ID": "req-7"})
    logged = access_lines(log_lines)
    assert (logged[-1]["status"], logged[-1]["level"], logged[-1]["request_id"]) == (200, "info", "req-7")

    set_level("error")
    await http_server_client.fetch("/nope", raise_error=False)
    assert len(access_lines(log_lines)) == len(logged), "a 404 is below error"


async def test_access_lines_name_the_session_a_request_names(http_server_client, log_lines, connect):
    from tests.support.wire import publish

    set_level("info")
    await publish(http_server_client, "alpha", {"type": "task_started", "task_id": "t1"})
    await publish(http_server_client, None, {"type": "task_started", "task_id": "t1", "session_id": "beta"})
    two_sessions = [{"type": "x.y", "session_id": "beta"}, {"type": "x.y", "session_id": "gamma"}]
    await publish(http_server_client, None, two_sessions)
    await http_server_client.fetch("/api/sessions/alpha")
    await connect("delta")
    await connect("epsilon", research=True)
    await http_server_client.fetch("/healthz")
    named = [(line["path"], line.get("session_id")) for line in access_lines(log_lines)]
    assert named == [
        ("/api/sessions/alpha/events", "alpha"),
        ("/api/events", "beta"),
        ("/api/events", None),  # two sessions: none is "the" session
        ("/api/sessions/alpha", "alpha"),
        ("/ws", "delta"),
        ("/ws/research/epsilon", "epsilon"),
        ("/healthz", None),
    ]
