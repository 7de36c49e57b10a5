"""broker.client against the real application (and, for restarts, a real daemon).

Faults are real too: `tests.support.proxy.CuttingProxy` drops TCP connections
without a close frame, a small Tornado front drops, stalls or refuses
publishes after forwarding them, and a daemon process is stopped with SIGTERM
and started again. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
import tornado.web
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port

from broker.client import (
    Backoff,
    Gap,
    GaveUpError,
    Publisher,
    PublishError,
    QueryBusyError,
    QueryError,
    RejectedError,
    Stream,
    follow,
)
from broker.client.cursor import Cursor, Verdict
from broker.client.tokens import refresh_delay, token_expiry
from broker.queries import DemoAgent
from tests.support import with_settings
from tests.support.proxy import CuttingProxy
from tests.test_daemon import DaemonProcess

#: Retries fast enough for tests (the defaults start at half a second).
FAST = Backoff(initial=0.02, maximum=0.2)
#: Upper bound of any single wait.
WAIT = 10.0
SECRET = "test-secret-of-a-decent-length-0123456789"


def closed_port() -> int:
    """A port nothing listens on (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mint(sessions: list[str] | str, exp_in: float = 600, sub: str = "u1") -> str:
    return jwt.encode({"sub": sub, "sessions": sessions, "exp": int(time.time() + exp_in)}, SECRET, algorithm="HS256")


async def take(stream: Stream, count: int, timeout: float = WAIT) -> list[dict[str, Any]]:
    """The next `count` items of the stream, each within `timeout`."""
    return [await asyncio.wait_for(stream.__anext__(), timeout) for _ in range(count)]


async def take_until_seq(stream: Stream, seq: int, timeout: float = WAIT) -> list[dict[str, Any]]:
    """Items until (and with) the session message of this seq."""
    items = []
    while True:
        item = await asyncio.wait_for(stream.__anext__(), timeout)
        items.append(item)
        if item.get("seq") == seq:
            return items


async def session_info(base: str, session_id: str) -> dict[str, Any]:
    response = await AsyncHTTPClient().fetch(f"{base}/api/sessions/{session_id}", raise_error=False)
    return orjson.loads(response.body)


async def eventually(condition: Any, what: str, timeout: float = WAIT) -> None:
    """Poll an async condition until it holds (bounded)."""
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.02)  # noqa: sleep - bounded poll of a condition


def ticks(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"type": "tick", "n": i} for i in range(start, start + n)]


@pytest.fixture
def base(port: int) -> str:
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def proxy(port: int) -> Iterator[CuttingProxy]:
    with CuttingProxy(port) as running:
        yield running


@pytest.fixture
def publisher(base: str) -> Iterator[Publisher]:
    running = Publisher(base, backoff=FAST)
    yield running
    running.close()


# -- the cursor: exactly-once rules without a network --------------------------


def test_the_cursor_drops_duplicates_and_stops_at_a_hole():
    cursor = Cursor()
    assert cursor.handshake("all") == {"replay": "all"}
    cursor.greeted({"type": "connected", "epoch": "e-1", "last_seq": 3}, "all")
    assert [cursor.judge(s, every_type=True) for s in (2, 3)] == [Verdict.DELIVER] * 2  # history starts at 2
    assert cursor.judge(3, every_type=True) is Verdict.DUPLICATE
    assert cursor.judge(5, every_type=True) is Verdict.HOLE  # 4 never came, and no gap said so
    assert cursor.last_seq == 3
    assert cursor.handshake("all") == {"last_seq": "3", "epoch": "e-1"}
    # With a filter, skipped seqs are normal.
    assert cursor.judge(7, every_type=False) is Verdict.DELIVER


def test_the_cursor_follows_gaps_and_epoch_changes():
    cursor = Cursor(last_seq=3, epoch="e-1")
    cursor.greeted({"epoch": "e-1", "last_seq": 60}, "all")
    cursor.gap({"type": "gap", "from_seq": 4, "to_seq": 40, "epoch": "e-1"})
    assert cursor.judge(41, every_type=True) is Verdict.DELIVER
    cursor.greeted({"epoch": "e-2", "last_seq": 2}, "all")  # the daemon restarted
    cursor.gap({"type": "gap", "from_seq": 1, "to_seq": None, "epoch": "e-2"})
    assert (cursor.last_seq, cursor.epoch) == (0, "e-2")
    assert [cursor.judge(s, every_type=True) for s in (1, 2, 3)] == [Verdict.DELIVER] * 3


def test_the_cursor_starts_after_the_join_point_with_replay_none_and_loosely_with_missed():
    none = Cursor()
    none.greeted({"epoch": "e-1", "last_seq": 10}, "none")
    assert none.judge(10, every_type=True) is Verdict.DUPLICATE
    assert none.judge(12, every_type=True) is Verdict.HOLE
    assert none.judge(11, every_type=True) is Verdict.DELIVER
    missed = Cursor()
    missed.greeted({"epoch": "e-1", "last_seq": 10}, "missed")
    assert [missed.judge(s, every_type=True) for s in (4, 9)] == [Verdict.DELIVER] * 2  # any subset up to 10
    assert missed.judge(12, every_type=True) is Verdict.HOLE  # live messages start at 11
    assert missed.judge(11, every_type=True) is Verdict.DELIVER


def test_token_expiry_is_read_from_the_jwt_and_refreshed_ahead():
    token = mint("*", exp_in=100)
    assert token_expiry(token) == pytest.approx(time.time() + 100, abs=2)
    assert token_expiry("not-a-jwt") is None
    assert refresh_delay(1000, 900) == 70  # 30 s ahead
    assert refresh_delay(1000, 996) == 2  # half of what is left, when that is shorter


def test_backoff_grows_with_jitter_and_is_capped():
    backoff = Backoff(initial=1, maximum=8)
    delays = [backoff.delay(n) for n in range(6)]
    for n, delay in enumerate(delays):
        top = min(8, 2**n)
        assert top / 2 <= delay <= top
    with pytest.raises(ValueError, match="initial"):
        Backoff(initial=0)


# -- follow + publish -------------------------------------------------------------


async def test_follow_yields_published_events_once_in_seq_order_and_acks_them(base, publisher):
    async with follow(base, "basic1", backoff=FAST) as stream:
        assert stream.greeting is not None and stream.greeting["type"] == "connected"
        seqs = await publisher.publish_many(ticks(5), session_id="basic1")
        assert seqs == [1, 2, 3, 4, 5]
        received = await take(stream, 5)
        assert [m["seq"] for m in received] == seqs
        assert [m["n"] for m in received] == [0, 1, 2, 3, 4]
        assert len({m["event_id"] for m in received}) == 5  # the publisher gave each its own id
        waiting = asyncio.ensure_future(stream.__anext__())  # the application is done with seq 5

        async def acked() -> bool:
            info = await session_info(base, "basic1")
            return [c["acked_seq"] for c in info["connections"]] == [5]

        await eventually(acked, "the session shows acked_seq 5")
        waiting.cancel()
    assert stream.last_seq == 5 and stream.epoch is not None


async def test_a_new_follower_gets_the_history_and_the_research_endpoint_works(base, publisher):
    await publisher.publish_many(ticks(3), session_id="hist1")
    async with follow(base, "hist1", endpoint="research", backoff=FAST) as stream:
        assert stream.greeting["type"] == "connection_established"
        assert [m["seq"] for m in await take(stream, 3)] == [1, 2, 3]
    async with follow(base, "hist1", replay="none", backoff=FAST) as stream:
        await publisher.publish("hist1", {"type": "tick", "n": 3})
        assert [m["seq"] for m in await take(stream, 1)] == [4]


async def test_connection_level_messages_stay_inside_unless_asked(base, publisher):
    async with follow(base, "quiet1", backoff=FAST) as stream:
        await stream.send({"type": "ping"})  # answered with a pong the stream keeps to itself
        await publisher.publish("quiet1", {"type": "tick", "n": 0})
        assert [m["type"] for m in await take(stream, 1)] == ["tick"]
    async with follow(base, "quiet1", replay="none", connection_messages=True, backoff=FAST) as stream:
        await stream.send({"type": "ping"})
        assert [m["type"] for m in await take(stream, 2)] == ["connected", "pong"]


async def test_subscribe_and_unsubscribe_change_the_filter_and_survive_a_reconnect(proxy, publisher):
    url = f"http://127.0.0.1:{proxy.port}"
    async with follow(url, "sub1", events="essential", backoff=FAST) as stream:
        assert "task_progress" not in stream.filter
        echo = await stream.subscribe("task_progress")
        assert "task_progress" in echo and stream.filter == echo
        proxy.cut()  # the reconnection must ask for the filter as it is now
        await publisher.publish("sub1", {"type": "task_progress", "task_id": "t1", "progress": 10})
        (message,) = await take(stream, 1)
        assert (message["type"], message["seq"]) == ("task_progress", 1)
        assert stream.connections == 2
        assert "task_progress" not in await stream.unsubscribe("task_progress")
        await publisher.publish_many(
            [{"type": "task_progress", "task_id": "t1", "progress": 50}, {"type": "task_completed", "task_id": "t1"}],
            session_id="sub1",
        )
        assert [m["type"] for m in await take(stream, 1)] == ["task_completed"]


async def test_a_deleted_session_ends_the_stream_after_session_closed(base, publisher):
    async with follow(base, "del1", backoff=FAST) as stream:
        await publisher.publish("del1", {"type": "tick", "n": 0})
        await take(stream, 1)
        await AsyncHTTPClient().fetch(f"{base}/api/sessions/del1", method="DELETE")
        (closed,) = await take(stream, 1)
        assert (closed["type"], closed["reason"]) == ("session_closed", "deleted")
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(stream.__anext__(), WAIT)
    assert stream.connections == 1  # it did not come back and make the session again
    assert (await session_info(base, "del1")) == {"error": "no session 'del1'"}


async def test_an_unreachable_broker_gives_up_after_max_retries():
    with pytest.raises(GaveUpError) as gave_up:
        async with follow(f"http://127.0.0.1:{closed_port()}", "s1", backoff=FAST, max_retries=2):
            pass
    assert gave_up.value.attempts == 3
    assert "ConnectionRefusedError" in str(gave_up.value)


# -- reconnect and recover ----------------------------------------------------------


@with_settings(buffer_size=10_000)
async def test_every_message_arrives_once_in_order_while_a_proxy_keeps_cutting(port, publisher):
    total = 3000
    with CuttingProxy(port, cut_every=60_000) as proxy:  # ~250 messages per connection
        async with follow(f"http://127.0.0.1:{proxy.port}", "cut1", backoff=FAST) as stream:

            async def publish_all() -> list[int | None]:
                seqs: list[int | None] = []
                for start in range(0, total, 100):
                    seqs += await publisher.publish_many(ticks(100, start), session_id="cut1")
                return seqs

            publishing = asyncio.ensure_future(publish_all())
            received = await take_until_seq(stream, total, timeout=30)
            assert await publishing == list(range(1, total + 1))
        assert proxy.cuts >= 5, proxy.cuts
    assert [m["seq"] for m in received] == list(range(1, total + 1))  # no gap item, no duplicate, no hole
    assert [m["n"] for m in received] == list(range(total))
    assert stream.gaps == []
    assert stream.connections == len(stream.disconnects) + 1 >= proxy.cuts + 1


@with_settings(buffer_size=20)
async def test_a_gap_is_reported_with_its_range_when_history_cannot_cover_the_outage(port, proxy, publisher):
    async with follow(f"http://127.0.0.1:{proxy.port}", "gap1", backoff=FAST) as stream:
        await publisher.publish_many(ticks(10), session_id="gap1")
        assert [m["seq"] for m in await take(stream, 10)] == list(range(1, 11))
        proxy.target_port = closed_port()  # reconnections fail until the network is back
        proxy.cut()
        await publisher.publish_many(ticks(50, 10), session_id="gap1")  # seq 11..60; history keeps 41..60

        async def an_attempt_failed() -> bool:
            return proxy.accepted >= 2

        await eventually(an_attempt_failed, "the client tried again while the network was down")
        proxy.target_port = port
        items = await take(stream, 21)
    gap, *rest = items
    assert (gap["type"], gap["from_seq"], gap["to_seq"]) == ("gap", 11, 40)
    assert stream.gaps == [Gap(11, 40, stream.epoch)]
    assert [m["seq"] for m in rest] == list(range(41, 61))
    assert len(stream.disconnects) >= 2  # the cut, and at least one refused attempt


@with_settings(jwt_secret=SECRET)
@pytest.mark.parametrize(
    ("token", "code", "reason"),
    [(None, 4001, "a token is required"), (mint(["other"]), 4003, "token does not cover this session")],
    ids=["no-token", "other-session"],
)
async def test_token_refusals_are_raised_and_not_retried(proxy, token, code, reason):
    with pytest.raises(RejectedError) as refused:
        async with follow(f"http://127.0.0.1:{proxy.port}", "s1", token=token, backoff=FAST):
            pass
    assert (refused.value.code, refused.value.reason) == (code, reason)
    assert f"{code} ({reason})" in str(refused.value)
    assert proxy.accepted == 1  # one attempt, no retry


async def test_a_bad_filter_is_raised_as_1008_and_not_retried(proxy):
    with pytest.raises(RejectedError) as refused:
        async with follow(f"http://127.0.0.1:{proxy.port}", "s1", events="bogus!", backoff=FAST):
            pass
    assert refused.value.code == 1008
    assert "bogus!" in refused.value.reason
    assert proxy.accepted == 1


@with_settings(jwt_secret=SECRET)
async def test_the_token_is_refreshed_through_the_callback_before_it_expires(base, publisher):
    first = mint(["tok1"], exp_in=3)
    fresh = mint(["tok1"], exp_in=600)
    calls: list[float] = []

    async def refresh() -> str:
        calls.append(time.time())
        return fresh

    async with follow(base, "tok1", token=first, refresh_token=refresh, backoff=FAST) as stream:
        expired_at = token_expiry(first)
        assert expired_at is not None

        async def past_the_first_expiry() -> bool:
            return time.time() > expired_at + 0.5

        await eventually(past_the_first_expiry, "the first token's exp passed")
        await publisher.publish("tok1", {"type": "tick", "n": 0})
        assert [m["seq"] for m in await take(stream, 1)] == [1]  # still connected: the server did not close 4001
        assert stream.connections == 1 and stream.disconnects == []
    assert len(calls) == 1 and calls[0] < expired_at


# -- the publisher ----------------------------------------------------------------------


class FlakyFront(tornado.web.RequestHandler):
    """In front of the broker: forwards publishes, then fails some answers on purpose.

    `modes` is consumed one per request: "refuse" (503, not forwarded),
    "forward-then-503" (published, but the answer is a 503), "forward-then-drop"
    (published, then the connection is closed with no answer), "forward-then-stall"
    (published, then no answer until the client gives up); later requests are forwarded.
    """

    def initialize(self, target: str, modes: list[str], bodies: list[bytes], release: asyncio.Event) -> None:
        self.target, self.modes, self.bodies, self.release = target, modes, bodies, release

    async def post(self, path: str) -> None:
        self.bodies.append(self.request.body)
        mode = self.modes.pop(0) if self.modes else "forward"
        if mode == "refuse":
            self.set_status(503)
            self.finish({"error": "the daemon is shutting down"})
            return
        answer = await AsyncHTTPClient().fetch(
            self.target + self.request.uri, method="POST", body=self.request.body,
            headers={"Content-Type": self.request.headers["Content-Type"]}, raise_error=False,
        )
        if mode == "forward-then-503":
            self.set_status(503)
            self.finish({"error": "the daemon is shutting down"})
        elif mode == "forward-then-drop":
            self.request.connection.stream.close()
        elif mode == "forward-then-stall":
            await self.release.wait()
        else:
            self.set_status(answer.code)
            self.finish(answer.body)


@pytest.fixture
def front(base: str, io_loop: Any) -> Iterator[Any]:
    """A FlakyFront on its own port: `.url`, `.modes` (set by the test), `.bodies` (what it received)."""

    class Front:
        modes: list[str] = []
        bodies: list[bytes] = []
        release = asyncio.Event()

    app = tornado.web.Application(
        [(r"(/api/.*)", FlakyFront, {"target": base, "modes": Front.modes, "bodies": Front.bodies,
                                    "release": Front.release})]
    )
    sock, front_port = bind_unused_port()
    server = HTTPServer(app)
    server.add_sockets([sock])
    Front.url = f"http://127.0.0.1:{front_port}"  # type: ignore[attr-defined]
    yield Front
    Front.release.set()
    server.stop()
    io_loop.run_sync(server.close_all_connections)


@pytest.mark.parametrize("fault", ["refuse", "forward-then-503", "forward-then-drop", "forward-then-stall"])
async def test_the_publisher_retries_with_the_same_event_ids_and_nothing_is_delivered_twice(base, front, fault):
    front.modes.extend([fault, fault])
    async with follow(base, "retry1", backoff=FAST) as stream, Publisher(front.url, backoff=FAST, timeout=1) as pub:
        seqs = await pub.publish_many(ticks(5), session_id="retry1")
        assert seqs == [1, 2, 3, 4, 5]
        assert pub.retried == 2
        assert len(front.bodies) == 3 and len(set(front.bodies)) == 1  # the very same body, ids included
        sent_ids = [e["event_id"] for e in orjson.loads(front.bodies[0])]
        received = await take(stream, 5)
        assert [m["event_id"] for m in received] == sent_ids
        assert (await session_info(base, "retry1"))["last_seq"] == 5  # nothing was published twice


async def test_the_publisher_raises_a_4xx_at_once_with_the_details(base, front):
    async with Publisher(front.url, backoff=FAST) as pub:
        with pytest.raises(PublishError) as failed:
            await pub.publish("bad1", {"type": "task_progress", "task_id": "t1", "progress": 140})
    assert failed.value.status == 422
    assert failed.value.details == [{"index": 0, "field": "progress", "error": "must be a number from 0 to 100"}]
    assert "progress" in str(failed.value)
    assert pub.retried == 0 and len(front.bodies) == 1


async def test_the_publisher_gives_up_after_its_retries_with_the_last_status(front):
    front.modes.extend(["refuse"] * 10)
    async with Publisher(front.url, backoff=FAST, retries=2) as pub:
        with pytest.raises(PublishError) as failed:
            await pub.publish("s1", {"type": "tick"})
    assert failed.value.status == 503 and "after 3 attempts" in str(failed.value)
    assert len(front.bodies) == 3


async def test_publish_many_splits_large_batches_and_keeps_their_order(base, publisher):
    events = [{**e, "session_id": "big1" if e["n"] % 2 else "big2"} for e in ticks(2500)]
    seqs = await publisher.publish_many(events)
    assert seqs[:4] == [1, 1, 2, 2] and seqs[-1] == 1250
    with pytest.raises(ValueError, match="session_id"):
        await publisher.publish_many(ticks(1))


# -- queries -----------------------------------------------------------------------------


async def test_query_streams_the_chunks_until_complete(base):
    question = "What is an actor?"
    async with follow(base, "chat1", user_id="u1", replay="none", backoff=FAST) as stream:
        answer = stream.query(question)
        chunks = [chunk async for chunk in answer]
        assert chunks == DemoAgent.answer(question)
        assert answer.full_response == "".join(chunks)
        assert [m["type"] for m in answer.messages] == ["query_start", *["chunk"] * len(chunks), "complete"]
        # The session's stream carries the same messages, in seq order.
        seen = await take(stream, len(chunks) + 2)
        assert [m["seq"] for m in seen] == [m["seq"] for m in answer.messages]
        assert await stream.query("And then?") == "".join(DemoAgent.answer("And then?"))


async def test_a_second_query_while_one_runs_raises_busy(base):
    async with follow(base, "chat2", replay="none", backoff=FAST) as stream:
        first = stream.query("first")
        assert await first.__anext__() == DemoAgent.answer("first")[0]
        with pytest.raises(QueryBusyError) as busy:
            await stream.query("second")
        assert busy.value.code == "busy"
        assert [chunk async for chunk in first] == DemoAgent.answer("first")[1:]


@with_settings(query_backend="http", query_upstream_url=f"http://127.0.0.1:{closed_port()}/answer")
async def test_a_failed_query_raises_query_error(base):
    async with follow(base, "chat3", replay="none", backoff=FAST) as stream:
        with pytest.raises(QueryError) as failed:
            await stream.query("anyone there?")
    assert failed.value.code == "query_failed"
    assert failed.value.message is not None and failed.value.message["type"] == "error"


# -- a real daemon, stopped and started again -----------------------------------------------


async def test_server_shutdown_is_honoured_and_the_restarted_daemon_is_followed_through_a_gap(tmp_path: Path):
    daemon_port = closed_port()
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    first = await DaemonProcess(tmp_path / "a", "--port", str(daemon_port), notify=False).started()
    url = f"http://127.0.0.1:{daemon_port}"
    second: DaemonProcess | None = None
    try:
        async with follow(url, "restart1", backoff=FAST) as stream, Publisher(url, backoff=FAST) as pub:
            await pub.publish_many(ticks(3), session_id="restart1")
            assert [m["seq"] for m in await take(stream, 3)] == [1, 2, 3]
            old_epoch = stream.epoch
            first.send(signal.SIGTERM)
            assert await first.exited() == 0, first.output()
            second = await DaemonProcess(tmp_path / "b", "--port", str(daemon_port), notify=False).started()
            await pub.publish_many(ticks(2, 3), session_id="restart1")
            gap, *rest = await take(stream, 3, timeout=20)
        assert stream.disconnects[0].code == 1001
        assert stream.disconnects[0].delay >= 2.0  # the server's reconnect_after_ms (2000)
        assert (gap["type"], gap["from_seq"], gap["to_seq"]) == ("gap", 1, None)
        assert gap["epoch"] == stream.epoch != old_epoch
        assert [(m["seq"], m["n"]) for m in rest] == [(1, 3), (2, 4)]
    finally:
        first.stop()
        if second is not None:
            second.stop()


@with_settings(max_queue_bytes=65_536, buffer_size=2_000)
async def test_a_slow_consumer_closed_4008_reconnects_and_loses_nothing(base, publisher):
    blob = "x" * 16_000
    total = 600
    async with follow(base, "slow1", backoff=FAST, max_pending=5) as stream:
        # The application reads nothing while 9.6 MB are published: the stream stops reading
        # the socket, the broker's queue for it overflows, and it closes the connection 4008.
        for start in range(0, total, 50):
            await publisher.publish_many([{**e, "blob": blob} for e in ticks(50, start)], session_id="slow1")
        received = await take_until_seq(stream, total, timeout=30)
    assert [m["seq"] for m in received] == list(range(1, total + 1))
    assert 4008 in [d.code for d in stream.disconnects], stream.disconnects


@with_settings(max_queue_bytes=200_000, buffer_size=2_000)
async def test_a_seq_hole_without_a_gap_is_refetched_not_skipped(base, publisher):
    # A slow client's queue is compacted: a waiting task_progress is dropped when a newer one
    # for the same task waits behind it (docs/protocol.md section 3.9). The seqs that reach the
    # socket then skip numbers with no gap; the stream must fetch them again, not skip them.
    total = 600
    events = [
        {"type": "task_progress", "task_id": "t1", "progress": i % 100, "current_action": f"{i} " + "x" * 16_000}
        for i in range(total)
    ]
    async with follow(base, "hole1", backoff=FAST, max_pending=5) as stream:
        for start in range(0, total, 50):
            await publisher.publish_many(events[start : start + 50], session_id="hole1")
        received = await take_until_seq(stream, total, timeout=30)
    assert [m["seq"] for m in received] == list(range(1, total + 1))
    assert [int(m["current_action"].split()[0]) for m in received] == list(range(total))
    assert stream.resyncs >= 1
    assert 4008 not in [d.code for d in stream.disconnects]  # compaction sufficed: the holes were the only trouble
