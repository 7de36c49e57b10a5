"""Research runs: `POST /api/research/start` over the wire, and the simulated run at actor level.

Wire tests run the real application on a real port; the research upstream,
where one is configured, is a real Tornado server on the same loop. Actor
tests use the harness and manual clock (`World` from tests/test_session.py),
so a whole simulated run takes no wall time.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import orjson
import pytest
import tornado.web
from pykka import ActorRegistry
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port

from actors.messages import CloseSession
from broker.config import Settings
from broker.research import TASKS, SimulatedResearch, simulated_run
from tests.support.wire import json_of, post, session_info, session_messages, stats
from tests.test_session import World

QUERY = "How do actor brokers keep order?"
#: The presets as docs/protocol.md section 3.4 writes them (None: everything).
PRESETS: dict[str, frozenset[str] | None] = {
    "all": None,
    "essential": frozenset(
        {
            "session_started",
            "session_completed",
            "session_cancelled",
            "task_completed",
            "task_failed",
            "complete",
            "error",
        }
    ),
    "planning": frozenset({"session_started", "session_completed", "plan_generated", "report_generated"}),
}


# -- a real research upstream -------------------------------------------------------------


class ResearchUpstream:
    def __init__(self) -> None:
        self.port = 0
        self.requests: list[tuple[str, str | None, Any]] = []
        self.received = asyncio.Event()
        self.release = asyncio.Event()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


class _StallingHandler(tornado.web.RequestHandler):
    """Takes the start and answers only when the test releases it."""

    def initialize(self, upstream: ResearchUpstream) -> None:
        self.upstream = upstream

    async def post(self) -> None:
        self.upstream.received.set()
        await self.upstream.release.wait()
        self.set_status(202)
        self.finish({"ok": True})


class _StartHandler(tornado.web.RequestHandler):
    def initialize(self, upstream: ResearchUpstream, status: int) -> None:
        self.upstream = upstream
        self.status = status

    def post(self) -> None:
        self.upstream.requests.append(
            (self.request.path, self.request.headers.get("Content-Type"), orjson.loads(self.request.body))
        )
        self.upstream.received.set()
        self.set_status(self.status)
        self.finish({"ok": self.status < 300})


@pytest.fixture
def upstream(io_loop):
    up = ResearchUpstream()
    sock, up.port = bind_unused_port()
    server = HTTPServer(
        tornado.web.Application(
            [
                (r"/start", _StartHandler, {"upstream": up, "status": 202}),
                (r"/fail", _StartHandler, {"upstream": up, "status": 500}),
                (r"/stall", _StallingHandler, {"upstream": up}),
            ]
        )
    )
    server.add_socket(sock)
    yield up
    up.release.set()
    server.stop()
    io_loop.run_sync(server.close_all_connections, timeout=5)


def refused_url() -> str:
    sock, port = bind_unused_port()
    sock.close()
    return f"http://127.0.0.1:{port}/start"


@pytest.fixture
def settings(request, upstream) -> Settings:
    """No research upstream (the simulated run), or `research_upstream_url` = the upstream's `param` path."""
    path = getattr(request, "param", None)
    if path is None:
        return Settings()
    return Settings(research_upstream_url=refused_url() if path == "refused" else upstream.url(path))


def upstream_at(*paths: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("settings", list(paths), ids=list(paths), indirect=True)


async def start(http: Any, body: Any, *, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    response = await post(http, "/api/research/start", body, headers=headers)
    return response.code, json_of(response)


def simulations() -> list[Any]:
    """Running SimulatedResearch actors (each test starts with none)."""
    return [r for r in ActorRegistry.get_by_class(SimulatedResearch) if r.is_alive()]


# -- 1. POST /api/research/start over the wire -------------------------------------------------


async def test_start_answers_201_with_an_absolute_ws_url_and_the_run_begins(http_server_client, port, connect):
    code, body = await start(http_server_client, {"query": QUERY, "user_id": "u1"})
    assert code == 201, body
    session_id = body["session_id"]
    assert set(body) == {"session_id", "ws_url", "status"}
    assert body["status"] == "started"
    assert body["ws_url"] == f"ws://127.0.0.1:{port}/ws/research/{session_id}"
    code, info = await session_info(http_server_client, session_id)
    assert (code, info["session_id"]) == (200, session_id)
    # a client that follows ws_url gets the history from session_started on
    client, hello = await connect(session_id, path=body["ws_url"].split(str(port), 1)[1])
    assert hello["session_id"] == session_id and hello["last_seq"] >= 1
    first = await client.expect(type="session_started", seq=1, session_id=session_id)
    assert first["query"] == QUERY and first["user_id"] == "u1"
    assert len(simulations()) == 1
    # ... and then the simulated run, in real time (its first step comes 0.6 s in)
    (plan,) = await session_messages(client, 1)
    assert plan["type"] == "plan_generated" and plan["seq"] == 2 and plan["plan"]["query"] == QUERY


async def test_ws_url_uses_the_host_the_request_named(http_server_client):
    code, body = await start(
        http_server_client, {"query": QUERY, "session_id": "named-1"}, headers={"Host": "broker.example:9000"}
    )
    assert code == 201, body
    assert body["session_id"] == "named-1"
    assert body["ws_url"] == "ws://broker.example:9000/ws/research/named-1"


async def test_start_with_an_existing_session_id_is_409(http_server_client, connect):
    code, _ = await start(http_server_client, {"query": QUERY, "user_id": "u1", "session_id": "mine"})
    assert code == 201
    code, body = await start(http_server_client, {"query": "again", "user_id": "u1", "session_id": "mine"})
    assert code == 409 and isinstance(body["error"], str)
    # a session that exists because a client connected to it counts too
    await connect("watched", research=True)
    code, body = await start(http_server_client, {"query": QUERY, "session_id": "watched"})
    assert code == 409, body
    assert len(simulations()) == 1  # the first start's run only


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"user_id": "u1"}, ["query"]),
        ({"query": "   ", "user_id": "u1"}, ["query"]),
        ({"query": ["q"]}, ["query"]),
        ({"query": QUERY, "user_id": 5}, ["user_id"]),
        ({"query": QUERY, "user_id": ""}, ["user_id"]),
        ({"query": QUERY, "session_id": "has spaces"}, ["session_id"]),
        ({"query": QUERY, "session_id": 7}, ["session_id"]),
        ({"query": 1, "user_id": True, "session_id": ""}, ["query", "user_id", "session_id"]),
    ],
    ids=[
        "missing-query",
        "blank-query",
        "query-not-string",
        "user-id-number",
        "user-id-empty",
        "bad-session-id",
        "session-id-number",
        "all-three",
    ],
)
async def test_bad_start_bodies_are_422_with_details(http_server_client, body, fields):
    code, answer = await start(http_server_client, body)
    assert code == 422, answer
    assert isinstance(answer["error"], str)
    assert [d["field"] for d in answer["details"]] == fields
    assert all(d["index"] == 0 and isinstance(d["error"], str) and d["error"] for d in answer["details"])
    assert (await stats(http_server_client))["active_sessions"] == 0 and simulations() == []


@pytest.mark.parametrize(
    ("raw", "content_type", "status"),
    [
        (b"this is not json", "application/json", 400),
        (b'{"query": "q"', "application/json", 400),
        (b'[{"query": "q"}]', "application/json", 400),
        (b'"just a string"', "application/json", 400),
        (b"", "application/json", 400),
        (b'{"query": "q"}', "text/plain", 415),
    ],
    ids=["not-json", "truncated", "array", "string", "empty", "text-plain"],
)
async def test_unreadable_start_bodies(http_server_client, raw, content_type, status):
    code, answer = await start(http_server_client, raw, headers={"Content-Type": content_type})
    assert code == status, answer
    assert isinstance(answer["error"], str) and answer["error"]
    assert (await stats(http_server_client))["active_sessions"] == 0 and simulations() == []


@upstream_at("/start")
async def test_a_research_upstream_receives_the_start_and_nothing_is_simulated(
    http_server_client, connect, upstream, broker
):
    code, body = await start(http_server_client, {"query": QUERY, "user_id": "u1"})
    assert code == 201, body
    session_id = body["session_id"]
    await asyncio.wait_for(upstream.received.wait(), 5)
    assert upstream.requests == [
        ("/start", "application/json", {"session_id": session_id, "query": QUERY, "user_id": "u1"})
    ]
    assert simulations() == []
    client, hello = await connect(session_id, research=True)
    assert hello["last_seq"] == 1
    (first,) = await session_messages(client, 1)
    assert first["type"] == "session_started" and first["query"] == QUERY
    # the research service publishes from here on; what it sends comes next
    await broker.publish_events({"type": "plan_generated", "session_id": session_id, "plan": ["from upstream"]})
    (plan,) = await session_messages(client, 1)
    assert plan["seq"] == 2 and plan["plan"] == ["from upstream"]


@upstream_at("/stall")
async def test_a_slow_research_upstream_does_not_hold_the_answer(http_server_client, connect, upstream, broker):
    code, body = await start(http_server_client, {"query": QUERY, "user_id": "u1"})
    assert code == 201, body
    await asyncio.wait_for(upstream.received.wait(), 5)
    assert not upstream.release.is_set(), "answered while the upstream still holds the start"
    client, hello = await connect(body["session_id"], research=True)
    assert hello["last_seq"] == 1
    upstream.release.set()
    for _ in range(500):  # until the forward has its answer: one round trip per try, no sleeps
        if not broker._background:
            break
        await http_server_client.fetch("/healthz")
    assert not broker._background
    await broker.publish_events({"type": "test.marker", "session_id": body["session_id"]})
    (started, marker) = await session_messages(client, 2)
    assert started["type"] == "session_started"
    assert marker["type"] == "test.marker", "the upstream's answer added no error event"


@upstream_at("/fail", "refused")
async def test_a_failing_research_upstream_yields_an_error_event(http_server_client, connect, upstream):
    code, body = await start(http_server_client, {"query": QUERY, "user_id": "u1"})
    assert code == 201, body
    client, _ = await connect(body["session_id"], research=True)
    started, error = await session_messages(client, 2)
    assert started["type"] == "session_started" and started["seq"] == 1
    assert error["type"] == "error" and error["seq"] == 2
    assert isinstance(error["error"], str) and error["error"]
    assert simulations() == []


# -- 2. the simulated run at actor level (harness, manual clock) ----------------------------------


@pytest.fixture
def world(harness):
    return World(harness)


def run_length(query: str = QUERY) -> float:
    return sum(delay for delay, _ in simulated_run(query))


def begin(world: World, session_id: str = "r", query: str = QUERY) -> None:
    """What `Broker.start_research` does without an upstream: session_started, then the run."""
    world.publish(session_id, {"type": "session_started", "query": query, "user_id": "u1"})
    SimulatedResearch.start(world.broker._publisher_for(session_id), session_id, query)


def running_simulations(world: World) -> list[Any]:
    return [r for r in world.h.actors() if r.actor_class is SimulatedResearch and r.is_alive()]


@pytest.mark.parametrize("min_delta", [5, 50], ids=["default-min-delta", "min-delta-50"])
def test_simulated_run_plays_plan_tasks_report_completion_in_order(harness, min_delta):
    world = World(harness, min_delta=min_delta)
    _, client = world.connect("r", replay="none")
    begin(world)
    world.h.advance(0.55)
    assert client.types() == ["connected", "session_started"]  # paced by the actor clock
    world.h.advance(0.1)
    assert client.types()[-1] == "plan_generated"
    world.h.advance(run_length())
    messages = [m for m in client.messages if "seq" in m]
    per_task = ["task_started"] + ["task_progress"] * 11 + ["task_completed"]
    assert [m["type"] for m in messages] == [
        "session_started",
        "plan_generated",
        *per_task * 3,
        "report_generated",
        "session_completed",
    ]
    assert [m["seq"] for m in messages] == list(range(1, len(messages) + 1))
    plan = messages[1]["plan"]
    assert plan["query"] == QUERY and [s["task_id"] for s in plan["steps"]] == ["t1", "t2", "t3"]
    task_messages = messages[2:-2]
    for index, (task_id, _) in enumerate(TASKS):
        mine = task_messages[index * len(per_task) : (index + 1) * len(per_task)]
        assert {m["task_id"] for m in mine} == {task_id}
        # throttling applies, and lets every step through: each carries a new current_action
        assert [m["progress"] for m in mine[1:-1]] == list(range(0, 101, 10))
    assert messages[-2]["report"]["title"].startswith("Research: ")
    assert messages[-1]["status"] == "completed"
    assert world.stats.throttled_events == 0
    assert running_simulations(world) == []  # the run stopped itself
    world.h.advance(60)
    assert [m for m in client.messages if "seq" in m] == messages  # nothing after the end


def test_three_filters_side_by_side_get_exactly_what_their_filters_admit(world):
    clients = {name: world.connect("r", events=name, replay="none")[1] for name in PRESETS}
    begin(world)
    world.h.advance(run_length() + 1)
    published = [{"type": "session_started"}] + [event for _, event in simulated_run(QUERY)]

    def admitted(name: str) -> list[str]:
        types = PRESETS[name]
        return [e["type"] for e in published if types is None or e["type"] in types]

    everything = [m for m in clients["all"].messages if "seq" in m]
    for name, client in clients.items():
        got = [m for m in client.messages if "seq" in m]
        assert Counter(m["type"] for m in got) == Counter(admitted(name)), name
        assert [m["type"] for m in got] == admitted(name), name  # in publish order
        # the same messages, with the same seqs, as the unfiltered client saw
        assert got == [m for m in everything if m["seq"] in {g["seq"] for g in got}], name
    assert Counter(admitted("essential")) == {"session_started": 1, "task_completed": 3, "session_completed": 1}
    assert Counter(admitted("planning")) == {
        "session_started": 1,
        "plan_generated": 1,
        "report_generated": 1,
        "session_completed": 1,
    }


def test_deleting_the_session_mid_run_stops_the_run(world):
    _, client = world.connect("r", replay="none")
    begin(world)
    world.h.advance(3.0)  # plan and part of the first task
    assert "task_progress" in client.types()
    received = world.stats.total_events_received
    assert world.session("r").ask(CloseSession()) is True
    assert "r" not in world.broker.directory
    assert client.types()[-1] == "session_closed" and client.closed == (1000, "session closed")
    world.h.advance(run_length())
    assert "r" not in world.broker.directory  # no late step brought the session back
    assert world.stats.total_events_received == received
    assert running_simulations(world) == []


def test_a_deleted_run_does_not_publish_into_the_sessions_next_life(world):
    begin(world)
    world.h.advance(1.0)
    world.session("r").ask(CloseSession())
    _, client = world.connect("r", replay="all")  # the same id, created afresh
    world.h.advance(run_length())
    assert client.types() == ["connected"]
    assert running_simulations(world) == []
