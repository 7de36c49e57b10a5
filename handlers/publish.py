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


@tornado.web.stream_request_body
class PublishHandler(ApiHandler):
    """`POST /api/sessions/{id}/events` and `POST /api/events`."""

    def prepare(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._too_large = False
        if not self.require_publisher():
            return
        length = self.request.headers.get("Content-Length")
        limit = self.broker.settings.max_body_size
        if length is not None and length.isdigit() and int(length) > limit:
            self.fail(413, f"body of {length} bytes is over max_body_size ({limit})")

    def data_received(self, chunk: bytes) -> None:
        if self._too_large or self._finished:
            return
        self._size += len(chunk)
        if self._size > self.broker.settings.max_body_size:
            self._too_large = True
            self._chunks.clear()
            return
        self._chunks.append(chunk)

    async def post(self, session_id: str | None = None) -> None:
        if self._too_large:
            self.fail(413, f"body is over max_body_size ({self.broker.settings.max_body_size})")
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
        seqs = await self.broker.publish(events)
        self.send_json(202, {"accepted": len(events), "seq": seqs})
