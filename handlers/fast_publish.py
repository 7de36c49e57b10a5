"""The lean publish path: a publish answered below Tornado's `RequestHandler` (issue 14).

A single-event publish through `tornado.web` builds an `HTTPServerRequest`,
routes it through a dozen regexes, builds a `RequestHandler` (an
`HTTPHeaders` of defaults, a task for `_execute`), waits two loop turns for the
session actor's answer and writes the answer through the handler's header
machinery. `PublishApplication` is the daemon's `tornado.web.Application` with
one change: each request first meets a `_Publication` delegate, which reads
the request line and headers and takes the request for itself only when it
is the plain case of the two publish routes:

    POST /api/sessions/{id}/events or POST /api/events, HTTP/1.1, no query,
    a Host that allowed_hosts serves, a publisher the rule admits
    (handlers.base.publisher_refusal), and a body the route table would read
    whole (handlers.body.read_whole: a Content-Length within max_body_size
    and SERVER_MAX_BODY, no Expect, no form type).

Any other request (every other route, a refusal decided by the headers, a
streamed or chunked body, HTTP/1.0) goes to the application's own routing at
once, untouched. A request the delegate took is validated
(broker.validation) and published (`Broker.publish_now`, or `Broker.publish`
when the session's actor is busy or the backend is Redis, whose one script
call is awaited); the 202 is written as one pre-encoded block with the
headers `ApiHandler` gives every answer (`_Answers`). When the body turns out
not to be the plain case (a 400, 415 or 422, a batch over the limit, a new
session past max_sessions, a reload that lowered max_body_size, a drain
under way) nothing has been published and nothing answered: the request is
handed, headers and body, to the application's routing as if it had just
arrived, and the route table's handler answers it as it always has. So
every refusal is the handler's own answer, byte for byte; this module
answers only 202, and 503 (backend unavailable) or 500 after a publish that
failed.

The delegate sits where the application's delegate sits, so the listener's
clock (`broker.listener._ClockedDelegate`: header and body timeouts) wraps it
as it wraps every request.
"""

from __future__ import annotations

import asyncio
import http
import re
import time
from typing import Any

import orjson
import structlog
import tornado
from tornado import httputil
from tornado.escape import parse_qs_bytes
from tornado.http1connection import HTTP1Connection

from actors.ids import new_request_id
from broker.cluster.store import BackendUnavailable
from broker.core import Broker
from broker.logs import log_request
from broker.validation import (
    MAX_BATCH_EVENTS,
    BadRequest,
    UnsupportedMediaType,
    ValidationFailed,
    normalize_events,
    parse_body,
)
from handlers.base import RequestIdMixin, publisher_refusal
from handlers.body import whole_body
from handlers.hosts import HostCheckedApplication, host_allowed
from handlers.origins import origin_allowed

__all__ = ["PublishApplication"]

log = structlog.get_logger("actor_broker.http")

_EVENTS = "/api/events"
_SESSIONS = "/api/sessions/"
_SESSION_EVENTS_TAIL = "/events"
#: The request headers this module reads, read in one pass over the headers
#: (HTTPHeaders.get costs a normalisation, and an exception for a header that is absent).
_READ = frozenset(
    {"Authorization", "Connection", "Content-Length", "Content-Type", "Expect", "Host", "Origin", "X-Request-Id"}
)
#: Host values taken here: a subset of what tornado.httputil accepts (letters,
#: digits, - . _ ~, IPv6 brackets, a port); anything else is left to Tornado's
#: own check (400) on the application's path.
_PLAIN_HOST = re.compile(r"[A-Za-z0-9._~\-\[\]:]*")


class PublishApplication(HostCheckedApplication):
    """The route table's application, with the publish routes' plain requests served by `_Publication`."""

    def __init__(self, handlers: Any, *, broker: Broker, server_max_body: int, **settings: Any) -> None:
        super().__init__(handlers, broker=broker, **settings)
        #: the server's limit on a body read whole (broker.app.SERVER_MAX_BODY)
        self.server_max_body = server_max_body
        self.answers = _Answers()
        #: publishes that wait (a busy session, Redis), held until they are answered
        self.pending: set[asyncio.Future[None]] = set()

    def start_request(self, server_conn: object, request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        return _Publication(self, server_conn, request_conn)

    def routed(self, server_conn: object, request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        """The delegate the application's own routing gives a request (every route, every handler)."""
        return super().start_request(server_conn, request_conn)


class _Answers:
    """The answer's header block, as `ApiHandler` writes it, with the Date made once a second."""

    SERVER = f"TornadoServer/{tornado.version}"

    def __init__(self) -> None:
        self._second = -1
        self._date = ""
        self._status_lines: dict[int, str] = {}

    def date(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._date = httputil.format_timestamp(now)
        return self._date

    def encode(self, status: int, body: bytes, request_id: str, origin: str | None, close: bool) -> bytes:
        """Status line, headers and body (what RequestHandler.finish and ApiHandler's headers give)."""
        status_line = self._status_lines.get(status)
        if status_line is None:
            status_line = self._status_lines[status] = f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
        cors = (
            ""
            if origin is None
            else f"Access-Control-Allow-Origin: {origin}\r\nAccess-Control-Expose-Headers: X-Request-ID\r\n"
        )
        connection = "Connection: close\r\n" if close else ""
        head = (
            f"{status_line}"
            f"Server: {self.SERVER}\r\n"
            "Content-Type: application/json\r\n"
            f"Date: {self.date()}\r\n"
            "Cache-Control: no-store\r\n"
            "X-Content-Type-Options: nosniff\r\n"
            f"X-Request-Id: {request_id}\r\n"
            "Vary: Origin\r\n"
            f"{cors}"
            f"Content-Length: {len(body)}\r\n"
            f"{connection}"
            "\r\n"
        )
        return head.encode("latin1") + body


class _Request:
    """What of a request the access line and the shared checks read, under `HTTPServerRequest`'s names."""

    __slots__ = ("_start_time", "headers", "host", "method", "path", "query", "remote_ip")

    def __init__(
        self, start_line: httputil.RequestStartLine, headers: httputil.HTTPHeaders, host: str, remote_ip: Any
    ) -> None:
        self.method = start_line.method
        self.path = start_line.path
        self.query = ""
        self.headers = headers
        self.host = host
        self.remote_ip: str | None = remote_ip
        self._start_time = time.time()

    def request_time(self) -> float:
        return time.time() - self._start_time

    @property
    def query_arguments(self) -> dict[str, list[bytes]]:
        return parse_qs_bytes(self.query, keep_blank_values=True)


class _Publication(RequestIdMixin, httputil.HTTPMessageDelegate):
    """One request: a plain publish answered here, or anything else handed to the application's routing.

    Also the "handler" `broker.logs.log_request` reads for the access line
    (`get_status`, `request`, `request_id`, `session_id`).
    """

    request: _Request

    def __init__(self, app: PublishApplication, server_conn: object, request_conn: httputil.HTTPConnection) -> None:
        self.app = app
        self.broker = app.broker
        self.server_conn = server_conn
        self.connection = request_conn
        #: the application's delegate, once the request is theirs
        self.routed: httputil.HTTPMessageDelegate | None = None
        self.start_line: httputil.RequestStartLine | None = None
        self.headers: httputil.HTTPHeaders | None = None
        self.chunks: list[bytes] = []
        #: the values of the headers in _READ
        self.fields: dict[str, str] = {}
        self.request_id: str | None = None
        #: the publish route's session (POST /api/sessions/{id}/events), None for POST /api/events
        self.path_session: str | None = None
        #: the session the access line names (broker.logs.named_session)
        self.session_id: str | None = None
        self.path_args: list[str] = []
        self.status = 0

    # -- HTTPMessageDelegate

    def headers_received(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
    ) -> Any:
        assert isinstance(start_line, httputil.RequestStartLine)
        if not (isinstance(self.connection, HTTP1Connection) and self._takes(start_line, headers)):
            self.routed = self.app.routed(self.server_conn, self.connection)
            return self.routed.headers_received(start_line, headers)
        self.start_line = start_line
        self.headers = headers
        return None

    def data_received(self, chunk: bytes) -> Any:
        if self.routed is not None:
            return self.routed.data_received(chunk)
        self.chunks.append(chunk)
        return None

    def finish(self) -> None:
        if self.routed is not None:
            self.routed.finish()
            return
        self._publish(self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks))

    def on_connection_close(self) -> None:
        if self.routed is not None:
            self.routed.on_connection_close()
        self.chunks = []

    # -- deciding

    def _takes(self, start_line: httputil.RequestStartLine, headers: httputil.HTTPHeaders) -> bool:
        """Whether this is the plain case of a publish route (the module docstring): the cheap tests first."""
        if start_line.method != "POST" or start_line.version != "HTTP/1.1":
            return False
        path = start_line.path
        if path == _EVENTS:
            self.path_session = None
        elif path.startswith(_SESSIONS) and path.endswith(_SESSION_EVENTS_TAIL):
            session = path[len(_SESSIONS) : -len(_SESSION_EVENTS_TAIL)]
            # no "/" (the route's [^/]+), no query, nothing Tornado would unquote or decode differently
            if not session or "/" in session or "?" in session or "%" in session or not session.isascii():
                return False
            self.path_session = session
            self.path_args = [session]
        else:
            return False  # a query string too: the path is the whole target
        fields = self.fields
        for name, value in headers.get_all():
            if name in _READ:
                if name in fields:
                    return False  # a repeated header: what it means is the route table's to decide
                fields[name] = value
        host = fields.get("Host")
        if host is None or "," in host or not _PLAIN_HOST.fullmatch(host):
            return False
        broker = self.broker
        settings = broker.settings
        if settings.allowed_hosts and not host_allowed(host, settings.allowed_hosts):
            return False
        limit = min(self.app.server_max_body, settings.max_body_size)
        if not whole_body(fields.get("Content-Length"), "Expect" in fields, fields.get("Content-Type", ""), limit):
            return False
        origin = fields.get("Origin")
        if origin is not None and ("\r" in origin or "\n" in origin):
            return False  # Tornado refuses to write such a header back; its handler answers
        remote_ip = getattr(getattr(self.connection, "context", None), "remote_ip", None)
        self.request = _Request(start_line, headers, host, remote_ip)
        return publisher_refusal(settings.api_keys, fields.get("Authorization", ""), remote_ip) is None

    # -- publishing

    def _publish(self, body: bytes) -> None:
        """Validate and publish a body whose headers were the plain case, or hand it on (the module docstring)."""
        broker = self.broker
        assert self.headers is not None
        if broker.draining or len(body) > broker.settings.max_body_size:
            self._hand_on(body)
            return
        try:
            items = parse_body(body, self.fields.get("Content-Type"))
            if len(items) > MAX_BATCH_EVENTS:
                raise BadRequest("over the batch limit")  # the handler counts it and says so
            events = normalize_events(items, session_id=self.path_session, now=time.time(), owned=True)
        except (BadRequest, UnsupportedMediaType, ValidationFailed):
            self._hand_on(body)
            return
        named = {event["session_id"] for event in events} if self.path_session is None else {self.path_session}
        if len(named) == 1:
            self.session_id = next(iter(named))  # for the access line (broker.logs.named_session)
        if broker.admit_sessions(named, count=False) is not None:
            self._hand_on(body)  # its handler counts the refusal and answers 503
            return
        try:
            seqs = broker.publish_now(events)
        except Exception as exc:  # noqa: BLE001 - answered 500 and logged, as ApiHandler does
            self._failed(exc)
            return
        if seqs is not None:
            self._accepted(len(events), seqs)
            return
        self._hold(self._publish_later(events))

    async def _publish_later(self, events: list[dict[str, Any]]) -> None:
        """The publish that waits: a busy or new session's actor, or the Redis script call."""
        try:
            seqs = await self.broker.publish(events)
        except Exception as exc:  # noqa: BLE001 - answered (503 or 500) and logged, as ApiHandler does
            self._failed(exc)
            return
        self._accepted(len(events), seqs)

    def _hand_on(self, body: bytes) -> None:
        """Give the request to the application's routing as if it had just arrived: its handler answers."""
        assert self.start_line is not None and self.headers is not None
        routed = self.routed = self.app.routed(self.server_conn, self.connection)
        waiting = routed.headers_received(self.start_line, self.headers)
        if waiting is None and body:
            waiting = routed.data_received(body)
        if waiting is None:
            routed.finish()
            return
        self._hold(self._hand_on_later(routed, waiting, body))

    def _hold(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self.app.pending.add(task)
        task.add_done_callback(self.app.pending.discard)

    async def _hand_on_later(self, routed: httputil.HTTPMessageDelegate, waiting: Any, body: bytes) -> None:
        """`_hand_on` for a handler that streams its body (a reload changed the limits meanwhile)."""
        await waiting
        if body and (waiting := routed.data_received(body)) is not None:
            await waiting
        routed.finish()

    # -- answering

    def _accepted(self, count: int, seqs: list[int | None]) -> None:
        self._answer(202, orjson.dumps({"accepted": count, "seq": seqs}))

    def _failed(self, exc: Exception) -> None:
        """A publish that raised: 503 for an unreachable backend, else 500 (ApiHandler.write_error's answers)."""
        request = self.request
        request_id = self._request_id()
        if isinstance(exc, BackendUnavailable):  # docs/protocol.md section 7: the publisher retries with the same ids
            log.warning(
                "backend_unavailable", method=request.method, path=request.path, error=str(exc), request_id=request_id
            )
            self._answer(503, b'{"error":"backend unavailable"}')
            return
        log.error("request_failed", method=request.method, path=request.path, request_id=request_id, exc_info=exc)
        self._answer(500, orjson.dumps({"error": "internal server error", "request_id": request_id}))

    def _request_id(self) -> str:
        """The client's X-Request-ID when it looks like one (RequestIdMixin's rule), else a fresh id."""
        if self.request_id is None:
            if "X-Request-Id" in self.fields:
                return self._bind_request_id(bind_logs=False)
            self.request_id = new_request_id()
        return self.request_id

    def _answer(self, status: int, body: bytes) -> None:
        """Write the whole answer in one block, finish the request, log its access line."""
        connection = self.connection
        assert isinstance(connection, HTTP1Connection)
        fields = self.fields
        origin = fields.get("Origin")
        if origin is not None and not origin_allowed(origin, self.request.host, self.broker.settings.allowed_origins):
            origin = None
        close = connection.params.no_keep_alive or fields.get("Connection", "").lower() == "close"
        self.status = status
        # One pre-encoded block through HTTPConnection.write, which Tornado documents for this
        # (no write_headers): the headers are ours, and so is the Connection: close the
        # connection will act on (it decided so from the same request headers).
        connection.write(self.app.answers.encode(status, body, self._request_id(), origin, close))
        connection.finish()
        log_request(self)

    def get_status(self) -> int:
        return self.status
