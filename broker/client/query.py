"""`Stream.query()`: ask the session's agent, iterate over the answer as it streams.

The broker answers a `query` with session messages (`query_start`, then
`chunk`s, then `complete` or `error`, all sharing a `query_id`;
docs/protocol.md section 3.7). They reach every follower of the session,
so the stream still yields them as usual; an `Answer` receives its own
query's messages besides, and turns them into text chunks and a result.

Which `query_start` is ours: the first one, after we sent the query, that
repeats our query text (and our `user_id`, when we gave one). A session
runs one query at a time, and the broker answers a second one with `busy`
to its sender alone, so a query started by someone else cannot be taken
for ours unless it asked exactly the same thing at the same moment.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Generator
from typing import TYPE_CHECKING, Any

from broker.client.errors import ClientError, QueryBusyError, QueryError

if TYPE_CHECKING:
    from broker.client.stream import Stream

__all__ = ["Answer"]


class Answer:
    """The answer to one query.

    ::

        async for text in stream.query("What changed?"):
            print(text, end="")                 # each chunk as it arrives
        full = await stream.query("And why?")   # or just the full response

    Iterating yields each chunk's `content` and ends at `complete`; an
    `error` message raises `QueryError` (`QueryBusyError` when the session was
    already answering a query). Afterwards `full_response`, `chunks`,
    `query_id` and `messages` (query_start ... complete) are set.
    """

    def __init__(self, stream: Stream, text: str, fields: dict[str, Any], start_timeout: float) -> None:
        if not isinstance(text, str) or not text:
            raise ValueError("a query needs a non-empty string")
        self.stream = stream
        self.text = text
        self.fields = fields
        self.start_timeout = start_timeout
        #: the broker's id for this query, once its query_start arrived
        self.query_id: str | None = None
        #: the chunks' texts, in order
        self.chunks: list[str] = []
        #: every message of this query, query_start first
        self.messages: list[dict[str, Any]] = []
        #: `complete`'s full_response, once it arrived
        self.full_response: str | None = None
        self._inbox: asyncio.Queue[dict[str, Any] | BaseException] = asyncio.Queue()
        self._started: asyncio.Future[None] | None = None
        self._sent = False
        self._done = False

    # -- fed by the stream ---------------------------------------------------

    def offer(self, message: dict[str, Any]) -> None:
        """A session message the stream delivered: take it if it belongs to this query."""
        if self.query_id is None:
            if message.get("type") == "query_start" and self._is_ours(message):
                self.query_id = message.get("query_id")
                self.messages.append(message)
                if self._started is not None and not self._started.done():
                    self._started.set_result(None)
            return
        if message.get("query_id") == self.query_id:
            self._inbox.put_nowait(message)

    def refused(self, code: str, error: str) -> None:
        """The broker answered our `query` with a connection-level `error` (busy, bad_message)."""
        kind = QueryBusyError if code == "busy" else QueryError
        if self._started is not None and not self._started.done():
            self._started.set_exception(kind(code, error))

    def abandoned(self, exc: BaseException) -> None:
        """The stream ended (closed, rejected, session deleted) before the answer did."""
        if self._started is not None and not self._started.done():
            self._started.set_exception(exc)
        self._inbox.put_nowait(exc)

    def sending(self) -> asyncio.Future[None]:
        """Called by the stream just before it sends the query: from now on a query_start may be ours.

        Returns the future that the query_start (or a refusal) settles.
        """
        self._sent = True
        assert self._started is not None
        return self._started

    def _is_ours(self, message: dict[str, Any]) -> bool:
        if not self._sent or message.get("query") != self.text:
            return False
        user_id = self.stream.user_id
        return user_id is None or message.get("user_id") in (None, user_id)

    # -- used by the application ----------------------------------------------

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self._started = loop.create_future()
        await self.stream.begin_query(self)

    async def _next_message(self) -> dict[str, Any]:
        item = await self._inbox.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        if self._done:
            raise StopAsyncIteration
        if self._started is None:
            try:
                await self._start()
            except BaseException:
                self._done = True  # refused, timed out or abandoned: there is no answer to wait for
                raise
        try:
            while True:
                message = await self._next_message()
                self.messages.append(message)
                self.stream.mark_processed(message)
                kind = message.get("type")
                if kind == "chunk":
                    content = str(message.get("content", ""))
                    self.chunks.append(content)
                    return content
                if kind == "complete":
                    self.full_response = message.get("full_response")
                    self._finish()
                    raise StopAsyncIteration
                if kind == "error":
                    self._finish()
                    raise QueryError(str(message.get("code") or "query_failed"), str(message.get("error")), message)
        except (ClientError, asyncio.CancelledError):
            self._finish()
            raise

    def _finish(self) -> None:
        self._done = True
        self.stream.forget_answer(self)

    def __await__(self) -> Generator[Any, None, str]:
        return self._collect().__await__()

    async def _collect(self) -> str:
        async for _ in self:
            pass
        return self.full_response or ""
