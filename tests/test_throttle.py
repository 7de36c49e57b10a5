"""ProgressThrottle: the task_progress rules of docs/protocol.md section 2.7, with explicit times."""

from __future__ import annotations

from actors.throttle import Offer, ProgressThrottle, Verdict

DELIVER, HOLD, DISCARD = Verdict.DELIVER, Verdict.HOLD, Verdict.DISCARD


def ev(progress: float, action: str | None = None) -> dict:
    event: dict = {"type": "task_progress", "task_id": "t1", "progress": progress}
    if action is not None:
        event["current_action"] = action
    return event


def test_first_event_is_delivered() -> None:
    th = ProgressThrottle()
    assert th.offer("t1", ev(37), 0.0) == Offer(DELIVER, None, None)
    assert th.held_count() == 0


def test_small_step_is_held_with_timer_from_last_delivery() -> None:
    th = ProgressThrottle()
    th.offer("t1", ev(10), 0.0)
    assert th.offer("t1", ev(12), 0.25) == Offer(HOLD, None, 1.0)
    assert th.held_count() == 1


def test_step_of_exactly_min_delta_is_delivered_both_directions() -> None:
    th = ProgressThrottle()
    th.offer("t1", ev(50), 0.0)
    assert th.offer("t1", ev(45), 0.1).verdict is DELIVER
    assert th.offer("t1", ev(50), 0.2).verdict is DELIVER
    assert th.offer("t1", ev(54.9), 0.3).verdict is HOLD
    assert th.offer("t1", ev(45.1), 0.4).verdict is HOLD


def test_zero_and_hundred_are_always_delivered() -> None:
    th = ProgressThrottle()
    th.offer("t1", ev(2), 0.0)
    assert th.offer("t1", ev(0), 0.1).verdict is DELIVER
    assert th.offer("t1", ev(0), 0.2).verdict is DELIVER
    th.offer("t1", ev(98), 0.3)
    assert th.offer("t1", ev(100), 0.4).verdict is DELIVER
    assert th.offer("t1", ev(100), 0.5).verdict is DELIVER


def test_current_action_change_is_delivered_and_same_action_is_held() -> None:
    th = ProgressThrottle()
    th.offer("t1", ev(10, "reading"), 0.0)
    assert th.offer("t1", ev(11, "reading"), 0.1).verdict is HOLD
    held = ev(12, "reading")
    th.offer("t1", held, 0.2)
    offer = th.offer("t1", ev(12, "writing"), 0.3)
    assert offer.verdict is DELIVER
    assert offer.superseded is held


def test_missing_current_action_counts_as_none() -> None:
    th = ProgressThrottle()
    th.offer("t1", ev(10), 0.0)
    assert th.offer("t1", {"progress": 11, "current_action": None}, 0.1).verdict is HOLD
    assert th.offer("t1", ev(11, "x"), 0.2).verdict is DELIVER
    assert th.offer("t1", ev(11), 0.3).verdict is DELIVER


def test_newer_hold_supersedes_older_and_only_newest_is_flushed() -> None:
    th = ProgressThrottle()
    th.offer("t1", ev(10), 0.0)
    first, second = ev(11), ev(12)
    assert th.offer("t1", first, 0.1) == Offer(HOLD, None, 1.0)
    assert th.offer("t1", second, 0.2) == Offer(HOLD, first, None)
    assert th.held_count() == 1
    assert th.flush("t1", 1.0) == (second, None)
    assert th.held_count() == 0
    assert th.flush("t1", 2.5) == (None, None)


def test_flushed_event_becomes_the_last_delivery() -> None:
    th = ProgressThrottle()
    th.offer("t1", ev(10), 0.0)
    th.offer("t1", ev(13), 0.5)
    th.flush("t1", 1.0)
    # Measured from 13 now, not 10: 17 is within delta, 18 is not.
    assert th.offer("t1", ev(17), 1.1) == Offer(HOLD, None, 2.0)
    assert th.offer("t1", ev(18), 1.2).verdict is DELIVER


def test_flush_before_due_returns_new_flush_at() -> None:
    th = ProgressThrottle(max_interval=1.0)
    th.offer("t1", ev(10), 0.0)
    held = ev(11)
    assert th.offer("t1", held, 0.1).flush_at == 1.0
    th.max_interval = 3.0
    assert th.flush("t1", 1.0) == (None, 3.0)
    # That new timer is the pending one: further holds ask for no other.
    assert th.offer("t1", ev(12), 2.0) == Offer(HOLD, held, None)
    assert th.flush("t1", 3.0) == (ev(12), None)


def test_flush_after_a_delivery_in_between_finds_nothing() -> None:
    th = ProgressThrottle()
    th.offer("t1", ev(10), 0.0)
    held = ev(11)
    th.offer("t1", held, 0.1)
    assert th.offer("t1", ev(20), 0.5) == Offer(DELIVER, held, None)
    assert th.flush("t1", 1.0) == (None, None)
    assert th.held_count() == 0


def test_trailing_edge_counts_from_last_delivery_not_last_offer() -> None:
    th = ProgressThrottle()
    th.offer("t1", ev(10), 0.0)
    assert th.offer("t1", ev(11), 0.9).flush_at == 1.0  # not 1.9
    assert th.offer("t1", ev(12), 0.95).flush_at is None
    assert th.flush("t1", 1.0) == (ev(12), None)
    # Last delivery was the flush at 1.0, so the next timer is due at 2.0.
    assert th.offer("t1", ev(13), 1.5).flush_at == 2.0


def test_hold_long_after_last_delivery_asks_for_an_immediate_flush() -> None:
    th = ProgressThrottle()
    th.offer("t1", ev(10), 0.0)
    assert th.offer("t1", ev(11), 7.0) == Offer(HOLD, None, 7.0)
    assert th.flush("t1", 7.0) == (ev(11), None)


def test_flush_at_is_returned_once_per_pending_timer() -> None:
    th = ProgressThrottle()
    th.offer("t1", ev(10), 0.0)
    flush_ats = [th.offer("t1", ev(11 + i * 0.1), 0.1 + i * 0.1).flush_at for i in range(5)]
    assert flush_ats == [1.0, None, None, None, None]
    th.flush("t1", 1.0)
    assert th.offer("t1", ev(12), 1.1).flush_at == 2.0
    assert th.offer("t1", ev(12.5), 1.2).flush_at is None


def test_delivery_while_timer_pending_keeps_that_timer() -> None:
    th = ProgressThrottle()
    th.offer("t1", ev(10), 0.0)
    th.offer("t1", ev(11), 0.1)  # timer for 1.0 set
    th.offer("t1", ev(20), 0.5)  # delivered; the 1.0 timer is still out there
    assert th.offer("t1", ev(21), 0.6).flush_at is None
    assert th.flush("t1", 1.0) == (None, 1.5)
    assert th.flush("t1", 1.5) == (ev(21), None)


def test_finish_discards_held_and_returns_it() -> None:
    th = ProgressThrottle()
    th.offer("t1", ev(10), 0.0)
    held = ev(11)
    th.offer("t1", held, 0.1)
    assert th.finish("t1") is held
    assert th.held_count() == 0
    assert th.flush("t1", 1.0) == (None, None)
    assert th.finish("t1") is None


def test_finish_without_anything_held_returns_none() -> None:
    th = ProgressThrottle()
    assert th.finish("never-seen") is None
    th.offer("t1", ev(10), 0.0)
    assert th.finish("t1") is None


def test_progress_after_finish_is_discarded() -> None:
    th = ProgressThrottle()
    th.offer("t1", ev(10), 0.0)
    th.finish("t1")
    assert th.offer("t1", ev(50), 0.1) == Offer(DISCARD, None, None)
    assert th.offer("t1", ev(100), 0.2) == Offer(DISCARD, None, None)
    th.finish("t2")  # completed before any progress
    assert th.offer("t2", ev(0), 0.3).verdict is DISCARD
    assert th.held_count() == 0


def test_task_started_after_finish_starts_afresh() -> None:
    th = ProgressThrottle()
    th.offer("t1", ev(10), 0.0)
    th.finish("t1")
    th.start("t1")
    assert th.offer("t1", ev(11), 0.1) == Offer(DELIVER, None, None)
    assert th.offer("t1", ev(12), 0.2) == Offer(HOLD, None, 1.1)


def test_restart_while_old_timer_pending_asks_for_no_second_timer() -> None:
    th = ProgressThrottle()
    th.offer("t1", ev(10), 0.0)
    th.offer("t1", ev(11), 0.1)  # timer for 1.0 set
    th.finish("t1")
    th.start("t1")
    th.offer("t1", ev(20), 0.5)
    assert th.offer("t1", ev(21), 0.6).flush_at is None
    assert th.flush("t1", 1.0) == (None, 1.5)
    assert th.flush("t1", 1.5) == (ev(21), None)


def test_task_started_on_running_task_changes_nothing() -> None:
    th = ProgressThrottle()
    th.offer("t1", ev(10), 0.0)
    held = ev(11)
    th.offer("t1", held, 0.1)
    th.start("t1")
    assert th.held_count() == 1
    assert th.offer("t1", ev(12), 0.2) == Offer(HOLD, held, None)
    assert th.flush("t1", 1.0) == (ev(12), None)
    th.start("t-unknown")
    assert th.offer("t-unknown", ev(5), 0.3).verdict is DELIVER


def test_tasks_are_independent() -> None:
    th = ProgressThrottle()
    assert th.offer("a", ev(10), 0.0).verdict is DELIVER
    assert th.offer("b", ev(11), 0.1).verdict is DELIVER  # first for b
    a_held, b_held = ev(12), ev(13)
    assert th.offer("a", a_held, 0.2) == Offer(HOLD, None, 1.0)
    assert th.offer("b", b_held, 0.3) == Offer(HOLD, None, 1.1)
    assert th.held_count() == 2
    assert th.finish("a") is a_held
    assert th.offer("a", ev(50), 0.4).verdict is DISCARD
    assert th.flush("b", 1.1) == (b_held, None)
    assert th.flush("a", 1.0) == (None, None)
    assert th.held_count() == 0


def test_settings_changed_at_runtime_take_effect() -> None:
    th = ProgressThrottle()
    th.offer("t1", ev(10), 0.0)
    held = ev(12)
    assert th.offer("t1", held, 0.25) == Offer(HOLD, None, 1.0)
    th.min_delta = 2
    assert th.offer("t1", ev(12), 0.5) == Offer(DELIVER, held, None)
    th.min_delta = 20
    th.max_interval = 0.5
    assert th.flush("t1", 1.0) == (None, None)
    assert th.offer("t1", ev(25), 1.25) == Offer(HOLD, None, 1.25)  # 0.5 + 0.5 is already past
    assert th.flush("t1", 1.25) == (ev(25), None)
    th.max_interval = 2.0
    assert th.offer("t1", ev(26), 1.5) == Offer(HOLD, None, 3.25)
    th.max_interval = 0.25  # the pending timer stands; the next one uses the new value
    assert th.flush("t1", 3.25) == (ev(26), None)
    assert th.offer("t1", ev(27), 3.375) == Offer(HOLD, None, 3.5)


def test_forget_drops_everything() -> None:
    th = ProgressThrottle()
    th.offer("t1", ev(10), 0.0)
    th.offer("t1", ev(11), 0.1)
    th.finish("t2")
    th.forget()
    assert th.held_count() == 0
    assert th.flush("t1", 1.0) == (None, None)
    assert th.offer("t1", ev(11), 0.2).verdict is DELIVER
    assert th.offer("t2", ev(11), 0.2).verdict is DELIVER


def run_stream(th: ProgressThrottle, steps: int = 101, dt: float = 0.01) -> list[float]:
    """Feed progress 0..steps-1 at `dt` apart, the way a session actor would.

    Timers are serviced on the same `dt` tick, before that tick's event: a timer
    due at 0.025 fires at 0.03. Event times stay exact multiples of `dt`, so no
    comparison hinges on float rounding. Returns the progress values delivered.
    """
    delivered: list[float] = []
    timer: float | None = None
    for i in range(steps):
        now = i * dt
        if timer is not None and timer <= now:
            event, timer = th.flush("t1", now)
            if event is not None:
                delivered.append(event["progress"])
        offer = th.offer("t1", ev(i), now)
        if offer.verdict is DELIVER:
            delivered.append(i)
        if offer.flush_at is not None:
            assert timer is None, "asked for a second timer"
            timer = offer.flush_at
    while timer is not None:
        event, timer = th.flush("t1", timer)
        if event is not None:
            delivered.append(event["progress"])
    assert th.held_count() == 0
    return delivered


def test_realistic_stream_with_defaults_delivers_every_fifth() -> None:
    # One step per 10 ms: a 5-point change comes every 50 ms, long before the
    # 1 s trailing edge, so the delta rule alone decides; 100 always goes out.
    assert run_stream(ProgressThrottle()) == list(range(0, 101, 5))


def test_realistic_stream_where_the_trailing_edge_decides() -> None:
    # min_delta 10 is never reached: after each delivery at step k, steps k+1
    # and k+2 are held and the 25 ms timer is serviced at step k+3, before
    # event k+3, delivering k+2 (k+1 was superseded). That gives 0, 2, 5, 8, ..., 98; then 100 goes out
    # as 100 and discards the held 99.
    expected = [0, *range(2, 100, 3), 100]
    assert run_stream(ProgressThrottle(min_delta=10, max_interval=0.025)) == expected
