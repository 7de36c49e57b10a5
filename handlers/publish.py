"""Publishing endpoints: validate, hand the events to the broker, answer 202.

Bodies are streamed so an oversized one is answered 413 instead of the
connection being dropped, and nothing of a batch is published unless all of
it is valid.
"""

from __future__ import annotations

import time

import tornado.web

from broker.validation import BadRequest, UnsupportedMediaType, ValidationFailed, normalize_events, parse_body
from handlers.base import ApiHandler

#: A refusal decided before the body arrives (401/403, or 413 by Content-Length)
#: is answered only once the body has been read and discarded, up to this many
#: bytes. Most HTTP clients write the whole body before they read anything, and a
#: server that answers and closes while body bytes are still arriving makes the
#: client's kernel reset the connection: the client sees a dropped connection,
#: never the answer. Past this size the answer goes out at once and the
#: connection is closed, so a refused client cannot keep the server reading.
DRAIN_LIMIT = 64 * 1024 * 1024


@tornado.web.stream_request_body
class PublishHandler(ApiHandler):
    """`POST /api/sessions/{id}/events` and `POST /api/events`."""

    def prepare(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        #: (status, error) to answer instead of publishing; the body is then discarded
        self._refusal: tuple[int, str] | None = self.publisher_refusal()
        length = self.request.headers.get("Content-Length")
        declared = int(length) if length is not None and length.isascii() and length.isdigit() else None
        limit = self.broker.settings.max_body_size
        if self._refusal is None and declared is not None and declared > limit:
            self._refusal = (413, f"body of {declared} bytes is over max_body_size ({limit})")
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
            self._refusal = (413, f"body is over max_body_size ({limit})")
        if self._refusal is None:
            self._chunks.append(chunk)
            return
        self._chunks.clear()
        if self._size > DRAIN_LIMIT:
            self.refuse(*self._refusal)

    async def post(self, session_id: str | None = None) -> None:
        if self._finished:  # refused before the whole body came
            return
        if self._refusal is not None:
            self.refuse(*self._refusal)
            return
        if self.broker.draining:
            self.fail(503, "server is shutting down")
            return
        try:
            items = parse_body(b"".join(self._chunks), self.request.headers.get("Content-Type"))
            events = normalize_events(items, session_id=session_id, now=time.time())
        except ValidationFailed as exc:
            self.fail(422, str(exc), details=exc.details)
            return
        except (BadRequest, UnsupportedMediaType) as exc:
            self.fail(exc.status, str(exc))
            return
        refusal = self.broker.admit_sessions(event["session_id"] for event in events)
        if refusal is not None:
            self.fail(503, refusal)
            return
        seqs = await self.broker.publish(events)
        self.send_json(202, {"accepted": len(events), "seq": seqs})
