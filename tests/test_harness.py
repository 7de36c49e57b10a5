"""broker.testing: deterministic dispatch, manual clock, probes."""

from __future__ import annotations

import threading
import time
from typing import Any

import pykka
import pytest
from pykka import ActorRegistry

from actors.runtime import LoopActor
from broker.testing import ActorHarness


class Echo(LoopActor):
    """Replies to its peer; schedules a reminder through its clock."""

    def __init__(self, peer: Any) -> None:
        super().__init__()
        self.peer = peer

    def on_receive(self, message: Any) -> Any:
        if message.get("type") == "remind_me":
            self.tell_later(message["after"], {"type": "reminder", "at": None})
        elif message.get("type") == "reminder":
            self.peer.tell({"type": "reminder", "at": self.clock.monotonic()})
        elif message.get("type") == "ask":
            return "answer"
        else:
            self.peer.tell({"type": "echo", "text": message.get("text")})
        return None


def test_nothing_runs_until_the_test_says_so():
    with ActorHarness() as h:
        probe = h.probe()
        echo = Echo.start(probe.ref)
        echo.tell({"type": "say", "text": "hi"})
        assert probe.received == []
        h.run_until_idle()
        probe.expect(type="echo", text="hi")
        probe.expect_nothing()


def test_manual_clock_fires_timers_in_order_at_their_due_time():
    with ActorHarness() as h:
        probe = h.probe()
        echo = Echo.start(probe.ref)
        start = h.clock.monotonic()
        echo.tell({"type": "remind_me", "after": 30})
        echo.tell({"type": "remind_me", "after": 10})
        h.advance(9.99)
        probe.expect_nothing()
        h.advance(0.01)
        assert probe.expect(type="reminder")["at"] == pytest.approx(start + 10)
        h.advance(100)
        assert probe.expect(type="reminder")["at"] == pytest.approx(start + 30)
        assert h.clock.monotonic() == pytest.approx(start + 110.0)


def test_cancelled_timer_does_not_fire():
    with ActorHarness() as h:
        fired: list[int] = []
        handle = h.clock.call_later(5, lambda: fired.append(1))
        handle.cancel()
        h.advance(10)
        assert fired == []


def test_expect_failure_reads_well():
    with ActorHarness() as h:
        probe = h.probe("ui")
        Echo.start(probe.ref).tell({"type": "say", "text": "hello"})
        with pytest.raises(AssertionError) as info:
            probe.expect(type="echo", text="bye")
        message = str(info.value)
        assert "ui: next message does not match" in message
        assert "'text': 'hello'" in message
        with pytest.raises(AssertionError, match="expected a message"):
            h.probe("empty").expect(type="x")


def test_blocking_ask_runs_the_dispatcher_until_answered():
    with ActorHarness() as h:
        echo = Echo.start(h.probe().ref)
        assert echo.ask({"type": "ask"}) == "answer"


def test_blocking_get_of_a_reply_that_never_comes_fails_at_once():
    """The harness runs its actors until they settle: no answer then means none will come."""
    with ActorHarness():
        never_answered = LoopActor._create_future()
        with pytest.raises(pykka.Timeout):
            never_answered.get(timeout=60)


def test_blocking_ask_from_another_thread_waits_for_the_test_to_run_the_actors():
    with ActorHarness() as h:
        echo = Echo.start(h.probe().ref)
        answers: list[Any] = []
        thread = threading.Thread(target=lambda: answers.append(echo.ask({"type": "ask"}, timeout=30)))
        thread.start()
        deadline = time.monotonic() + 30
        while thread.is_alive() and time.monotonic() < deadline:
            h.run_until_idle()  # hands the thread's ask to the actor once it has arrived
            thread.join(timeout=0.001)
        assert answers == ["answer"]


def test_order_is_reproducible():
    def run_once() -> list[Any]:
        with ActorHarness(batch=2) as h:
            probe = h.probe()
            actors = [Echo.start(probe.ref) for _ in range(3)]
            h.run_until_idle()  # on_start of each
            for i in range(5):
                for n, a in enumerate(actors):
                    a.tell({"type": "say", "text": f"{n}:{i}"})
            h.run_until_idle()
            return [m["text"] for m in probe.received]

    first = run_once()
    assert first == run_once()
    # batch=2 interleaves the three actors two messages at a time
    assert first[:6] == ["0:0", "0:1", "1:0", "1:1", "2:0", "2:1"]


def test_tells_from_other_threads_are_delivered_on_the_next_run():
    with ActorHarness() as h:
        probe = h.probe()
        echo = Echo.start(probe.ref)
        h.run_until_idle()
        thread = threading.Thread(target=lambda: [echo.tell({"type": "say", "text": i}) for i in range(100)])
        thread.start()
        thread.join()
        h.run_until_idle()
        assert [m["text"] for m in probe.received] == list(range(100))


def test_exit_stops_every_actor_it_started():
    with ActorHarness() as h:
        refs = [Echo.start(h.probe().ref) for _ in range(3)]
    assert not any(r.is_alive() for r in refs)
    assert not [r for r in ActorRegistry.get_all() if r in refs]


def test_actors_that_never_settle_are_reported():
    class PingPong(LoopActor):
        def on_receive(self, message: Any) -> None:
            self.actor_ref.tell(message)

    with ActorHarness() as h:
        PingPong.start().tell("x")
        with pytest.raises(RuntimeError, match="did not settle"):
            h.dispatcher.run_until_idle(max_turns=1000)
        h.dispatcher._ready.clear()


def test_harness_does_not_read_the_real_clock():
    with ActorHarness() as h:
        before = h.clock.monotonic()
        time.perf_counter()
        assert h.clock.monotonic() == before
