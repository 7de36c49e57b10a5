"""Agent queries at actor level: the demo agent paced by the manual clock."""

from __future__ import annotations

import pytest

from actors.messages import ClientMessage
from broker.queries import DemoAgent
from tests.test_session import World


@pytest.fixture
def world(harness):
    return World(harness)


def ask(ref, query: str = "why is the sky blue", **extra) -> None:
    import orjson

    ref.tell(ClientMessage(orjson.dumps({"type": "query", "query": query, **extra}).decode()))


def test_a_query_streams_start_chunks_and_complete_to_every_connection(world):
    asker, mine = world.connect("s", replay="none")
    _, other = world.connect("s", replay="none")
    _, essential = world.connect("s", events="essential", replay="none")
    ask(asker)
    world.h.advance(0.5)
    assert mine.types()[1] == "query_start"
    assert "complete" not in mine.types()  # still streaming at a readable pace
    world.h.advance(5)
    pieces = DemoAgent.answer("why is the sky blue")
    for client in (mine, other):
        messages = client.messages[1:]
        assert [m["type"] for m in messages] == ["query_start"] + ["chunk"] * len(pieces) + ["complete"]
        chunks = [m for m in messages if m["type"] == "chunk"]
        assert [c["chunk_number"] for c in chunks] == list(range(1, len(pieces) + 1))
        complete = messages[-1]
        assert complete["full_response"] == "".join(c["content"] for c in chunks) == "".join(pieces)
        assert complete["total_chunks"] == len(pieces)
        assert [m["seq"] for m in messages] == list(range(1, len(pieces) + 3))
        assert len({m["correlation_id"] for m in messages}) == 1
    assert essential.types()[1:] == ["complete"]
    assert mine.messages[1]["query"] == "why is the sky blue"


def test_a_second_query_while_one_runs_is_busy_for_its_sender_only(world):
    first, one = world.connect("s", replay="none")
    second, two = world.connect("s", replay="none")
    ask(first)
    world.h.run_until_idle()
    ask(second, "another")
    world.h.run_until_idle()
    busy = [m for m in two.messages if m["type"] == "error"]
    assert len(busy) == 1 and busy[0]["code"] == "busy" and "seq" not in busy[0]
    assert not [m for m in one.messages if m["type"] == "error"]
    world.h.advance(5)
    assert one.types()[-1] == "complete"
    ask(second, "now it is free")
    world.h.advance(5)
    assert two.types().count("complete") == 2


def test_busy_does_not_count_towards_the_client_error_limit(harness):
    world = World(harness, max_client_errors=1)
    first, _ = world.connect("s")
    second, two = world.connect("s")
    ask(first)
    for _ in range(3):
        ask(second)
    world.h.run_until_idle()
    assert two.closed is None


@pytest.mark.parametrize(
    "message",
    [
        {"type": "query"},
        {"type": "query", "query": ""},
        {"type": "query", "query": 5},
        {"type": "query", "query": "q", "session_id": "other"},
        {"type": "query", "query": "q", "include_context": "yes"},
        {"type": "query", "query": "q", "system_prompt": 1},
    ],
)
def test_bad_queries_are_bad_message(world, message):
    import orjson

    ref, client = world.connect("s")
    ref.tell(ClientMessage(orjson.dumps(message).decode()))
    world.h.advance(5)
    assert client.types()[-1] == "error"
    assert client.messages[-1]["code"] == "bad_message"
    assert "query_start" not in client.types()


def test_a_client_that_leaves_mid_answer_recovers_the_rest_with_last_seq(world):
    ref, client = world.connect("s", replay="none")
    ask(ref)
    world.h.advance(0.3)
    seen = [m["seq"] for m in client.messages if "seq" in m]
    ref.stop()
    world.h.advance(5)
    _, back = world.connect("s", last_seq=seen[-1])
    types = back.types()
    assert types[-1] == "complete"
    assert next(m["seq"] for m in back.messages if "seq" in m) == seen[-1] + 1


def test_deleting_the_session_abandons_its_query(world):
    from actors.messages import CloseSession

    ref, _ = world.connect("s")
    ask(ref)
    world.h.run_until_idle()
    world.session("s").ask(CloseSession())
    world.h.advance(5)  # the demo agent's timers were cancelled: nothing lands anywhere
    assert "s" not in world.broker.directory
