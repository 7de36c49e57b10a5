"""`Publisher`: publish over HTTP, retrying without ever publishing anything twice.

A publish that timed out may have gone through or not; the only safe retry
sends the same events with the same `event_id`s, which the broker
recognises and does not deliver again (docs/protocol.md section 2.6). So
the Publisher gives every event an `event_id` (a uuid4) before the first
attempt, unless it already has one, and retries the very same body on
timeouts, connection failures and 5xx answers (503: the daemon is draining
or at `max_sessions`), with backoff. A 4xx is the request's fault and is
raised at once as `PublishError` with the broker's details.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, urlsplit

import orjson
import structlog
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse
from tornado.iostream import StreamClosedError

from broker.client.backoff import Backoff
from broker.client.errors import PublishError

__all__ = ["Publisher"]

log = structlog.get_logger("actor_broker.client")

#: The broker takes at most this many events per request (docs/protocol.md section 2.2).
MAX_BATCH = 1000
#: Answers worth retrying: the broker or a proxy in front of it was unavailable, or it failed.
RETRIED_STATUSES = frozenset({500, 502, 503, 504, 599})


class Publisher:
    """Publish events into sessions of the broker at `url` (e.g. http://127.0.0.1:8050).

    ::

        async with Publisher(url, api_key="k1") as publisher:
            seq = await publisher.publish("s1", {"type": "task_started", "task_id": "t1"})
            seqs = await publisher.publish_many([{...}, {...}], session_id="s1")

    Every method returns the broker's `seq` for each event (None for a
    progress event the throttle holds or dropped). `retries` bounds the
    retries of one request; `timeout` bounds each attempt.
    """

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout: float = 10.0,
        retries: int = 5,
        backoff: Backoff | None = None,
        batch_size: int = MAX_BATCH,
    ) -> None:
        if urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be from 1 to {MAX_BATCH}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.batch_size = batch_size
        self._backoff = backoff or Backoff(initial=0.2, maximum=10.0)
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._http = AsyncHTTPClient(force_instance=True)
        #: retries made so far (all requests together)
        self.retried = 0

    async def __aenter__(self) -> Publisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    async def publish(self, session_id: str, event: dict[str, Any]) -> int | None:
        """Publish one event into `session_id`; returns its seq."""
        (seq,) = await self._post(f"/api/sessions/{quote(session_id, safe='')}/events", [_with_id(event)])
        return seq

    async def publish_many(
        self, events: Iterable[dict[str, Any]], *, session_id: str | None = None
    ) -> list[int | None]:
        """Publish events in order; returns their seqs in the same order.

        With `session_id` every event goes to that session; without, each
        event names its own `session_id`. More than `batch_size` events are
        sent as several requests, one after the other: each one is all or
        nothing, so a `PublishError` on a later one leaves the earlier ones published.
        """
        prepared = [_with_id(event) for event in events]
        if session_id is None:
            missing = [i for i, e in enumerate(prepared) if not isinstance(e.get("session_id"), str)]
            if missing:
                raise ValueError(f"without session_id=, every event needs its session_id (missing at {missing[:10]})")
        path = "/api/events" if session_id is None else f"/api/sessions/{quote(session_id, safe='')}/events"
        seqs: list[int | None] = []
        for start in range(0, len(prepared), self.batch_size):
            seqs.extend(await self._post(path, prepared[start : start + self.batch_size]))
        return seqs

    async def _post(self, path: str, events: list[dict[str, Any]]) -> list[int | None]:
        body = orjson.dumps(events if len(events) > 1 else events[0])
        attempt = 0
        while True:
            status, error, details, response = await self._attempt(path, body)
            if response is not None:
                seqs = orjson.loads(response.body)["seq"]
                return list(seqs)
            if status not in RETRIED_STATUSES or attempt >= self.retries:
                if status in RETRIED_STATUSES:
                    error = f"{error} (after {attempt + 1} attempts)"
                raise PublishError(status, error, details)
            delay = self._backoff.delay(attempt)
            attempt += 1
            self.retried += 1
            log.info("publish_retry", path=path, status=status, error=error, attempt=attempt, delay=round(delay, 3))
            await asyncio.sleep(delay)  # the backoff between retries

    async def _attempt(
        self, path: str, body: bytes
    ) -> tuple[int, str, list[dict[str, Any]] | None, HTTPResponse | None]:
        """One POST: (status, error, details, the 2xx response or None)."""
        request = HTTPRequest(
            self.url + path, method="POST", headers=self._headers, body=body, request_timeout=self.timeout,
            connect_timeout=self.timeout,
        )
        try:
            response = await self._http.fetch(request, raise_error=False)
        except HTTPClientError as exc:  # 599: a timeout, or the connection failed
            return exc.code, exc.message or "no answer", None, None
        except (OSError, StreamClosedError) as exc:
            return 599, f"{type(exc).__name__}: {exc}", None, None
        if 200 <= response.code < 300:
            return response.code, "", None, response
        try:
            answer = orjson.loads(response.body)
            return response.code, str(answer.get("error")), answer.get("details"), None
        except (orjson.JSONDecodeError, AttributeError):
            return response.code, response.reason or f"HTTP {response.code}", None, None


def _with_id(event: dict[str, Any]) -> dict[str, Any]:
    """A copy of the event with an event_id: its own, or a new uuid4 (the retry key)."""
    if not isinstance(event, dict):
        raise TypeError(f"an event must be a dict, not {type(event).__name__}")
    if "event_id" in event:
        return dict(event)
    return {**event, "event_id": str(uuid.uuid4())}
