"""The connection's policy objects, numbers in and decisions out: Outbox, Heartbeat, DedupWindow,
RateBucket and ErrorWindow, and the replay planner. No actors, no clock."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

import pytest

from actors.client_input import ClientInputError, ErrorWindow, RateBucket, parse_client_message
from actors.dedup import DedupWindow
from actors.filters import ALL, parse_events_param
from actors.heartbeat import Heartbeat
from actors.history import MemoryHistory
from actors.messages import CloseConnection, Frame
from actors.outbox import Outbox
from actors.replay import BeyondNewestError, replay_frames


def live(size: int, task_id: str | None = None, seq: int | None = None) -> Frame:
    return Frame(b"x" * size, "task_progress" if task_id else "chunk", seq, task_id)


# -- Outbox --------------------------------------------------------------------


def test_outbox_batches_up_to_the_chunk_size_but_always_takes_one():
    box = Outbox()
    for _ in range(3):
        box.push_live(live(40))
    assert box.unsent_live_bytes == 120
    first = box.next_batch(max_bytes=100)
    assert isinstance(first, list) and len(first) == 2
    assert box.inflight and box.unsent_live_bytes == 120  # queued 40 + in flight 80
    box.taken()
    assert box.unsent_live_bytes == 40
    big = Outbox()
    big.push_live(live(500))
    batch = big.next_batch(max_bytes=100)
    assert isinstance(batch, list) and len(batch) == 1  # a frame larger than the chunk still goes


def test_replayed_frames_are_written_but_never_counted():
    box = Outbox()
    box.push_replayed([live(1000, seq=1), live(1000, seq=2)])
    box.push_live(live(10))
    assert box.unsent_live_bytes == 10
    batch = box.next_batch()
    assert isinstance(batch, list) and [f.seq for f in batch] == [1, 2, None]
    assert box.sent_messages == 3 and box.sent_bytes == 2010


def test_a_close_waits_for_what_was_queued_before_it():
    box = Outbox()
    box.push_live(live(10))
    box.push_close(CloseConnection(1000, "bye"))
    box.push_live(live(10))  # after the close: never written
    batch = box.next_batch()
    assert isinstance(batch, list) and len(batch) == 1
    box.taken()
    close = box.next_batch()
    assert isinstance(close, CloseConnection) and close.reason == "bye"
    assert box.next_batch() is None and box.unsent_live_bytes == 0


def test_shed_drops_superseded_progress_then_decides_slow():
    box = Outbox()
    box.push_live(live(100))  # in flight: never compacted
    box.next_batch()
    for _ in range(3):
        box.push_live(live(100, task_id="t1"))
    box.push_live(live(100, task_id="t2"))
    box.push_live(live(100))  # not progress: kept
    assert box.shed(limit=400) == (2, False)  # two older t1 went; 100 + 300 left, not over
    assert box.unsent_live_bytes == 400
    box.push_live(live(100))
    assert box.shed(limit=400) == (0, True)  # nothing more to drop: a slow consumer


def test_one_message_however_large_is_never_over():
    box = Outbox()
    box.push_live(live(10_000))
    assert box.shed(limit=100) == (0, False)
    box.next_batch()
    assert box.shed(limit=100) == (0, False)  # only the write in flight


# -- Heartbeat -----------------------------------------------------------------


@dataclass(frozen=True)
class S:
    keepalive_interval: float = 25.0
    ws_ping_interval: float = 20.0
    ws_ping_timeout: float = 10.0
    buffer_size: int = 100
    session_ttl: float = 3600.0
    dedup_window: float = 300.0
    min_delta: float = 5.0
    max_interval_ms: int = 1000
    max_queue_bytes: int = 1 << 20
    max_client_errors: int = 10
    max_client_rate: float = 50
    presets: MappingProxyType[str, frozenset[str]] = field(default_factory=lambda: MappingProxyType({}))


def test_heartbeat_probes_then_gives_up_on_a_silent_peer():
    settings = S()
    beat = Heartbeat(0.0, settings)
    assert beat.delay(0.0, last_write=0.0, settings=settings) == 20.0
    first = beat.tick(20.0, last_write=0.0, answered=True, writing=False, settings=settings)
    assert first.probe and not first.keepalive and not first.dead
    assert beat.delay(20.0, last_write=0.0, settings=settings) == 5.0  # keepalive at 25 comes before the deadline
    second = beat.tick(25.0, last_write=0.0, answered=False, writing=False, settings=settings)
    assert second.keepalive and not second.dead
    assert beat.tick(30.0, last_write=25.0, answered=False, writing=False, settings=settings).dead


def test_heartbeat_answered_probe_and_recent_writes_mean_nothing_to_do():
    settings = S()
    beat = Heartbeat(0.0, settings)
    beat.tick(20.0, last_write=19.0, answered=True, writing=False, settings=settings)
    quiet = beat.tick(30.0, last_write=29.0, answered=True, writing=False, settings=settings)
    assert not (quiet.dead or quiet.probe or quiet.keepalive)
    assert not beat.tick(60.0, last_write=0.0, answered=True, writing=True, settings=settings).keepalive


def test_heartbeat_off_when_both_intervals_are_zero():
    settings = S(keepalive_interval=0, ws_ping_interval=0)
    assert Heartbeat(0.0, settings).delay(0.0, 0.0, settings) is None


# -- dedup, rate, errors -----------------------------------------------------


def test_dedup_window_remembers_seqs_and_forgets_old_ids():
    window = DedupWindow()
    window.accept("a", now=0.0)
    window.accept("b", now=10.0)
    assert window.seen("a") and window.seq_of("a") is None
    window.assign("a", 7)
    window.assign("zzz", 9)  # never accepted: nothing remembered
    assert window.seq_of("a") == 7 and not window.seen("zzz")
    window.forget_before(5.0)
    assert not window.seen("a") and window.seen("b") and len(window) == 1


def test_rate_bucket_allows_a_burst_then_refills_at_the_rate():
    bucket = RateBucket(rate=2, now=0.0)
    assert [bucket.take(2, 0.0) for _ in range(3)] == [True, True, False]
    assert bucket.take(2, 0.5) and not bucket.take(2, 0.5)


def test_error_window_is_a_sliding_sixty_seconds():
    window = ErrorWindow()
    assert [window.add(t) for t in (0.0, 30.0, 59.0)] == [1, 2, 3]
    assert window.add(60.0) == 3  # the one at 0 left the window


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"{}", "bad_json"),
        ("nope", "bad_json"),
        ("[1]", "bad_json"),
        ('{"x": 1}', "bad_message"),
        ('{"type": "zap"}', "unknown_type"),
    ],
)
def test_client_input_errors_carry_the_protocol_code(data, code):
    with pytest.raises(ClientInputError) as caught:
        parse_client_message(data, {"ping"})
    assert caught.value.code == code


# -- replay --------------------------------------------------------------------


def history_of(n: int, size: int = 100) -> MemoryHistory:
    history = MemoryHistory(size)
    for _ in range(n):
        seq = history.next_seq()
        history.append(Frame(b"{}", "task_started" if seq % 2 else "chunk", seq))
    return history


def seqs(frames: list[Frame]) -> list[int | None]:
    return [f.seq for f in frames]


def test_replay_after_last_seq_and_a_gap_for_what_was_evicted():
    history = history_of(10, size=5)  # holds 6..10
    frames = replay_frames(history, "e1", ALL, replay="none", last_seq=3, client_epoch="e1")
    assert frames[0].type == "gap" and b'"from_seq":4' in frames[0].data and b'"to_seq":5' in frames[0].data
    assert seqs(frames[1:]) == [6, 7, 8, 9, 10]


def test_replay_with_another_epoch_is_a_gap_from_one_and_everything():
    frames = replay_frames(history_of(3), "e2", ALL, replay="none", last_seq=99, client_epoch="e1")
    assert frames[0].type == "gap" and b'"to_seq":null' in frames[0].data
    assert seqs(frames[1:]) == [1, 2, 3]


def test_replay_beyond_the_newest_seq_is_refused():
    with pytest.raises(BeyondNewestError):
        replay_frames(history_of(3), "e1", ALL, replay="all", last_seq=4, client_epoch=None)


def test_missed_replays_only_what_no_connection_got_and_filters_apply():
    history = history_of(4)
    next(iter(history)).delivered = True
    only_chunks = parse_events_param("chunk", {})
    assert seqs(replay_frames(history, "e1", only_chunks, replay="missed", last_seq=None, client_epoch=None)) == [2, 4]
    assert seqs(replay_frames(history, "e1", ALL, replay="missed", last_seq=None, client_epoch=None)) == [3]
