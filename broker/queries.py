"""Query backends: who answers a chat client's `query`.

* `DemoAgent` (the embedded default) streams a deterministic answer at a
  readable pace, so `make run` shows a real stream with nothing else running.
  It paces itself with the session's clock, so tests drive it with the
  manual clock.
* `HttpUpstream` POSTs the query to `query_upstream_url` and streams the
  answer back as it arrives: NDJSON lines (`{"content": ...}` or
  `{"error": ...}`) or plain text. Connect and idle timeouts end a stalled
  query with an error instead of leaving it half open.
"""

from __future__ import annotations

import asyncio
import codecs
import functools
from collections.abc import Callable
from typing import Any

import orjson
import structlog
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.iostream import IOStream
from tornado.netutil import Resolver
from tornado.simple_httpclient import SimpleAsyncHTTPClient
from tornado.tcpclient import TCPClient

from actors.clock import Clock, TimerHandle
from actors.queries import QueryRequest, QuerySink
from broker.config import Settings

log = structlog.get_logger("actor_broker.queries")


class _Timers:
    """Cancels a set of timers (and tasks) together."""

    def __init__(self) -> None:
        self.handles: list[Any] = []

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()


class DemoAgent:
    """A stand-in agent: a deterministic multi-chunk answer about the query."""

    def __init__(self, pace: float = 0.12) -> None:
        self.pace = pace

    @staticmethod
    def answer(query: str) -> list[str]:
        topic = " ".join(query.split())[:200] or "your question"
        return [
            "Here is what I found ",
            f'about "{topic}". ',
            "First, I looked at ",
            "the most relevant sources ",
            "and compared what they say. ",
            "They broadly agree, ",
            "with a few open questions ",
            "worth a closer look. ",
            "(This answer comes from actor-broker's built-in demo agent.)",
        ]

    def start(self, request: QueryRequest, sink: QuerySink, clock: Clock) -> TimerHandle:
        timers = _Timers()
        pieces = self.answer(request.query)
        for index, piece in enumerate(pieces, start=1):
            timers.handles.append(clock.call_later(self.pace * index, functools.partial(sink.chunk, piece)))
        timers.handles.append(clock.call_later(self.pace * (len(pieces) + 1), sink.done))
        return timers


class _StreamParser:
    """Turns the upstream's body, as it arrives, into chunks for the sink."""

    def __init__(self, sink: QuerySink, on_activity: Callable[[], None]) -> None:
        self.sink = sink
        self.on_activity = on_activity
        self.status: int | None = None
        self.ndjson = False
        self.pending = b""
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def header(self, line: str) -> None:
        if line.startswith("HTTP/"):
            parts = line.split(" ", 2)
            if len(parts) > 1 and parts[1].isdigit():
                self.status = int(parts[1])
            self.ndjson = False  # a new response (after a redirect or 100-continue)
        elif line.lower().startswith("content-type:"):
            self.ndjson = "application/x-ndjson" in line.lower()

    def feed(self, data: bytes) -> None:
        self.on_activity()
        if self.sink.ended or self.status is None or not 200 <= self.status < 300:
            return
        if not self.ndjson:
            self.sink.chunk(self.decoder.decode(data))
            return
        lines = (self.pending + data).split(b"\n")
        self.pending = lines.pop()
        for line in lines:
            self._line(line)

    def finish(self) -> None:
        if self.ndjson and self.pending.strip():
            self._line(self.pending)
        elif not self.ndjson:
            self.sink.chunk(self.decoder.decode(b"", final=True))
        self.pending = b""

    def _line(self, line: bytes) -> None:
        if not line.strip() or self.sink.ended:
            return
        try:
            item = orjson.loads(line)
        except orjson.JSONDecodeError:
            self.sink.fail("the query upstream sent a line that is not JSON")
            return
        if isinstance(item, dict) and isinstance(item.get("content"), str):
            self.sink.chunk(item["content"])
        elif isinstance(item, dict) and isinstance(item.get("error"), str):
            self.sink.fail(item["error"])
        else:
            self.sink.fail('the query upstream sent a line that is neither {"content": ...} nor {"error": ...}')


class _TrackingTCPClient(TCPClient):
    """Remembers the streams it opens, so an abandoned fetch can be cut off.

    `SimpleAsyncHTTPClient.close()` does not close a request in progress: a
    stalled upstream (or a query abandoned with its session) would keep its
    socket, and the fetch, open until the upstream ends the response.
    """

    def __init__(self, resolver: Resolver) -> None:
        super().__init__(resolver=resolver)
        self.streams: list[IOStream] = []
        self.closed = False

    async def connect(self, *args: Any, **kwargs: Any) -> IOStream:
        stream = await super().connect(*args, **kwargs)
        self.streams.append(stream)
        if self.closed:  # abandoned while connecting
            stream.close()
        return stream

    def close_streams(self) -> None:
        self.closed = True
        for stream in self.streams:
            stream.close()


class HttpUpstream:
    """Streams answers from an HTTP service (see the module docstring)."""

    def __init__(self, url: str, *, connect_timeout: float = 5.0, idle_timeout: float = 30.0) -> None:
        self.url = url
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout

    def start(self, request: QueryRequest, sink: QuerySink, clock: Clock) -> TimerHandle:
        timers = _Timers()
        timers.handles.append(asyncio.ensure_future(self._run(request, sink)))
        return timers

    async def _run(self, request: QueryRequest, sink: QuerySink) -> None:
        client = SimpleAsyncHTTPClient(force_instance=True)
        connections = client.tcp_client = _TrackingTCPClient(client.resolver)
        loop = asyncio.get_running_loop()
        idle: list[asyncio.TimerHandle] = []

        def stalled() -> None:
            sink.fail(f"the query upstream sent nothing for {self.idle_timeout:g} s")
            connections.close_streams()  # ends the fetch too (599, after the error above)

        def activity() -> None:
            for handle in idle:
                handle.cancel()
            idle[:] = [loop.call_later(self.idle_timeout, stalled)]

        parser = _StreamParser(sink, activity)
        body = {**request.message, "session_id": request.session_id, "user_id": request.user_id}
        activity()
        try:
            await client.fetch(
                HTTPRequest(
                    self.url,
                    method="POST",
                    body=orjson.dumps(body),
                    headers={"Content-Type": "application/json", "Accept": "application/x-ndjson, text/plain"},
                    connect_timeout=self.connect_timeout,
                    request_timeout=24 * 3600,  # the idle timeout guards a live stream
                    streaming_callback=parser.feed,
                    header_callback=parser.header,
                )
            )
            parser.finish()
            sink.done()
        except HTTPClientError as exc:
            sink.fail(
                f"the query upstream answered {exc.code}" if exc.code != 599 else f"the query upstream failed: {exc}"
            )
        except asyncio.CancelledError:
            sink.fail("query abandoned")
            raise
        except Exception as exc:  # noqa: BLE001 - any failure ends the query with an error message
            sink.fail(f"the query upstream failed: {exc}")
        finally:
            for handle in idle:
                handle.cancel()
            connections.close_streams()
            client.close()


def make_query_backend(settings: Settings) -> DemoAgent | HttpUpstream:
    if settings.query_backend == "http":
        return HttpUpstream(settings.query_upstream_url)
    return DemoAgent()
