"""POST bodies: streamed, bounded, and refused with an answer, never a reset.

Every state-changing POST reads its body through `StreamedBodyHandler`, so
auth and `max_body_size` are checked before any of the body is kept: a
refused client cannot make the server hold a large body.

The publish endpoints, the hot path, also have a buffered twin
(`BufferedBodyHandler`) that the route table picks for a body small enough to
read whole (`SmallBody`): streaming costs two more event-loop turns per
request, and a body that fits the server's own limit is no risk to read.
Both answer every request the same way.
"""

from __future__ import annotations

from typing import Any

import tornado.httputil
import tornado.routing
import tornado.web

from broker.core import Broker
from handlers.base import ApiHandler

#: A refusal decided before the body arrives (401/403, or 413 by Content-Length)
#: is answered only once the body has been read and discarded, up to this many
#: bytes. Most HTTP clients write the whole body before they read anything, and a
#: server that answers and closes while body bytes are still arriving makes the
#: client's kernel reset the connection: the client sees a dropped connection,
#: never the answer. Past this size the answer goes out at once and the
#: connection is closed, so a refused client cannot keep the server reading.
DRAIN_LIMIT = 16 * 1024 * 1024

#: Content-Type prefixes whose bodies Tornado parses itself in a handler that
#: does not stream (tornado.httputil.parse_body_arguments matches them so).
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


class _BodyReader(ApiHandler):
    """What both body readers decide alike: the 413, and the answer once the body is in."""

    def _too_large(self, size: int | None = None) -> tuple[int, str]:
        """The 413 for a body over max_body_size (its size, when known), counted as a refusal."""
        self.broker.stats.refused("max_body_size")
        what = "body" if size is None else f"body of {size} bytes"
        return 413, f"{what} is over max_body_size ({self.broker.settings.max_body_size})"

    def _accept(self, refusal: tuple[int, str] | None, body: bytes) -> bytes | None:
        """`body`, or None after answering the refusal (or 503 while draining)."""
        if refusal is not None:
            self.refuse(*refusal)
            return None
        if self.broker.draining:
            self.fail(503, "server is shutting down")
            return None
        return body


@tornado.web.stream_request_body
class StreamedBodyHandler(_BodyReader):
    """Collects the body of an authorised request up to max_body_size; refuses the rest."""

    def prepare(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        limit = self.broker.settings.max_body_size
        # The server's own limit is low (it applies to bodies nobody streams);
        # here a body may run up to what we read before answering.
        self.request.connection.set_max_body_size(max(limit, DRAIN_LIMIT) + 1)
        #: (status, error) to answer instead of handling; the body is then discarded
        self._refusal: tuple[int, str] | None = self.publisher_refusal()
        length = self.request.headers.get("Content-Length")
        declared = int(length) if length is not None and length.isascii() and length.isdigit() else None
        if self._refusal is None and declared is not None and declared > limit:
            self._refusal = self._too_large(declared)
        if self._refusal is not None and not self._drain_first(declared):
            self.refuse(*self._refusal)

    def _drain_first(self, declared: int | None) -> bool:
        """Whether to read the body before answering a refusal (see DRAIN_LIMIT)."""
        if self.request.headers.get("Expect", "").lower() == "100-continue":
            return False  # the client sends no body until it hears from us
        return declared is None or declared <= DRAIN_LIMIT

    def data_received(self, chunk: bytes) -> None:
        if self._finished:
            return
        self._size += len(chunk)
        limit = self.broker.settings.max_body_size
        if self._refusal is None and self._size > limit:
            self._refusal = self._too_large()
        if self._refusal is None:
            self._chunks.append(chunk)
            return
        self._chunks.clear()
        if self._size > DRAIN_LIMIT:
            self.refuse(*self._refusal)

    def accepted_body(self) -> bytes | None:
        """The body, or None after answering (refused, or draining)."""
        if self._finished:  # refused before the whole body came
            return None
        return self._accept(self._refusal, b"".join(self._chunks))


class BufferedBodyHandler(_BodyReader):
    """A body Tornado has already read whole (at most `SmallBody`'s limit), checked as StreamedBodyHandler does."""

    def accepted_body(self) -> bytes | None:
        """The body, or None after answering (refused, too large, draining)."""
        body = self.request.body
        refusal = self.publisher_refusal()
        if refusal is None and len(body) > self.broker.settings.max_body_size:
            refusal = self._too_large(len(body))
        return self._accept(refusal, body)


class SmallBody(tornado.routing.PathMatches):
    """A path whose request declares a body small enough to read whole before answering.

    That is: a Content-Length of at most the server's own body limit and
    `max_body_size`; no `Expect: 100-continue` (such a client waits to be
    told before it sends, which only the streamed handler can do); and not a
    form type, which Tornado would parse (or answer 400) before the handler
    could refuse it with 415. Anything else goes on to the next rule: the
    streamed handler.
    """

    def __init__(self, path_pattern: str, broker: Broker, server_limit: int) -> None:
        super().__init__(path_pattern)
        self.broker = broker
        self.server_limit = server_limit

    def match(self, request: tornado.httputil.HTTPServerRequest) -> dict[str, Any] | None:
        matched = super().match(request)  # the path first: most requests stop here
        if matched is None:
            return None
        if not read_whole(request.headers, min(self.server_limit, self.broker.settings.max_body_size)):
            return None
        return matched


def read_whole(headers: tornado.httputil.HTTPHeaders, limit: int) -> bool:
    """Whether a request with these headers may have its body read whole before it is answered (`SmallBody`).

    Also the rule of the lean publish path (handlers/fast_publish.py), so both
    take the same requests.
    """
    return whole_body(headers.get("Content-Length"), "Expect" in headers, headers.get("Content-Type", ""), limit)


def whole_body(length: str | None, expect: bool, content_type: str, limit: int) -> bool:
    """`read_whole` on the values of the headers it reads (Content-Length, whether Expect is there, Content-Type)."""
    if length is None or not (length.isascii() and length.isdigit()) or expect:
        return False
    if content_type.startswith(_FORM_TYPES):
        return False
    return int(length) <= limit
