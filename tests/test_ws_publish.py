"""`/ws/publish` against the real application (docs/protocol.md section 5, "Publishing over a WebSocket").

Every refusal is compared with what a real `POST /api/events` of the same
bytes answers, so the two ways of publishing cannot drift apart. The
module runs on both backends (REDIS_MODULES in tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson
import pytest
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, WebSocketClosedError, websocket_connect

from broker.client import Backoff, PublishError, WebSocketPublisher
from broker.daemon import Daemon
from broker.validation import MAX_BATCH_EVENTS
from tests.support import with_settings
from tests.support.wire import json_of, post, refusals, session_info, session_messages

PATH = "/ws/publish"


class Publisher:
    """A `/ws/publish` client that keeps what the server sends in wire order: answers, pongs, the close.

    Frames are sent without waiting (`send`), as a pipelining publisher does;
    every read is bounded by `timeout` seconds.
    """

    def __init__(self, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self.conn: WebSocketClientConnection | None = None
        self._arrived: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    @classmethod
    async def connect(
        cls, port: int, headers: dict[str, str] | None = None, subprotocols: list[str] | None = None
    ) -> Publisher:
        publisher = cls()
        request = HTTPRequest(f"ws://127.0.0.1:{port}{PATH}", headers=headers or {})
        conn = await asyncio.wait_for(
            websocket_connect(request, on_message_callback=publisher._on_message, subprotocols=subprotocols), 10
        )
        conn.on_pong = lambda data: publisher._arrived.put_nowait(("pong", data))  # type: ignore[method-assign]
        conn.on_ping = lambda data: publisher._arrived.put_nowait(("ping", data))  # type: ignore[method-assign]
        publisher.conn = conn
        return publisher

    def _on_message(self, message: str | bytes | None) -> None:
        if message is None:
            self._arrived.put_nowait(("closed", None))
        else:
            self._arrived.put_nowait(("message", orjson.loads(message)))

    def send(self, frame: Any) -> None:
        """One frame: bytes and str as they are (bytes as a binary frame), anything else as JSON text."""
        assert self.conn is not None
        data = frame if isinstance(frame, str | bytes) else orjson.dumps(frame).decode()
        self.conn.write_message(data, binary=isinstance(data, bytes))

    def ping(self, data: bytes) -> None:
        assert self.conn is not None
        self.conn.ping(data)

    async def next(self) -> tuple[str, Any]:
        """The next thing that arrived: ("message", dict), ("pong" or "ping", data) or ("closed", None)."""
        return await asyncio.wait_for(self._arrived.get(), self.timeout)

    async def answer(self) -> dict[str, Any]:
        kind, value = await self.next()
        assert kind == "message", (kind, value, self.close_info())
        answer: dict[str, Any] = value
        return answer

    async def answers(self, count: int) -> list[dict[str, Any]]:
        return [await self.answer() for _ in range(count)]

    async def exchange(self, frame: Any) -> dict[str, Any]:
        self.send(frame)
        return await self.answer()

    def close_info(self) -> tuple[int | None, str | None]:
        assert self.conn is not None
        return self.conn.close_code, self.conn.close_reason

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


@pytest.fixture
def publishers(port):
    """Opens publishers to the application under test (`await publishers()`); all closed at teardown."""
    opened: list[Publisher] = []

    async def open_one(**options: Any) -> Publisher:
        publisher = await Publisher.connect(port, **options)
        opened.append(publisher)
        return publisher

    yield open_one
    for publisher in opened:
        publisher.close()


def started(session_id: str, task_id: str = "t1", **extra: Any) -> dict[str, Any]:
    """An event that throttling never holds."""
    return {"type": "task_started", "session_id": session_id, "task_id": task_id, **extra}


async def http_answer(http: Any, body: bytes) -> tuple[int, Any]:
    """What `POST /api/events` answers for the same bytes: (status, JSON body)."""
    response = await post(http, "/api/events", body)
    return response.code, json_of(response)


def as_ws_error(status: int, body: dict[str, Any], ref: Any = None, *, with_ref: bool = True) -> dict[str, Any]:
    """The WebSocket answer a refused POST corresponds to."""
    head: dict[str, Any] = {"type": "error", "ref": ref} if with_ref else {"type": "error"}
    return {**head, "status": status, **body}


# -- accepted frames ---------------------------------------------------------------------


async def test_a_frame_of_one_event_is_accepted_and_reaches_the_sessions_clients(publishers, connect):
    follower, _ = await connect("s1", research=True)
    publisher = await publishers()
    answer = await publisher.exchange(started("s1", current="reading"))
    assert answer == {"type": "accepted", "accepted": 1, "seq": [1]}  # no ref given: none echoed
    [message] = await session_messages(follower, 1)
    assert (message["seq"], message["task_id"], message["current"]) == (1, "t1", "reading")


async def test_arrays_and_envelopes_get_their_seqs_in_order_and_the_ref_back(publishers, connect):
    follower, _ = await connect("s1", research=True)
    publisher = await publishers()
    batch = [started("s1", f"t{i}") for i in range(3)]
    assert await publisher.exchange(batch) == {"type": "accepted", "accepted": 3, "seq": [1, 2, 3]}
    refs: list[Any] = ["a", 0, None, {"job": [1, 2]}, False]
    for offset, ref in enumerate(refs):
        answer = await publisher.exchange({"ref": ref, "events": [started("s1", f"u{offset}")]})
        assert answer == {"type": "accepted", "ref": ref, "accepted": 1, "seq": [4 + offset]}
    assert await publisher.exchange({"events": batch[:2]}) == {"type": "accepted", "accepted": 2, "seq": [9, 10]}
    messages = await session_messages(follower, 10)
    assert [m["seq"] for m in messages] == list(range(1, 11))


async def test_a_binary_frame_is_read_as_json_text(publishers):
    publisher = await publishers()
    answer = await publisher.exchange(orjson.dumps({"ref": 1, "events": [started("s1")]}))
    assert answer == {"type": "accepted", "ref": 1, "accepted": 1, "seq": [1]}


async def test_a_batch_of_several_sessions_gets_per_session_seqs(publishers, connect):
    follower_a, _ = await connect("a", research=True)
    follower_b, _ = await connect("b", research=True)
    publisher = await publishers()
    frame = [started("a"), started("b"), started("a", "t2")]
    assert await publisher.exchange(frame) == {"type": "accepted", "accepted": 3, "seq": [1, 1, 2]}
    assert [m["task_id"] for m in await session_messages(follower_a, 2)] == ["t1", "t2"]
    assert [m["task_id"] for m in await session_messages(follower_b, 1)] == ["t1"]


# History holds the whole burst: a Redis node that falls behind under load (a late canary) catches up
# from the stream, and with the default 100 its followers would get a gap for what was trimmed meanwhile.
@with_settings(buffer_size=3000)
async def test_2000_pipelined_frames_are_all_answered_in_order(publishers, connect):
    followers = [(await connect(sid, research=True))[0] for sid in ("p0", "p1", "p2")]
    publisher = await publishers()
    for i in range(2000):
        publisher.send({"ref": i, "events": [started(f"p{i % 3}", f"t{i}")]})
    answers = await publisher.answers(2000)
    assert [a["ref"] for a in answers] == list(range(2000))
    assert all(a["type"] == "accepted" and a["accepted"] == 1 for a in answers)
    for index in range(3):  # each session's seqs count up in the order the frames were sent
        assert [a["seq"][0] for a in answers[index::3]] == list(range(1, len(answers[index::3]) + 1))
    for index, follower in enumerate(followers):
        received = await session_messages(follower, len(answers[index::3]))
        assert [m["task_id"] for m in received] == [f"t{i}" for i in range(index, 2000, 3)]


async def test_pipelined_good_and_bad_frames_are_each_answered_in_order(publishers, connect):
    follower, _ = await connect("mix", research=True)
    publisher = await publishers()
    frames = [
        {"ref": 0, "events": [started("mix", "a")]},
        {"ref": 1, "events": [started("mix", "b"), started("mix", "c")]},
        {"ref": 2, "events": [{"type": "task_started", "session_id": "mix"}]},  # no task_id: 422
        b"not json",
        {"ref": 4, "events": [started("mix", "d")]},
    ]
    for frame in frames:  # all sent before the server reads any
        publisher.send(frame)
    answers = await publisher.answers(5)
    assert [(a.get("ref"), a["type"], a.get("seq"), a.get("status")) for a in answers] == [
        (0, "accepted", [1], None),
        (1, "accepted", [2, 3], None),
        (2, "error", None, 422),
        (None, "error", None, 400),
        (4, "accepted", [4], None),
    ]
    assert [m["task_id"] for m in await session_messages(follower, 4)] == ["a", "b", "c", "d"]


async def test_the_same_event_id_twice_is_answered_with_the_same_seq_and_delivered_once(
    publishers, connect, http_server_client
):
    follower, _ = await connect("s1", research=True)
    publisher = await publishers()
    first = await publisher.exchange({"ref": 1, "events": [started("s1", event_id="e-1")]})
    again = await publisher.exchange({"ref": 2, "events": [started("s1", event_id="e-1")]})
    within = await publisher.exchange({"ref": 3, "events": [started("s1", "t2", event_id="e-2")] * 2})
    assert (first["seq"], again["seq"], within["seq"]) == ([1], [1], [2, 2])
    assert (again["accepted"], within["accepted"]) == (1, 2)
    messages = await session_messages(follower, 2)
    assert [(m["seq"], m["event_id"]) for m in messages] == [(1, "e-1"), (2, "e-2")]
    code, info = await session_info(http_server_client, "s1")
    assert (code, info["last_seq"]) == (200, 2)


async def test_progress_is_throttled_as_over_http(publishers, connect):
    follower, _ = await connect("s1", research=True)
    publisher = await publishers()
    progress = [{"type": "task_progress", "session_id": "s1", "task_id": "t1", "progress": p} for p in (10, 11, 12)]
    answer = await publisher.exchange(progress)
    assert answer["seq"][0] == 1 and answer["seq"][1:] == [None, None]  # held, as a POST's would be
    [first] = await session_messages(follower, 1)
    assert first["progress"] == 10


# -- refusals: the status and details POST /api/events gives ---------------------------------

REFUSED_BODIES = {
    "bad-json": b'{"type": "task_started", ',
    "not-an-object": b"5",
    "empty-array": b"[]",
    "empty-text": b"   ",
    "no-session": orjson.dumps({"type": "task_started", "task_id": "t1"}),
    "bad-progress": orjson.dumps({"type": "task_progress", "session_id": "r1", "task_id": "t1", "progress": 300}),
    "reserved-seq": orjson.dumps([started("r1"), {**started("r1", "t2"), "seq": 4}]),
    "over-the-batch-limit": orjson.dumps([started("r1", f"t{i}") for i in range(MAX_BATCH_EVENTS + 1)]),
}


@pytest.mark.parametrize("name", REFUSED_BODIES)
async def test_a_refused_frame_is_answered_as_post_api_events_answers_and_publishes_nothing(
    name, publishers, http_server_client, connect
):
    follower, _ = await connect("r1", research=True)
    body = REFUSED_BODIES[name]
    status, expected = await http_answer(http_server_client, body)
    assert status in (400, 422), (status, expected)
    publisher = await publishers()
    answer = await publisher.exchange(body)
    assert answer == as_ws_error(status, expected, with_ref=False)
    # The connection stays open and nothing of the refused frame was published.
    assert await publisher.exchange([started("r1", "after")]) == {"type": "accepted", "accepted": 1, "seq": [1]}
    [message] = await session_messages(follower, 1)
    assert message["task_id"] == "after"


async def test_a_refusal_inside_an_envelope_echoes_the_ref(publishers, http_server_client):
    publisher = await publishers()
    events = [{"type": "task_progress", "session_id": "r1", "task_id": "t1", "progress": "x"}]
    status, expected = await http_answer(http_server_client, orjson.dumps(events))
    assert status == 422 and expected["details"][0]["field"] == "progress"
    assert await publisher.exchange({"ref": "job-7", "events": events}) == as_ws_error(422, expected, "job-7")
    empty = {"error": "empty batch: no events"}  # normalize_events' words for an empty list
    assert await publisher.exchange({"ref": 8, "events": []}) == as_ws_error(400, empty, 8)
    answer = await publisher.exchange({"ref": 9, "events": {"type": "task_started"}})
    assert answer == {"type": "error", "ref": 9, "status": 400, "error": "events must be an array of event objects"}
    code, _ = await session_info(http_server_client, "r1")
    assert code == 404


async def test_a_frame_over_the_batch_limit_is_counted_as_the_post_is(publishers, http_server_client):
    publisher = await publishers()
    body = REFUSED_BODIES["over-the-batch-limit"]
    before = (await refusals(http_server_client)).get("max_batch_events", 0)
    assert (await publisher.exchange(body))["status"] == 400
    assert (await refusals(http_server_client))["max_batch_events"] == before + 1


@with_settings(max_body_size=2048)
async def test_a_frame_over_max_body_size_is_413_as_the_post_and_the_connection_stays_open(
    publishers, http_server_client
):
    publisher = await publishers()
    body = orjson.dumps(started("big", pad="x" * 3000))
    status, expected = await http_answer(http_server_client, body)
    assert status == 413
    assert await publisher.exchange(body) == as_ws_error(413, expected, with_ref=False)
    enveloped = orjson.dumps({"ref": "big", "events": [orjson.loads(body)]})
    size_error = f"body of {len(enveloped)} bytes is over max_body_size (2048)"
    assert await publisher.exchange(enveloped) == as_ws_error(413, {"error": size_error}, "big")  # ref echoed
    exactly = orjson.dumps(started("big", pad=""))
    exactly = exactly[:-1] + b" " * (2048 - len(exactly)) + b"}"
    assert len(exactly) == 2048
    assert await publisher.exchange(exactly) == {"type": "accepted", "accepted": 1, "seq": [1]}
    assert (await refusals(http_server_client))["max_body_size"] == 3


@pytest.mark.memory_only("a Redis node holds no sessions of its own, so max_sessions never refuses a publish there")
@with_settings(max_sessions=1)
async def test_a_frame_past_max_sessions_is_503_as_the_post(publishers, http_server_client):
    publisher = await publishers()
    assert (await publisher.exchange([started("one")]))["seq"] == [1]
    body = orjson.dumps({"ref": "r", "events": [started("two")]})
    status, expected = await http_answer(http_server_client, orjson.dumps([started("two")]))
    assert (status, expected) == (503, {"error": "too many sessions"})
    assert await publisher.exchange(body) == as_ws_error(503, expected, "r")
    code, _ = await session_info(http_server_client, "two")
    assert code == 404


@pytest.mark.memory_only("a Redis node holds no sessions of its own, so max_sessions never refuses a publish there")
@with_settings(max_sessions=2)
async def test_pipelined_frames_count_the_sessions_the_frames_ahead_will_create(publishers, http_server_client):
    publisher = await publishers()
    for name in ("one", "two", "one", "three"):  # read together, published as one run
        publisher.send({"ref": name, "events": [started(name)]})
    answers = await publisher.answers(4)
    assert [a["type"] for a in answers] == ["accepted", "accepted", "accepted", "error"]
    assert answers[3] == as_ws_error(503, {"error": "too many sessions"}, "three")
    code, _ = await session_info(http_server_client, "three")
    assert code == 404


async def test_with_redis_stopped_a_frame_is_503_backend_unavailable_and_the_connection_stays_open(
    backend, request, publishers, http_server_client
):
    if backend != "redis":
        pytest.skip("the Redis backend's own refusal")
    redis_server = request.getfixturevalue("redis_server")
    publisher = await publishers()
    assert (await publisher.exchange([started("s1")]))["seq"] == [1]
    redis_server.stop()
    body = orjson.dumps([started("s1", "t2", event_id="retry-me")])
    status, expected = await http_answer(http_server_client, body)
    assert (status, expected) == (503, {"error": "backend unavailable"})
    assert await publisher.exchange({"ref": 1, "events": orjson.loads(body)}) == as_ws_error(503, expected, 1)
    redis_server.start()  # an empty Redis (no persistence): the session starts afresh
    # Once the node reaches Redis again, the retried frame (same event_id) is published, once.
    deadline = asyncio.get_running_loop().time() + 15
    while True:  # each try is a round trip through the node; no sleep needed
        answer = await publisher.exchange({"ref": 2, "events": orjson.loads(body)})
        if answer["type"] == "accepted" or asyncio.get_running_loop().time() > deadline:
            break
    assert answer == {"type": "accepted", "ref": 2, "accepted": 1, "seq": [1]}
    again = await publisher.exchange({"ref": 3, "events": orjson.loads(body)})
    assert again == {"type": "accepted", "ref": 3, "accepted": 1, "seq": [1]}


# -- back-pressure ---------------------------------------------------------------------------


_ANSWERS_WAIT = (
    "on the memory backend an idle session answers each frame as Tornado reads it, so nothing is "
    "ever unanswered for long; on Redis every publish waits for its script call"
)


@pytest.mark.redis_only(_ANSWERS_WAIT)
@with_settings(max_publish_inflight=4)
async def test_past_max_publish_inflight_the_server_reads_nothing_until_it_has_answered_some(publishers):
    """A ping sent behind 8 frames is only read (and ponged) once the server answered frames.

    Tornado answers a ping the moment it reads it, and everything here is
    written before the server's loop runs: a server that read on past the
    limit would pong before answering any frame (each answer needs a turn
    of the session actor). With a limit of 4, reading frame 8 needs answers
    1 to 4 out, and the ping behind it is read once answer 5 is out.
    """
    publisher = await publishers()
    for i in range(8):
        publisher.send({"ref": i, "events": [started("bp", f"t{i}")]})
    publisher.ping(b"behind-8")
    arrived = [await publisher.next() for _ in range(9)]
    kinds = [kind for kind, _ in arrived]
    assert sorted(kinds) == ["message"] * 8 + ["pong"]
    assert kinds.index("pong") >= 5, arrived
    answers = [value for kind, value in arrived if kind == "message"]
    assert [a["ref"] for a in answers] == list(range(8))  # held, not dropped: every frame answered
    assert [a["seq"] for a in answers] == [[i] for i in range(1, 9)]


@pytest.mark.redis_only(_ANSWERS_WAIT)
async def test_without_back_pressure_a_ping_is_answered_before_the_frames_ahead_of_it(publishers):
    """The control for the test above: at the default limit the same ping is ponged at once.

    Shows that the ordering seen there comes from the limit, not from the
    way the test sends or reads.
    """
    publisher = await publishers()
    for i in range(8):
        publisher.send({"ref": i, "events": [started("bp", f"t{i}")]})
    publisher.ping(b"behind-8")
    arrived = [await publisher.next() for _ in range(9)]
    assert [kind for kind, _ in arrived].index("pong") < 5, arrived


@pytest.mark.memory_only("a Redis publish waits for its script call, so its answer cannot come as the frame is read")
async def test_on_an_idle_session_each_frame_is_answered_as_it_is_read(publishers):
    """No task and no loop turn per frame: a ping behind 8 frames is read after their 8 answers are out.

    Everything here is written before the server's loop runs, and Tornado
    answers a ping the moment it reads it; the answers come first, in order,
    because each frame was answered before the next one was read.
    """
    publisher = await publishers()
    for i in range(8):
        publisher.send({"ref": i, "events": [started("alone", f"t{i}")]})
    publisher.ping(b"behind-8")
    arrived = [await publisher.next() for _ in range(9)]
    assert [kind for kind, _ in arrived] == ["message"] * 8 + ["pong"]
    assert [value["seq"] for _, value in arrived[:8]] == [[i] for i in range(1, 9)]


@with_settings(ws_ping_interval=0.2, ws_ping_timeout=5.0)
async def test_the_server_pings_a_publisher_that_stays_connected(publishers):
    publisher = await publishers()
    assert await publisher.next() == ("ping", b"")  # within ws_ping_interval (the read is bounded)
    assert (await publisher.exchange([started("pinged")]))["seq"] == [1]  # the client ponged; still open


# -- authorisation -----------------------------------------------------------------------


async def refused_handshake(port: int, **options: Any) -> tuple[int, dict[str, Any], str | None]:
    with pytest.raises(HTTPClientError) as refused:
        await Publisher.connect(port, **options)
    response = refused.value.response
    assert response is not None
    return refused.value.code, orjson.loads(response.body), response.headers.get("WWW-Authenticate")


@with_settings(api_keys=("k1",))
async def test_with_api_keys_the_handshake_needs_a_key_as_every_post_does(port, http_server_client, publishers):
    code, body, challenge = await refused_handshake(port)
    post_401 = await post(http_server_client, "/api/events", [started("k")])
    assert (code, body, challenge) == (401, json_of(post_401), 'Bearer realm="actor-broker"')
    code, body, _ = await refused_handshake(port, headers={"Authorization": "Bearer k2"})
    post_403 = await post(http_server_client, "/api/events", [started("k")], headers={"Authorization": "Bearer k2"})
    assert (code, body) == (403, json_of(post_403))
    code, _, _ = await refused_handshake(port, subprotocols=["bearer", "k2"])
    assert code == 403
    by_header = await publishers(headers={"Authorization": "Bearer k1"})
    assert (await by_header.exchange([started("k")]))["seq"] == [1]
    by_protocol = await publishers(subprotocols=["bearer", "k1"])
    assert by_protocol.conn is not None and by_protocol.conn.selected_subprotocol == "bearer"
    assert (await by_protocol.exchange([started("k")]))["seq"] == [2]


async def test_without_api_keys_a_loopback_publisher_needs_no_key(publishers):
    publisher = await publishers()
    assert publisher.conn is not None and publisher.conn.selected_subprotocol is None
    assert (await publisher.exchange([started("open")]))["seq"] == [1]


# -- shutdown --------------------------------------------------------------------------------


async def test_frames_sent_after_the_drain_began_are_not_published(broker, http_server, publishers, connect):
    """The drain's notice, then frames: none is published (unread, or refused 503), and the socket closes 1001."""
    follower, _ = await connect("sd2", research=True)
    publisher = await publishers()
    assert (await publisher.exchange({"ref": 0, "events": [started("sd2", "before")]}))["seq"] == [1]
    daemon = Daemon(broker.settings)
    daemon.broker = broker
    draining = asyncio.ensure_future(daemon.drain(http_server))
    assert (await publisher.next())[1]["type"] == "server_shutdown"
    for i in range(1, 6):
        with contextlib.suppress(WebSocketClosedError):  # nothing was unanswered: it may be closed already
            publisher.send({"ref": i, "events": [started("sd2", f"after{i}")]})
    arrived = []
    while (item := await publisher.next())[0] != "closed":
        arrived.append(item[1])
    assert publisher.close_info() == (1001, "server shutdown")
    assert all(a["type"] == "error" and a["status"] == 503 for a in arrived), arrived
    delivered = await follower.receive_until(type="server_shutdown")
    assert [m["task_id"] for m in delivered if m["type"] == "task_started"] == ["before"]
    await asyncio.wait_for(draining, 30)


@pytest.mark.redis_only(_ANSWERS_WAIT + ": here that keeps most of the 200 frames unread when the drain begins")
@with_settings(max_publish_inflight=4)
async def test_the_drain_sends_server_shutdown_answers_every_frame_read_then_closes_1001(
    broker, http_server, publishers, connect
):
    """The daemon's own drain (Daemon.drain), with a publisher in the middle of 200 pipelined frames.

    The small limit keeps most frames unread when the drain begins: the
    server reads no more of them, answers what it read, and closes.
    """
    follower, _ = await connect("sd", research=True)
    publisher = await publishers()
    for i in range(200):
        publisher.send({"ref": i, "events": [started("sd", f"t{i}")]})
    first = await publisher.answer()  # the server is reading: frames are on their way in
    assert first["ref"] == 0
    daemon = Daemon(broker.settings)
    daemon.broker = broker
    draining = asyncio.ensure_future(daemon.drain(http_server))
    arrived = []
    while (item := await publisher.next())[0] != "closed":
        arrived.append(item[1])
    assert publisher.close_info() == (1001, "server shutdown")
    notices = [m for m in arrived if m["type"] == "server_shutdown"]
    assert notices == [{"type": "server_shutdown", "reconnect_after_ms": 2000}]
    answers = [first] + [m for m in arrived if m["type"] != "server_shutdown"]
    assert [a["ref"] for a in answers] == list(range(len(answers)))  # a prefix of the frames, in order
    assert len(answers) < 200  # what the server had not read when the drain began, it did not read
    notice_at = next(i for i, m in enumerate(arrived) if m["type"] == "server_shutdown")
    assert len(arrived) - notice_at - 1 <= 4 + 1  # after the notice: the 4 unanswered, and one frame being read
    accepted = [a for a in answers if a["type"] == "accepted"]
    refused = [a for a in answers if a["type"] == "error"]
    assert all(a["status"] == 503 and a["error"] == "server is shutting down" for a in refused)
    assert answers == accepted + refused  # once refusing began, nothing more was published
    assert [a["seq"] for a in accepted] == [[i] for i in range(1, len(accepted) + 1)]
    # The session's client, drained too, received accepted events only, in order, each once.
    delivered = await follower.receive_until(type="server_shutdown")
    events = [m["task_id"] for m in delivered if m["type"] == "task_started"]
    assert events == [f"t{a['ref']}" for a in accepted][: len(events)]
    await asyncio.wait_for(draining, 30)
    assert broker.open_connections == 0  # the drain waited for the publisher's socket too


async def test_while_draining_a_publish_handshake_is_503(broker, port):
    broker.draining = True
    code, body, _ = await refused_handshake(port)
    assert (code, body) == (503, {"error": "server is shutting down"})


# -- the Python client: broker.client.WebSocketPublisher ---------------------------------------


async def test_the_python_publisher_pipelines_calls_and_gets_each_its_seqs(port, connect, http_server_client):
    follower, _ = await connect("py", research=True)
    async with WebSocketPublisher(f"http://127.0.0.1:{port}") as publisher:
        seqs = await asyncio.gather(*(publisher.publish("py", started("py", f"t{i}")) for i in range(300)))
        assert sorted(seqs) == list(range(1, 301))  # type: ignore[type-var]
        many = await publisher.publish_many([started("py", f"m{i}") for i in range(2500)], session_id="py")
        assert many == list(range(301, 2801))  # 3 frames, in order
        with pytest.raises(PublishError) as refused:
            await publisher.publish("py", {"type": "task_progress", "task_id": "t1", "progress": 300})
        assert refused.value.status == 422 and refused.value.details[0]["field"] == "progress"
        assert await publisher.publish("py", started("py", "after")) == 2801  # one refusal ends nothing
    assert publisher.reconnects == 0
    received = await session_messages(follower, 300)
    assert sorted(m["seq"] for m in received) == list(range(1, 301))


async def test_the_python_publisher_sends_again_what_a_dropped_connection_left_unanswered(
    broker, port, http_server_client
):
    """Its connection closed under it three times mid-stream: every event ends up published exactly once.

    `max_inflight=10` keeps ten frames sent and unanswered at any moment, so
    each cut leaves some to send again (some of them already published: the
    broker knows their event_ids).
    """
    url = f"http://127.0.0.1:{port}"
    async with WebSocketPublisher(url, backoff=Backoff(initial=0.01, maximum=0.05), max_inflight=10) as publisher:
        calls = [asyncio.ensure_future(publisher.publish("drop", started("drop", f"t{i}"))) for i in range(300)]
        async with asyncio.timeout(30):  # a publisher that lost frames would leave calls waiting
            for cut in (50, 120, 200):
                while sum(call.done() for call in calls) < cut:
                    await asyncio.wait([c for c in calls if not c.done()], return_when=asyncio.FIRST_COMPLETED)
                broker.close_all(1001, "server shutdown")  # every connection closed at once, this publisher's too
            seqs = await asyncio.gather(*calls)
        assert publisher.reconnects == 3
    assert seqs == list(range(1, 301))  # in call order: what was left unanswered went again in order
    code, info = await session_info(http_server_client, "drop")
    assert (code, info["last_seq"]) == (200, 300)  # none lost, none twice


@with_settings(api_keys=("k1",))
async def test_the_python_publisher_raises_a_refused_handshake(port):
    async with WebSocketPublisher(f"http://127.0.0.1:{port}", api_key="k2") as publisher:
        with pytest.raises(PublishError) as refused:
            await publisher.publish("k", started("k"))
    assert (refused.value.status, refused.value.error) == (403, "this API key is not accepted")
    async with WebSocketPublisher(f"http://127.0.0.1:{port}", api_key="k1") as publisher:
        assert await publisher.publish("k", started("k")) == 1
