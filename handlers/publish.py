"""Publishing endpoints: validate, hand the events to the broker, answer 202.

Bodies are streamed so an oversized one is answered 413 instead of the
connection being dropped, and nothing of a batch is published unless all of
it is valid.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from broker.validation import (
    MAX_BATCH_EVENTS,
    BadRequest,
    UnsupportedMediaType,
    ValidationFailed,
    normalize_events,
    parse_body,
)
from handlers.base import ApiHandler
from handlers.body import BufferedBodyHandler, StreamedBodyHandler


class _Publish(ApiHandler):
    """`POST /api/sessions/{id}/events` and `POST /api/events`, whichever way the body was read."""

    #: from the body handler this is mixed with (streamed or buffered)
    accepted_body: Callable[[], bytes | None]
    #: the one session the request publishes to, if it names just one (POST /api/events)
    session_id: str | None = None

    async def post(self, session_id: str | None = None) -> None:
        body = self.accepted_body()
        if body is None:
            return
        try:
            items = parse_body(body, self.request.headers.get("Content-Type"))
            if len(items) > MAX_BATCH_EVENTS:
                self.broker.stats.refused("max_batch_events")
            events = normalize_events(items, session_id=session_id, now=time.time(), owned=True)
        except ValidationFailed as exc:
            self.fail(422, str(exc), details=exc.details)
            return
        except (BadRequest, UnsupportedMediaType) as exc:
            self.fail(exc.status, str(exc))
            return
        named = {event["session_id"] for event in events}
        if len(named) == 1:
            self.session_id = next(iter(named))  # for the access line (broker.logs.named_session)
        refusal = self.broker.admit_sessions(named)
        if refusal is not None:
            self.fail(503, refusal)
            return
        seqs = await self.broker.publish(events)
        self.send_json(202, {"accepted": len(events), "seq": seqs})


class PublishHandler(_Publish, StreamedBodyHandler):
    """Publishing with the body streamed (large, chunked or `Expect: 100-continue` requests)."""


class SmallPublishHandler(_Publish, BufferedBodyHandler):
    """Publishing with the body read whole first (handlers.body.SmallBody)."""
