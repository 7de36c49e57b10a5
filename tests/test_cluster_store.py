"""broker.cluster.store.RedisStore against a real redis-server of the test's own.

Throttle and dedup-window rules are driven with injected time (`now_ms`,
which replaces Redis TIME inside the scripts) and compared with the memory
backend's own policy objects (actors.throttle.ProgressThrottle,
actors.dedup.DedupWindow) fed the same events at the same times; one test
uses Redis's real clock. Faults are real: the server is killed, restarted
and SIGSTOPped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import re
import time
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis import exceptions as rx
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import Connection

from actors.dedup import DedupWindow
from actors.throttle import ProgressThrottle, Verdict
from broker.cluster.store import PIPELINE_CHUNK, BackendUnavailable, EventMeta, Limits, RedisStore, Slice
from tests.support.wire import wait_until

LIMITS = Limits(buffer_size=100, dedup_window_ms=300_000, min_delta=5, max_interval_ms=1000, session_ttl_ms=3_600_000)
_ids = itertools.count(1)


def sid() -> str:
    return f"s{next(_ids)}"


def event(type: str = "session_started", **fields: Any) -> dict[str, Any]:
    fields.setdefault("event_id", f"ev{next(_ids)}")
    return {"type": type, **fields}


def progress(task_id: str, value: float, **fields: Any) -> dict[str, Any]:
    return event("task_progress", task_id=task_id, progress=value, **fields)


async def publish(store: RedisStore, session_id: str, *events: dict[str, Any], limits: Limits = LIMITS, **kw: Any):
    return await store.publish(
        session_id, [orjson.dumps(e) for e in events], [EventMeta.of(e) for e in events], limits, **kw
    )


def ids_of(sliced: Slice) -> list[str]:
    return [orjson.loads(m.data)["event_id"] for m in sliced.messages]


@pytest.fixture
def store(io_loop, redis_server):
    s = RedisStore.from_url(redis_server.url)
    yield s
    io_loop.run_sync(s.close)


@pytest.fixture
def raw(io_loop, redis_server):
    """A plain client, to look at keys the way an operator would."""
    client = Redis.from_url(redis_server.url)
    yield client
    io_loop.run_sync(client.aclose)


# -- seq and epoch -------------------------------------------------------------


async def test_seqs_count_from_one_per_session_and_every_message_carries_the_epoch(store):
    s = sid()
    first = await publish(store, s, event(), event("plan_generated", plan=[1]))
    second = await publish(store, s, event("report_generated"))
    assert (first.seqs, second.seqs) == ([1, 2], [3])
    assert (await publish(store, sid(), event())).seqs == [1]  # another session counts on its own
    history = await store.read(s, 0)
    assert re.fullmatch(r"e-[0-9a-f]{16}", history.epoch)
    assert (history.last_seq, history.first_seq) == (3, 1)
    messages = [orjson.loads(m.data) for m in history.messages]
    assert [m["seq"] for m in messages] == [1, 2, 3]
    assert {m["epoch"] for m in messages} == {history.epoch}
    assert messages[1]["plan"] == [1] and messages[1]["type"] == "plan_generated"
    described = await store.describe(s)
    assert described is not None
    assert (described["epoch"], described["last_seq"], described["buffered"]) == (history.epoch, 3, 3)


async def test_two_nodes_publishing_to_one_session_never_share_a_seq_and_batches_stay_contiguous(io_loop, redis_server):
    a, b = RedisStore.from_url(redis_server.url), RedisStore.from_url(redis_server.url)
    s = sid()
    batches = [[event(), event(), event(), event()] for _ in range(40)]
    try:
        big = Limits(200, 300_000, 5, 1000, 60_000)
        results = await asyncio.gather(
            *(publish(a if i % 2 else b, s, *batch, limits=big) for i, batch in enumerate(batches))
        )
        history = await a.read(s, 0)
    finally:
        await a.close()
        await b.close()
    every = sorted(seq for r in results for seq in r.seqs)
    assert every == list(range(1, 161))
    for result in results:
        assert result.seqs == list(range(result.seqs[0], result.seqs[0] + 4))
    by_seq = {m.seq: orjson.loads(m.data)["event_id"] for m in history.messages}
    for batch, result in zip(batches, results, strict=True):
        assert [by_seq[q] for q in result.seqs] == [e["event_id"] for e in batch]


# -- dedup -----------------------------------------------------------------------


async def test_a_repeated_event_id_is_answered_with_the_first_seq_within_and_across_batches(store):
    s = sid()
    a, b = event(event_id="a"), event(event_id="b")
    first = await publish(store, s, a, b, dict(a))
    assert (first.seqs, first.received) == ([1, 2, 1], 2)
    retry = await publish(store, s, a, b)
    assert (retry.seqs, retry.received) == ([1, 2], 0)
    assert ids_of(await store.read(s, 0)) == ["a", "b"]


async def test_a_held_or_discarded_event_answers_null_until_its_flush_gives_it_a_seq(store):
    s = sid()
    await publish(store, s, progress("t", 10), now_ms=0)
    held = progress("t", 11, event_id="held")
    assert (await publish(store, s, held, dict(held), now_ms=10)).seqs == [None, None]
    assert (await publish(store, s, held, now_ms=20)).seqs == [None]
    assert await store.flush(s, "t", LIMITS, now_ms=1000) == 2
    assert (await publish(store, s, held, now_ms=1001)).seqs == [2]
    gone = progress("t", 50, event_id="late")
    completed = event("task_completed", task_id="t")
    assert (await publish(store, s, completed, gone, gone, now_ms=1002)).seqs == [3, None, None]


async def test_event_ids_are_forgotten_once_the_dedup_window_has_passed(store, raw):
    s = sid()
    limits = Limits(100, dedup_window_ms=1000, min_delta=5, max_interval_ms=1000, session_ttl_ms=60_000)
    a = event(event_id="a")
    assert (await publish(store, s, a, limits=limits, now_ms=5000)).seqs == [1]
    assert (await publish(store, s, a, limits=limits, now_ms=6000)).seqs == [1]  # exactly the window: still known
    assert (await publish(store, s, a, limits=limits, now_ms=6001)).seqs == [2]  # past it: a new event
    assert await raw.hlen(f"ab:{{{s}}}:dedup") == 1 and await raw.zcard(f"ab:{{{s}}}:dedupz") == 1


# -- throttling ------------------------------------------------------------------


async def test_throttle_rules_one_by_one(store):
    s = sid()

    async def seq_of(e: dict[str, Any], at: int) -> int | None:
        return (await publish(store, s, e, now_ms=at)).seqs[0]

    assert await seq_of(progress("t", 10), 0) == 1  # the first progress of a task goes out
    assert await seq_of(progress("t", 12), 1) is None  # less than min_delta: held
    assert await seq_of(progress("t", 15), 2) == 2  # min_delta from the last delivered one
    assert await seq_of(progress("t", 10), 3) == 3  # either direction
    assert await seq_of(progress("t", 11, current_action="x"), 4) == 4  # a new current_action
    assert await seq_of(progress("t", 12, current_action="x"), 5) is None  # same action, small step
    assert await seq_of(progress("t", 0, current_action="x"), 6) == 5  # 0 always goes out
    assert await seq_of(progress("t", 1, current_action="x"), 7) is None
    assert await seq_of(progress("t", 100, current_action="x"), 8) == 6  # and so does 100
    assert await seq_of(progress("u", 100), 9) == 7  # per task: u's first
    assert await seq_of(progress("t", 99, current_action="x"), 10) is None
    assert await seq_of(event("task_completed", task_id="t"), 11) == 8  # drops the held 99
    assert await seq_of(progress("t", 50), 12) is None  # a finished task's progress is discarded
    assert await seq_of(event("task_started", task_id="t"), 13) == 9
    assert await seq_of(progress("t", 51), 14) == 10  # started afresh: first again
    described = await store.describe(s)
    assert described is not None
    # throttled: 12, 12 (action x) and 1 dropped by later deliveries, 99 by the completion, 50 discarded
    assert described["throttled"] == 5


async def test_a_held_event_is_replaced_and_gets_its_seq_only_when_flushed(store):
    s = sid()
    await publish(store, s, progress("t", 10), now_ms=1000)
    first_hold = await publish(store, s, progress("t", 11, event_id="p11"), now_ms=1100)
    assert first_hold.held == [("t", 2000)] and first_hold.throttled == 0
    second_hold = await publish(store, s, progress("t", 12, event_id="p12"), now_ms=1200)
    assert second_hold.held == [] and second_hold.throttled == 1  # p11 superseded; the timer already runs
    assert (await publish(store, s, event("plan_generated", event_id="plan"), now_ms=1300)).seqs == [2]
    assert await store.flush(s, "t", LIMITS, now_ms=1999) is None  # not due
    assert await store.flush(s, "t", LIMITS, now_ms=2000) == 3  # after the later event
    assert ids_of(await store.read(s, 0))[1:] == ["plan", "p12"]
    # the flush counts as a delivery: the next small step is held until 3000
    assert (await publish(store, s, progress("t", 13), now_ms=2100)).held == [("t", 3000)]


async def test_a_hold_right_after_a_late_delivery_is_due_at_once(store):
    s = sid()
    await publish(store, s, progress("t", 10), now_ms=0)
    # held long after the last delivery: due now, not in the past
    assert (await publish(store, s, progress("t", 11), now_ms=5000)).held == [("t", 5000)]


class MemoryModel:
    """The memory backend's publish path (actors/session.py publish, _publish_one,
    _offer_progress, flush_held), with its own policy objects and ms as the time unit."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.throttle = ProgressThrottle(limits.min_delta, limits.max_interval_ms)
        self.accepted = DedupWindow()
        self.history: list[str] = []
        self.throttled = 0
        self.timers: list[tuple[float, str]] = []

    def publish(self, events: list[dict[str, Any]], now: int) -> list[int | None]:
        self.accepted.forget_before(now - self.limits.dedup_window_ms)
        return [self._one(e, now) for e in events]

    def _one(self, e: dict[str, Any], now: int) -> int | None:
        if self.accepted.seen(e["event_id"]):
            return self.accepted.seq_of(e["event_id"])
        self.accepted.accept(e["event_id"], now)
        if e["type"] == "task_progress":
            offer = self.throttle.offer(e["task_id"], e, now)
            self.throttled += offer.superseded is not None
            if offer.verdict is Verdict.DELIVER:
                return self._commit(e)
            if offer.verdict is Verdict.DISCARD:
                self.throttled += 1
            elif offer.flush_at is not None:
                self.timers.append((offer.flush_at, e["task_id"]))
            return None
        if e["type"] in ("task_completed", "task_failed"):
            self.throttled += self.throttle.finish(e["task_id"]) is not None
        elif e["type"] == "task_started":
            self.throttle.start(e["task_id"])
        return self._commit(e)

    def _commit(self, e: dict[str, Any]) -> int:
        self.history.append(e["event_id"])
        self.accepted.assign(e["event_id"], len(self.history))
        return len(self.history)

    def run_timers(self, until: int) -> None:
        while self.timers and min(self.timers)[0] <= until:
            at, task_id = min(self.timers)
            self.timers.remove((at, task_id))
            held, again = self.throttle.flush(task_id, at)
            if held is not None:
                self._commit(held)
            elif again is not None:
                self.timers.append((again, task_id))


_task_ids = st.sampled_from(["a", "b"])
_progress_event = st.builds(
    lambda task, value, action: (
        {"type": "task_progress", "task_id": task, "progress": value}
        | ({} if action is None else {"current_action": action})
    ),
    _task_ids,
    st.one_of(  # mostly small steps near 20 (held, replaced, exactly min_delta), sometimes anything
        *[st.sampled_from([20, 21, 22, 23, 24, 22.5])] * 6,
        st.sampled_from([25, 27.5, 15, 0, 100]),
        st.integers(0, 100),
        st.floats(0, 100, allow_nan=False),
    ),
    st.sampled_from([None] * 10 + ["x", "y"]),
)
_other_event = st.one_of(
    st.builds(
        lambda t, task: {"type": t, "task_id": task},
        st.sampled_from(["task_started", "task_started", "task_completed", "task_failed"]),
        _task_ids,
    ),
    st.just({"type": "plan_generated"}),
)
_step = st.tuples(
    st.one_of(st.integers(0, 400), st.integers(0, 400), st.integers(800, 1600)),  # ms since the previous step
    st.lists(
        st.tuples(st.one_of(*[_progress_event] * 10, _other_event), st.integers(0, 40)), min_size=1, max_size=4
    ),  # (event, id choice: below 6 repeats an earlier id)
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(_step, min_size=1, max_size=20))
def test_throttle_and_dedup_decide_exactly_as_the_memory_backend(io_loop, store, steps):
    limits = Limits(100, dedup_window_ms=4000, min_delta=5, max_interval_ms=1000, session_ttl_ms=60_000)
    model = MemoryModel(limits)
    s = sid()

    async def run() -> None:
        timers: list[tuple[int, str]] = []  # what a node schedules from PublishResult.held
        now = 0
        for gap, batch in steps:
            now += gap
            model.run_timers(now)
            while timers and min(timers)[0] <= now:
                at, task_id = min(timers)
                timers.remove((at, task_id))
                await store.flush(s, task_id, limits, now_ms=at)
            events = [dict(e, event_id=f"id{choice}" if choice < 6 else f"fresh{next(_ids)}") for e, choice in batch]
            result = await publish(store, s, *events, limits=limits, now_ms=now)
            assert result.seqs == model.publish(events, now)
            timers.extend((due, task_id) for task_id, due in result.held)
        history = await store.read(s, 0)
        assert ids_of(history) == model.history
        described = await store.describe(s)
        assert described is not None and described["throttled"] == model.throttled

    io_loop.run_sync(run)


async def test_the_trailing_edge_by_redis_time_and_a_flush_is_idempotent(store):
    s = sid()
    limits = Limits(100, 300_000, 5, max_interval_ms=50, session_ttl_ms=60_000)
    await publish(store, s, progress("t", 10), limits=limits)
    result = await publish(store, s, progress("t", 11, event_id="late"), limits=limits)
    [(task_id, due_ms)] = result.held
    assert task_id == "t" and result.now_ms <= due_ms <= result.now_ms + 50

    async def flushed() -> int | None:
        return await store.flush(s, "t", limits)

    assert await wait_until(flushed, what="the held progress to be flushed") == 2
    assert await store.flush(s, "t", limits) is None  # nothing held any more
    assert ids_of(await store.read(s, 1)) == ["late"]


async def test_the_due_sweep_finds_what_any_node_held_and_forgets_it_once_flushed(store):
    s, other = sid(), sid()
    await publish(store, s, progress("t", 10), now_ms=0)
    await publish(store, s, progress("t", 11), now_ms=100)
    await publish(store, other, progress("u", 10), progress("u", 12), now_ms=400)
    assert await store.due(now_ms=999) == []
    assert await store.due(now_ms=1400) == [(s, "t"), (other, "u")]
    assert await store.flush(s, "t", LIMITS, now_ms=1400) == 2
    assert await store.due(now_ms=1400) == [(other, "u")]
    # a delivery that discards the held one also takes it off the sweep
    await publish(store, other, progress("u", 50), now_ms=1401)
    assert await store.due(now_ms=9999) == []
    assert await store.flush(other, "u", LIMITS, now_ms=9999) is None


async def test_a_flush_of_a_deleted_session_does_nothing_and_leaves_no_due_entry(store, raw):
    s = sid()
    await publish(store, s, progress("t", 10), progress("t", 11), now_ms=0)
    assert await store.delete(s)
    assert await store.due(now_ms=10_000) == []
    assert await store.flush(s, "t", LIMITS, now_ms=10_000) is None
    assert not await store.exists(s)


# -- history, trim, reads ------------------------------------------------------------


async def test_the_stream_keeps_buffer_size_messages_and_a_read_after_an_evicted_seq_shows_the_gap(store, raw):
    s = sid()
    limits = Limits(3, 300_000, 5, 1000, 60_000)
    await publish(store, s, *(event() for _ in range(5)), limits=limits)
    assert await raw.xlen(f"ab:{{{s}}}:stream") == 3
    whole = await store.read(s, 0)
    assert (whole.first_seq, whole.last_seq, [m.seq for m in whole.messages]) == (3, 5, [3, 4, 5])
    after_evicted = await store.read(s, 1)
    assert after_evicted.first_seq > 1 + 1  # seq 2 is gone: the caller sends a gap 2..2
    assert [m.seq for m in after_evicted.messages] == [3, 4, 5]
    assert [m.seq for m in (await store.read(s, 4)).messages] == [5]
    newest = await store.read(s, 5)
    assert newest.messages == [] and newest.last_seq == 5


async def test_reading_a_session_that_does_not_exist_creates_nothing(store, raw):
    s = sid()
    assert await store.read(s, 0) == Slice("", 0, 1, [])
    assert await store.read_missed(s) == Slice("", 0, 1, [])
    assert await store.describe(s) is None
    assert not await store.exists(s)
    assert await raw.keys(f"ab:{{{s}}}:*") == []


async def test_a_stored_progress_message_keeps_its_task_id_and_type(store):
    s = sid()
    await publish(store, s, progress("t\tab", 10), event("task_completed", task_id="t\tab"))
    first, second = (await store.read(s, 0)).messages
    assert (first.type, first.task_id) == ("task_progress", "t\tab")
    assert (second.type, second.task_id) == ("task_completed", None)  # as the memory backend's frames


async def test_replay_missed_returns_what_no_connection_on_any_node_admitted(store, raw):
    s = sid()
    await store.ensure(s, 60_000)
    planning = {"node_id": "n1", "user_id": "u", "events": ["plan_generated"]}
    most = {"node_id": "n2", "user_id": "u", "events": ["*", "-session_started", "-task_completed"]}
    await store.put_connection(s, "c1", planning, 60_000)
    await store.put_connection(s, "c2", most, 60_000)
    kinds = ["session_started", "plan_generated", "report_generated"]
    await publish(store, s, *(event(k) for k in kinds), event("task_completed", task_id="t"))
    # session_started (1) and task_completed (4) reached nobody; c2 admitted report_generated
    assert await raw.zrange(f"ab:{{{s}}}:undelivered", 0, -1) == [b"1", b"4"]
    only_completions = await store.read_missed(s, ["task_completed"])
    assert [m.seq for m in only_completions.messages] == [4]
    assert [m.seq for m in (await store.read_missed(s)).messages] == [1]  # what the filter refused stayed
    assert (await store.read_missed(s)).messages == []  # sent now: not missed any more
    await store.drop_connection(s, "c2")
    await publish(store, s, event("report_generated"))
    assert [m.seq for m in (await store.read_missed(s, ["*"])).messages] == [5]


async def test_a_publish_from_a_node_whose_connection_takes_everything_leaves_nothing_undelivered(store, raw):
    """admitted_here: the calling node has a connection with filter ["*"] (ClusterNode knows its own); the
    script then counts every event as sent without reading the records (which lag: the node writes them later)."""
    s = sid()
    await store.ensure(s, 60_000)
    await publish(store, s, event("session_started"), admitted_here=True)
    assert await raw.zcard(key(s, "undelivered")) == 0
    await publish(store, s, event("session_started"))  # no record, no flag: nobody took it
    assert await raw.zrange(key(s, "undelivered"), 0, -1) == [b"2"]


async def test_undelivered_seqs_are_trimmed_with_the_stream(store, raw):
    s = sid()
    limits = Limits(2, 300_000, 5, 1000, 60_000)
    await publish(store, s, *(event() for _ in range(4)), limits=limits)
    assert await raw.zrange(f"ab:{{{s}}}:undelivered", 0, -1) == [b"3", b"4"]
    assert [m.seq for m in (await store.read_missed(s)).messages] == [3, 4]
    # seqs the stream evicted later, by publishes that marked nothing undelivered, are not missed either
    await publish(store, s, event(), limits=limits)
    await publish(store, s, *(event() for _ in range(2)), limits=limits, admitted_here=True)
    assert [m.seq for m in (await store.read_missed(s)).messages] == []  # 5 left the stream (6, 7 remain)


# -- session lifecycle -----------------------------------------------------------------


async def test_create_refuses_an_existing_session_and_ensure_keeps_its_epoch(store):
    s = sid()
    assert await store.create(s, 60_000)
    assert not await store.create(s, 60_000)  # 409
    epoch = await store.ensure(s, 60_000)
    assert epoch == await store.ensure(s, 60_000) == (await store.read(s, 0)).epoch
    assert (await publish(store, s, event())).seqs == [1]
    assert (await store.read(s, 0)).epoch == epoch
    other = sid()
    assert re.fullmatch(r"e-[0-9a-f]{16}", await store.ensure(other, 60_000))
    assert not await store.create(other, 60_000)


async def test_delete_removes_every_key_announces_it_and_the_next_life_has_a_new_epoch(store, raw):
    s = sid()
    await store.put_connection(s, "c1", {"node_id": "n1", "user_id": None, "events": ["*"]}, 60_000)
    await publish(store, s, event(), progress("t", 1), progress("t", 2))
    assert await store.lock_query(s, "q1", 60_000)
    epoch = (await store.read(s, 0)).epoch
    pubsub = raw.pubsub()
    await pubsub.subscribe(store.events_channel(s))
    assert (await pubsub.get_message(timeout=2))["type"] == "subscribe"
    try:
        assert await store.delete(s)
        message = await pubsub.get_message(timeout=2)
    finally:
        await pubsub.aclose()
    assert message["data"] == f"D {epoch}".encode()
    assert await raw.keys(f"ab:{{{s}}}:*") == []
    assert await raw.zrange("ab:throttle:due", 0, -1) == []
    assert not await store.delete(s)
    assert await store.ensure(s, 60_000) != epoch
    assert (await publish(store, s, event())).seqs == [1]


#: what a publish adds to session_ttl when it renews (publish.lua renew_session): a tenth, a minute at most
SLACK_MS = 60_000


def key(session_id: str, name: str) -> str:
    return f"ab:{{{session_id}}}:{name}"


async def test_every_key_of_a_session_expires_session_ttl_after_a_publish_or_a_touch(store, raw):
    s = sid()
    await store.ensure(s, 60_000, listener="n")
    await store.put_connection(s, "c1", {"node_id": "n", "user_id": None, "events": ["plan_generated"]}, 60_000)
    await publish(store, s, event(), progress("t", 1), progress("t", 2), limits=LIMITS)
    keys = await raw.keys(f"ab:{{{s}}}:*")
    assert len(keys) == 8  # meta, stream, dedup, dedupz, tasks, undelivered, conns, listeners
    for k in keys:  # session_ttl at least, and at most the slack more
        assert 3_600_000 - 1000 < await raw.pttl(k) <= 3_600_000 + SLACK_MS
    await store.touch([s, sid()], 5_000)  # exact: a touch may shorten it
    for k in keys:
        assert 0 < await raw.pttl(k) <= 5_000


async def test_a_publish_renews_expiry_only_when_the_deadline_nears_and_at_once_for_a_key_it_makes(store, raw):
    """The seven PEXPIREs are a third of a publish's commands: they are skipped while the deadline the keys
    were given is more than session_ttl away, but never for a key the call itself made (it would live for ever)."""
    s = sid()
    admitted = ["plan_generated", "task_progress"]
    await store.put_connection(s, "c1", {"node_id": "n", "user_id": None, "events": admitted}, 60_000)
    await publish(store, s, event("plan_generated"))
    first = [key(s, name) for name in ("meta", "stream", "dedup", "dedupz")]
    for k in first:  # as if the slack had almost passed: shorter than a renewal would make them
        assert await raw.pexpire(k, 3_601_000)
    await publish(store, s, event("plan_generated"))
    for k in first:
        assert await raw.pttl(k) <= 3_601_000  # not renewed: the recorded deadline is still session_ttl away
    # a key a publish makes expires with the session: a task's first progress, an event no connection admits
    for made, kind in (("tasks", progress("t", 1)), ("undelivered", event("session_started"))):
        assert not await raw.exists(key(s, made))
        await publish(store, s, kind)
        assert 3_600_000 - 1000 < await raw.pttl(key(s, made)) <= 3_600_000 + SLACK_MS
    # once the recorded deadline is less than session_ttl away, a publish renews every key
    for k in first:
        assert await raw.pexpire(k, 3_601_000)
    await raw.hset(key(s, "meta"), "exp_ms", 0)
    await publish(store, s, event("plan_generated"))
    for k in first:
        assert 3_601_000 < await raw.pttl(k) <= 3_600_000 + SLACK_MS


async def test_every_key_the_first_publish_makes_in_a_session_created_without_events_expires(store, raw):
    s = sid()
    await store.put_connection(s, "c1", {"node_id": "n", "user_id": None, "events": ["*"]}, 60_000)
    assert await store.create(s, LIMITS.session_ttl_ms)  # a research start: meta only
    assert await raw.hget(key(s, "meta"), "exp_ms") is None  # no deadline kept: its first publish renews
    await publish(store, s, event())
    for name in ("meta", "stream", "dedup", "dedupz"):
        assert 3_600_000 - 1000 < await raw.pttl(key(s, name)) <= 3_600_000 + SLACK_MS


async def test_dedup_keys_swept_empty_and_made_again_by_the_same_publish_still_expire(store, raw):
    s = sid()
    await store.put_connection(s, "c1", {"node_id": "n", "user_id": None, "events": ["*"]}, 60_000)
    await publish(store, s, event(), now_ms=1_000)
    for k in (key(s, "dedup"), key(s, "dedupz")):
        assert await raw.pexpire(k, 3_601_000)  # shorter than a renewal: shows whether the next call renewed
    # the window has passed: the sweep empties both dedup keys, this publish's event id makes them again
    await publish(store, s, event(), now_ms=1_000 + LIMITS.dedup_window_ms + 1)
    assert await raw.zcard(key(s, "dedupz")) == 1
    for k in (key(s, "dedup"), key(s, "dedupz")):
        assert 3_601_000 < await raw.pttl(k) <= 3_600_000 + SLACK_MS


async def test_a_touch_of_more_sessions_than_one_pipeline_takes_reaches_every_one(store, raw):
    sessions = [sid() for _ in range(PIPELINE_CHUNK + 1)]  # one script call a session: two pipelines
    for s in sessions:
        await store.put_connection(s, "c1", {"node_id": "n", "user_id": None, "events": ["*"]}, 60_000)
    await store.touch(sessions, 5_000)
    for s in sessions:
        assert 0 < await raw.pttl(f"ab:{{{s}}}:conns") <= 5_000


async def test_a_session_whose_meta_expired_starts_afresh_even_if_other_keys_linger(store, raw):
    s = sid()
    await publish(store, s, event(event_id="a"), event(), event())
    await raw.delete(f"ab:{{{s}}}:meta")  # expiry removes keys one at a time
    result = await publish(store, s, event(event_id="a"))
    assert result.seqs == [1]  # a new life: seqs from 1, old ids forgotten
    assert [m.seq for m in (await store.read(s, 0)).messages] == [1]


# -- connections, queries, nodes -----------------------------------------------------------


async def test_connections_are_listed_with_their_id_and_dropped(store):
    s = sid()
    await store.put_connection(s, "c1", {"node_id": "n1", "user_id": "u1", "events": ["*"], "acked_seq": 3}, 60_000)
    await store.put_connection(s, "c2", {"node_id": "n2", "user_id": None, "events": ["a"], "updated_ms": 7}, 60_000)
    listed = await store.connections(s)
    assert [(c["connection_id"], c["node_id"], c.get("acked_seq")) for c in listed] == [
        ("c1", "n1", 3),
        ("c2", "n2", None),
    ]
    assert listed[1]["updated_ms"] == 7 and listed[0]["updated_ms"] > 0
    await store.drop_connection(s, "c1")
    assert [c["connection_id"] for c in await store.connections(s)] == ["c2"]
    with pytest.raises(ValueError, match="events"):
        await store.put_connection(s, "c3", {"node_id": "n"}, 60_000)


async def test_a_nodes_connections_of_many_sessions_are_written_in_bounded_pipelines(store):
    # more sessions than one pipeline takes (PIPELINE_CHUNK), and one session with more records
    # than one call takes: every record is written, none twice
    sessions = [sid() for _ in range(PIPELINE_CHUNK + 2)]
    owners = sessions * 2 + [sessions[0]] * 300
    records = [
        (s, f"c{n}", {"node_id": "n1", "user_id": None, "events": ["*"], "acked_seq": n}) for n, s in enumerate(owners)
    ]
    await store.write_connections(records, [], 60_000)
    for s in sessions:
        listed = await store.connections(s)
        assert sorted(c["acked_seq"] for c in listed) == [n for n, (owner, _, _) in enumerate(records) if owner == s]
    await store.write_connections([], [], 60_000)  # nothing to write: no call at all


async def test_one_query_at_a_time_per_session(store):
    s = sid()
    assert await store.lock_query(s, "q1", 60_000)
    assert not await store.lock_query(s, "q2", 60_000)  # busy
    assert await store.lock_query(s, "q1", 60_000)  # a retried call of the holder
    await store.unlock_query(s, "q2")  # not its lock: nothing happens
    assert not await store.lock_query(s, "q2", 60_000)
    await store.unlock_query(s, "q1")
    assert await store.lock_query(s, "q2", 50)

    async def expired() -> bool:
        return await store.lock_query(s, "q3", 60_000)

    assert await wait_until(expired, what="the lock of a query that never finished to expire")


async def test_live_nodes_are_those_heard_from_recently_and_the_silent_are_forgotten(store, raw):
    await store.heartbeat("n1")
    await store.heartbeat("n2")
    assert await store.live_nodes(10_000) == ["n1", "n2"]
    await raw.hset("ab:nodes", "n2", 1)  # last heard from in 1970
    assert await store.live_nodes(10_000) == ["n1"]
    assert await raw.hkeys("ab:nodes") == [b"n1"]


async def test_broadcast_and_canary_reach_subscribers(store, raw):
    pubsub = raw.pubsub()
    await pubsub.subscribe(store.broadcast_channel, store.canary_channel("n1"))
    try:
        for _ in range(2):
            assert (await pubsub.get_message(timeout=2))["type"] == "subscribe"
        await store.broadcast(b'{"hello":1}')
        await store.canary("n1", b"token")
        got = [(await pubsub.get_message(timeout=2))["data"] for _ in range(2)]
    finally:
        await pubsub.aclose()
    assert got == [b'{"hello":1}', b"token"]


# -- the channel payload -------------------------------------------------------------------


def test_a_payloads_newest_seq_is_read_for_one_life_only():
    from broker.cluster.payload import committed_through

    payload = b'E ep1\n4\tchunk\t\t{"a":1}\n5\ttask_progress\tt\t{"b":"x\\ty"}'
    assert committed_through(payload, b"E ep1\n") == 5
    assert committed_through(payload, b"E ep2\n") is None  # another life
    assert committed_through(payload, b"E ep\n") is None  # not a prefix of the epoch either
    assert committed_through(b"D ep1", b"E ep1\n") is None  # a deletion
    assert committed_through(b"E ep1\n", b"E ep1\n") is None  # no message


async def test_one_payload_per_publish_in_the_documented_format(store, raw):
    s = sid()
    pubsub = raw.pubsub()
    await pubsub.subscribe(store.events_channel(s))
    assert (await pubsub.get_message(timeout=2))["type"] == "subscribe"
    events = [event(note="tab\there\nnewline"), progress("t", 1), progress("t", 2), progress("x\ty", 3)]
    try:
        result = await publish(store, s, *events)
        payload = (await pubsub.get_message(timeout=2))["data"]
        await publish(store, s, progress("t", 3))  # held: nothing committed, nothing published
        assert await pubsub.get_message(timeout=0.2) is None
    finally:
        await pubsub.aclose()
    assert result.seqs == [1, 2, None, 3]
    head, *lines = payload.split(b"\n")
    epoch = (await store.read(s, 0)).epoch
    assert head == f"E {epoch}".encode()
    rows = [line.split(b"\t", 3) for line in lines]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (b"1", b"session_started", b""),
        (b"2", b"task_progress", b"t"),
        (b"3", b"task_progress", b""),  # a task_id with a separator in it is left out of the line
    ]
    for row, sent in zip(rows, [events[0], events[1], events[3]], strict=True):
        assert orjson.loads(row[3]) == {**sent, "seq": int(row[0]), "epoch": epoch}
    assert [m.data for m in (await store.read(s, 0)).messages] == [r[3] for r in rows]


async def test_a_publish_is_published_only_when_another_live_node_hears_the_session(store, raw):
    s = sid()
    limits = dataclasses.replace(LIMITS, connection_stale_ms=60_000)
    pubsub = raw.pubsub()
    await pubsub.subscribe(store.events_channel(s))
    assert (await pubsub.get_message(timeout=2))["type"] == "subscribe"
    try:
        alone = await publish(store, s, event(), origin="n1", limits=limits)
        assert (alone.published, alone.echo is not None) == (False, True)  # nobody marked: returned instead
        await store.ensure(s, 60_000, listener="n1")
        mine = await publish(store, s, event(), origin="n1", limits=limits)
        assert not mine.published  # only the caller hears it
        await store.ensure(s, 60_000, listener="n2")
        heard = await publish(store, s, event(), origin="n1", limits=limits, echo=True)
        assert heard.published
        # n2 stops restamping (it died): a stamp older than connection_stale_ms does not count, and goes
        await raw.hset(f"ab:{{{s}}}:listeners", "n2", 1)
        stale = await publish(store, s, event(), origin="n1", limits=limits)
        assert not stale.published
        assert await raw.hkeys(f"ab:{{{s}}}:listeners") == [b"n1"]
        await store.touch([s], 60_000, listener="n2")  # a touch restamps
        again = await publish(store, s, event(), origin="n1", limits=limits, echo=True)
        assert again.published
        unnamed = await publish(store, s, event(), limits=limits, echo=True)
        assert unnamed.published  # no origin: always published
        # what reached the channel: exactly the published ones, in order (nothing of the others came first)
        came = [(await pubsub.get_message(timeout=2))["data"] for _ in range(3)]
    finally:
        await pubsub.aclose()
    assert came == [heard.echo, again.echo, unnamed.echo]
    assert [r.seqs for r in (alone, mine, heard, stale, again, unnamed)] == [[1], [2], [3], [4], [5], [6]]


async def test_a_touch_names_the_sessions_whose_mark_had_lapsed(store, raw):
    """A node whose mark was missing or stale may have missed publishes that were not PUBLISHed: it must read them."""
    kept, lost, old = sid(), sid(), sid()
    for s in (kept, old):
        await store.ensure(s, 60_000, listener="n1")
    await store.ensure(lost, 60_000)  # never marked (or the mark was lost with Redis's data)
    await raw.hset(f"ab:{{{old}}}:listeners", "n1", 1)  # not restamped for longer than stale_ms
    assert await store.touch([kept, lost, old], 60_000, listener="n1", stale_ms=60_000) == [lost, old]
    assert await store.touch([kept, lost, old], 60_000, listener="n1", stale_ms=60_000) == []  # all marked now
    assert await store.touch([kept, lost], 60_000) == []  # without a listener nothing is marked or named


# -- round trips, scripts, faults ------------------------------------------------------------


class CountingConnection(Connection):
    """A real connection that counts what it sends: one send is one round trip."""

    sent = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).sent += 1
        await super().send_packed_command(command, check_health)


def counting_store(redis_server) -> RedisStore:
    pool = ConnectionPool(connection_class=CountingConnection, host="127.0.0.1", port=redis_server.port)
    return RedisStore(Redis(connection_pool=pool))


async def test_a_publish_of_a_whole_batch_is_one_round_trip(redis_server):
    store = counting_store(redis_server)
    s = sid()
    try:
        await publish(store, s, event())  # loads the script (NOSCRIPT, SCRIPT LOAD, EVALSHA)
        before = CountingConnection.sent
        result = await publish(store, s, *(event() for _ in range(10)), progress("t", 1), progress("t", 2))
        assert CountingConnection.sent - before == 1
        assert result.seqs[-1] is None and result.held
    finally:
        await store.close()


async def test_a_flushed_script_cache_is_reloaded_transparently(redis_server, store):
    s = sid()
    await publish(store, s, event())
    assert redis_server.command("SCRIPT", "FLUSH") == b"+OK\r\n"
    assert (await publish(store, s, event())).seqs == [2]
    assert (await store.read(s, 0)).last_seq == 2


async def test_a_stopped_redis_is_backend_unavailable_and_the_store_recovers_when_it_is_back(redis_server, store):
    s = sid()
    await publish(store, s, event())
    redis_server.stop()
    calls = (
        store.ping,
        lambda: publish(store, s, event()),
        lambda: store.read(s, 0),
        lambda: store.flush(s, "t", LIMITS),
    )
    for call in calls:
        with pytest.raises(BackendUnavailable, match="redis unavailable"):
            await call()
    redis_server.start()  # no persistence: Redis lost everything, the scripts too
    assert (await publish(store, s, event())).seqs == [1]
    await store.ping()


async def test_a_hung_redis_times_out_as_backend_unavailable_within_seconds(redis_server, store):
    s = sid()
    await publish(store, s, event())
    redis_server.pause()
    started = time.monotonic()
    try:
        with pytest.raises(BackendUnavailable, match="did not answer publish within"):
            async with asyncio.timeout(10):
                await publish(store, s, event(event_id="during"))
        waited = time.monotonic() - started
    finally:
        redis_server.resume()
    # the store's deadline: the pool's 2 s wait and two 1 s tries (not redis-py's 5 s default, not for ever)
    assert 3.5 < waited < 6
    # the outcome of a timed-out publish is unknown; the publisher's retry settles it exactly once
    retried = await publish(store, s, event(event_id="during"))
    assert retried.seqs == [2]
    assert ids_of(await store.read(s, 1)) == ["during"]


async def test_a_script_that_rejects_its_input_is_a_bug_not_unavailability(store, raw):
    s = sid()
    await publish(store, s, progress("t", 1))
    await raw.hset(f"ab:{{{s}}}:tasks", "t", "not json")
    with pytest.raises(rx.ResponseError) as caught:
        await publish(store, s, progress("t", 2))
    assert not isinstance(caught.value, BackendUnavailable)


async def test_bad_calls_get_clear_errors_before_reaching_redis(store):
    with pytest.raises(ValueError, match="invalid session id"):
        await publish(store, "no spaces", event())
    with pytest.raises(ValueError, match="not a non-empty JSON object"):
        await store.publish(sid(), [b"{}"], [EventMeta("e", "plan_generated")], LIMITS)
    with pytest.raises(ValueError, match="2 events but 1 metas"):
        await store.publish(sid(), [b'{"a":1}', b'{"a":1}'], [EventMeta("e", "x")], LIMITS)
    with pytest.raises(ValueError, match="after_seq"):
        await store.read(sid(), -1)


async def test_check_server_warns_about_an_evicting_redis(store, raw):
    assert await store.check_server() == []
    await raw.config_set("maxmemory-policy", "allkeys-lru")
    warnings = await store.check_server()
    assert len(warnings) == 1 and "noeviction" in warnings[0]


async def test_a_pool_kept_busy_is_reported_as_this_nodes_overload_not_as_redis_down(redis_server):
    """Every pooled connection held past the pool's wait: the call is refused as PoolExhausted (the node stays
    ready; a plain BackendUnavailable would mark Redis unreachable and refuse everything until the next check)."""
    from redis.asyncio import BlockingConnectionPool

    from broker.cluster.store import PoolExhausted

    pool = BlockingConnectionPool.from_url(redis_server.url, max_connections=1, timeout=0.2)
    store = RedisStore(Redis(connection_pool=pool))
    held = await pool.get_connection()  # the pool's one connection, busy until released
    try:
        with pytest.raises(PoolExhausted, match="pool exhausted during ping"):
            await store.ping()
    finally:
        await pool.release(held)
    await store.ping()  # released: the same store answers again
    await store.close()


async def test_connections_joining_and_leaving_are_written_together(store):
    s = sid()
    puts = [(s, f"c{n}", {"node_id": "n1", "user_id": None, "events": ["*"]}) for n in range(5)]
    await store.write_connections(puts, [], 60_000)
    await store.write_connections(puts[:1], [(s, "c1"), (s, "c2")], 60_000)
    assert sorted(c["connection_id"] for c in await store.connections(s)) == ["c0", "c3", "c4"]
