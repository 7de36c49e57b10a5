"""The actor runtime on a real Tornado IOLoop: pykka semantics, threads, fairness."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pykka
import pytest
from pykka import ActorDeadError, ActorRegistry
from tornado.ioloop import IOLoop

from actors.runtime import BlockingGetError, LoopActor, LoopDispatcher, install_dispatcher


@pytest.fixture
def dispatcher(io_loop: IOLoop):
    d = LoopDispatcher(io_loop, batch=8, turns_per_tick=64)
    previous = install_dispatcher(d)
    yield d
    for ref in ActorRegistry.get_all():
        if getattr(ref.actor_inbox, "dispatcher", None) is d:
            ref.stop(block=False)
    io_loop.run_sync(lambda: asyncio.sleep(0))  # let the stops run  # noqa: sleep
    install_dispatcher(previous)


class Recorder(LoopActor):
    def __init__(self, log: list[Any] | None = None, name: str = "") -> None:
        super().__init__()
        self.log = log if log is not None else []
        self.name = name
        self.events: list[str] = []

    def on_start(self) -> None:
        self.events.append("start")

    def on_stop(self) -> None:
        self.events.append("stop")

    def on_receive(self, message: Any) -> Any:
        if message == "boom":
            raise ValueError("boom")
        if message == "get":
            return list(self.log)
        if message == "events":
            return list(self.events)
        self.log.append((self.name, message))
        return None

    def add(self, a: int, b: int) -> int:
        return a + b


async def until(predicate, loops: int = 10_000) -> None:
    """Yield to the loop until `predicate()` holds (bounded; not a sleep)."""
    for _ in range(loops):
        if predicate():
            return
        await asyncio.sleep(0)  # noqa: sleep
    raise AssertionError("condition never became true")


async def test_tell_and_ask_are_answered_in_order(dispatcher):
    ref = Recorder.start()
    for i in range(100):
        ref.tell(i)
    assert await ref.ask("get", block=False) == [("", i) for i in range(100)]


async def test_proxy_calls_and_attributes_can_be_awaited(dispatcher):
    proxy = Recorder.start(name="p").proxy()
    assert await proxy.add(2, 3) == 5
    assert await proxy.name == "p"


async def test_on_start_runs_before_first_message_and_on_stop_at_the_end(dispatcher):
    log: list[Any] = []
    ref = Recorder.start(log)
    ref.tell("x")
    assert await ref.ask("events", block=False) == ["start"]
    actor = ref._actor_weakref()
    assert await ref.stop(block=False) is True
    assert actor.events == ["start", "stop"]
    assert not ref.is_alive()


async def test_stop_processes_messages_ahead_of_it(dispatcher):
    log: list[Any] = []
    ref = Recorder.start(log)
    for i in range(50):
        ref.tell(i)
    stopped = ref.stop(block=False)
    assert await stopped is True
    assert [m for _, m in log] == list(range(50))


async def test_ask_after_stop_fails_with_actor_dead(dispatcher):
    ref = Recorder.start()
    await ref.stop(block=False)
    with pytest.raises(ActorDeadError):
        await ref.ask("get", block=False)
    with pytest.raises(ActorDeadError):
        ref.tell("late")
    assert await ref.stop(block=False) is False


async def test_asks_queued_behind_stop_fail_with_actor_dead(dispatcher):
    ref = Recorder.start()
    stop = ref.stop(block=False)
    # Queued after the stop message, before the actor ran: pykka answers ActorDeadError.
    late = ref._actor_weakref().actor_inbox
    future = ref.actor_class._create_future()
    late.put(pykka._envelope.Envelope("get", reply_to=future))
    assert await stop is True
    with pytest.raises(ActorDeadError):
        await future


async def test_exception_in_tell_stops_only_that_actor(dispatcher, caplog):
    failures: list[str] = []

    class Fragile(Recorder):
        def on_failure(self, exc_type, exc_value, tb) -> None:
            failures.append(str(exc_value))

    bad = Fragile.start()
    good = Recorder.start()
    with caplog.at_level(logging.ERROR, logger="pykka"):
        bad.tell("boom")
        bad_is_dead = until(lambda: not bad.is_alive())
        await bad_is_dead
    assert failures == ["boom"]
    assert "Unhandled exception" in caplog.text
    assert bad not in ActorRegistry.get_all()
    good.tell("still here")
    assert await good.ask("get", block=False) == [("", "still here")]


async def test_exception_in_ask_goes_to_caller_and_actor_lives(dispatcher):
    ref = Recorder.start()
    with pytest.raises(ValueError, match="boom"):
        await ref.ask("boom", block=False)
    assert ref.is_alive()
    assert await ref.ask("get", block=False) == []


async def test_exception_in_on_start_stops_the_actor(dispatcher):
    class BadStart(LoopActor):
        def on_start(self) -> None:
            raise RuntimeError("no start")

    ref = BadStart.start()
    await until(lambda: not ref.is_alive())


async def test_tell_from_eight_threads_loses_nothing(dispatcher):
    ref = Recorder.start()
    per_thread = 2_000

    def send(tid: int) -> None:
        for i in range(per_thread):
            ref.tell((tid, i))

    threads = [threading.Thread(target=send, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    await until(lambda: not any(t.is_alive() for t in threads), loops=10_000_000)
    actor = ref._actor_weakref()
    # Cross-thread tells hop over the loop; wait until they have all landed.
    await until(lambda: len(actor.log) >= 8 * per_thread, loops=10_000_000)
    log = await ref.ask("get", block=False)
    assert len(log) == 8 * per_thread
    for tid in range(8):  # each thread's messages arrive in the order it sent them
        assert [i for _, (t, i) in log if t == tid] == list(range(per_thread))


async def test_ask_get_from_another_thread_blocks_until_answer(dispatcher):
    ref = Recorder.start()
    ref.tell("a")
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(ref.ask("get", timeout=5)))
    thread.start()
    await until(lambda: not thread.is_alive(), loops=10_000_000)
    assert results == [[("", "a")]]


async def test_blocking_get_on_the_loop_thread_raises_instead_of_deadlocking(dispatcher):
    ref = Recorder.start()
    with pytest.raises(BlockingGetError, match="await"):
        ref.ask("get")  # block=True on the loop thread


async def test_get_from_another_thread_times_out_when_no_answer_comes(dispatcher):
    never_answered = LoopActor._create_future()
    outcome: list[BaseException] = []

    def wait() -> None:
        try:
            never_answered.get(timeout=0.01)
        except pykka.Timeout as exc:
            outcome.append(exc)

    thread = threading.Thread(target=wait)
    thread.start()
    await until(lambda: not thread.is_alive(), loops=10_000_000)
    assert [type(e) for e in outcome] == [pykka.Timeout]


async def test_stop_future_and_mapped_futures_can_be_awaited(dispatcher):
    ref = Recorder.start()
    ref.tell(1)
    doubled = ref.ask("get", block=False).map(len)
    assert await doubled == 1
    assert await ref.stop(block=False) is True


async def test_fairness_a_flooded_actor_does_not_starve_another(dispatcher):
    order: list[str] = []
    flooded = Recorder.start(order, name="flood")
    other = Recorder.start(order, name="other")
    await until(lambda: not dispatcher._ready)  # both started
    for i in range(1_000):
        flooded.tell(i)
    other.tell("hello")
    await until(lambda: ("other", "hello") in order)
    # batch=8: the other actor runs after at most one batch of the flood.
    assert order.index(("other", "hello")) <= 8
    await until(lambda: len(order) == 1_001)


async def test_loop_stays_responsive_while_actors_are_busy(dispatcher, io_loop):
    ref = Recorder.start()
    for i in range(20_000):
        ref.tell(i)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)  # noqa: sleep

    task = asyncio.ensure_future(ticker())
    log = await ref.ask("get", block=False)
    task.cancel()
    assert len(log) == 20_000
    # 20 000 messages in turns of 8 messages, 64 turns a tick: the loop got
    # control back dozens of times instead of once at the end.
    assert ticks >= 20


async def test_registry_lookup_and_broadcast(dispatcher):
    class Named(Recorder):
        pass

    a = Named.start(name="a")
    b = Named.start(name="b")
    assert {r.actor_urn for r in ActorRegistry.get_by_class(Named)} == {a.actor_urn, b.actor_urn}
    assert ActorRegistry.get_by_urn(a.actor_urn) is a
    ActorRegistry.broadcast("hi", target_class=Named)
    assert await a.ask("get", block=False) == [("a", "hi")]
    assert await b.ask("get", block=False) == [("b", "hi")]
    await a.stop(block=False)
    assert ActorRegistry.get_by_urn(a.actor_urn) is None
    assert a not in ActorRegistry.get_all()


async def test_timer_delivers_message_after_delay(dispatcher):
    class Timed(Recorder):
        def on_start(self) -> None:
            self.tell_later(0.01, "tick")

    ref = Timed.start()
    await asyncio.sleep(0.05)  # noqa: sleep - the real clock is what is under test
    assert await ref.ask("get", block=False) == [("", "tick")]


def test_no_dispatcher_is_a_clear_error():
    previous = install_dispatcher(None)
    try:
        with pytest.raises(RuntimeError, match="no actor dispatcher installed"):
            Recorder.start()
    finally:
        install_dispatcher(previous)


def test_drained_mailboxes_are_reused_and_the_spares_are_bounded():
    from actors.runtime import SPARE_QUEUES_MAX
    from broker.testing import ActorHarness

    with ActorHarness() as harness:
        spares = harness.dispatcher.spare_queues
        a, b = Recorder.start(), Recorder.start()
        harness.run_until_idle()
        a.tell("one")
        harness.run_until_idle()
        assert a.actor_inbox.queue is None, "an idle actor holds no deque"
        spare = spares[-1]
        b.tell("two")
        assert b.actor_inbox.queue is spare, "the next mail reuses the drained deque"
        harness.run_until_idle()
        assert b._actor_weakref().log == [("", "two")]

        many = [Recorder.start() for _ in range(SPARE_QUEUES_MAX + 50)]
        harness.run_until_idle()
        for ref in many:
            ref.tell("x")
        harness.run_until_idle()
        assert len(spares) == SPARE_QUEUES_MAX
        assert all(len(q) == 0 for q in spares)
        assert all(ref.actor_inbox.queue is None for ref in many)
        for ref in [a, b, *many]:
            ref.stop(block=False)
        harness.run_until_idle()


def test_installing_a_dispatcher_makes_the_registry_o1_and_keeps_earlier_refs():
    """Connection churn unregisters thousands of actors: pykka's list store would scan them all.

    No wall-clock assert (project rule): the store is what is checked, and
    that refs registered before the install are kept, in order.
    """
    from actors.registry import OrderedRefSet
    from broker.testing import ActorHarness

    with ActorHarness() as harness:
        first, second = Recorder.start(name="first"), Recorder.start(name="second")
        with ActorRegistry._actor_refs_lock:  # as pykka leaves it before any dispatcher
            ActorRegistry._actor_refs = list(ActorRegistry._actor_refs)
        try:
            previous = install_dispatcher(harness.dispatcher)
            assert isinstance(ActorRegistry._actor_refs, OrderedRefSet)
            assert [r for r in ActorRegistry.get_all() if r in (first, second)] == [first, second]
            first.stop(block=False)
            harness.run_until_idle()
            assert first not in ActorRegistry.get_all()
            assert ActorRegistry.get_by_urn(second.actor_urn) is second
            install_dispatcher(previous)
        finally:
            from actors.registry import install_fast_registry

            install_fast_registry()  # never leave the process with the list store


RUNTIME_MODULES = {"dispatcher.py", "future.py", "inbox.py", "registry.py", "runtime.py"}


def pykka_internals_used(path) -> list[str]:
    """pykka's private modules and private names that `path` imports or reads."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pykka"):
            if node.module.startswith("pykka._") or node.module == "pykka.messages":
                found.append(node.module)
            found += [f"pykka.{a.name}" for a in node.names if a.name.startswith("_") or a.name == "messages"]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("pykka._")]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            base = ast.unparse(node.value)
            if base in {"pykka", "ActorRegistry", "pykka.ActorRegistry", "messages", "pykka.messages"}:
                found.append(f"{base}.{node.attr}")
    return found


def test_only_the_runtime_modules_touch_pykka_internals():
    """pykka is pinned to its minor version for the runtime's sake; nothing else may lean on its insides."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    offenders = {
        str(path.relative_to(root)): used
        for package in ("actors", "broker", "handlers")
        for path in sorted((root / package).glob("*.py"))
        if not (package == "actors" and path.name in RUNTIME_MODULES)
        if (used := pykka_internals_used(path))
    }
    assert offenders == {}
    assert pykka_internals_used(root / "actors" / "inbox.py"), "the check sees the runtime's own use"
