"""The runtime's future: awaited on the loop, or `get()` from another thread.

An actor's reply is set on its dispatcher's thread. Whoever waits for it is
woken where they wait: an `await` on any asyncio loop, a blocking `get()` on
another thread through a lazily created `threading.Event` (most futures are
awaited, or answered before anyone asks, and never need one).

A blocking `get()` is decided by the future's dispatcher
(`Dispatcher.wait_for`): the IOLoop dispatcher refuses it on its own thread
with `BlockingGetError` (it would deadlock the loop), the test dispatcher
runs its actors until the answer is there.

Part of the actor runtime (`actors.dispatcher`, `actors.future`,
`actors.inbox`, `actors.registry`, `actors.runtime`): only these modules may
touch pykka internals (here `pykka.Future`'s get-hook), and pykka is pinned
to its minor version for that reason.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
import threading
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import pykka

if TYPE_CHECKING:
    from pykka._types import OptExcInfo

    from actors.dispatcher import Dispatcher

__all__ = ["BlockingGetError", "LoopFuture"]

_UNSET: Any = object()
_future_lock = threading.Lock()
# Set while a LoopFuture is being awaited, so that a get-hook (map/join/stop)
# that reaches a pending inner future reports it instead of blocking.
_awaiting: contextvars.ContextVar[bool] = contextvars.ContextVar("_awaiting", default=False)


class BlockingGetError(RuntimeError):
    """A blocking `get()` was called on the dispatcher thread for a pending reply."""


class _Pending(Exception):  # noqa: N818 - a control-flow signal, never seen outside this module
    def __init__(self, future: LoopFuture) -> None:
        self.future = future


class LoopFuture(pykka.Future[Any]):
    """A pykka future that can be awaited on the loop or `get()` from threads.

    `dispatcher` is the one whose actor answers (the dispatcher installed
    when the future was made); it decides what a blocking `get()` on a
    pending future does. Without one, `get()` simply waits for the result.
    pykka makes derived futures (`map`, `filter`, `join`, `reduce`) with no
    argument; they get through their inner futures, whose dispatcher decides.
    """

    __slots__ = ("_dispatcher", "_event", "_exc_info", "_value", "_waiters")

    def __init__(self, dispatcher: Dispatcher | None = None) -> None:
        super().__init__()
        self._dispatcher = dispatcher
        self._value: Any = _UNSET
        self._exc_info: OptExcInfo | None = None
        self._event: threading.Event | None = None
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] | None = None

    def done(self) -> bool:
        return self._value is not _UNSET or self._exc_info is not None

    def _result(self) -> Any:
        if self._exc_info is not None:
            exc_type, exc_value, exc_tb = self._exc_info
            if exc_value is None:
                assert exc_type is not None
                exc_value = exc_type()
            raise exc_value.with_traceback(exc_tb)
        return self._value

    def get(self, *, timeout: float | None = None) -> Any:
        if self._get_hook is not None:
            return super().get(timeout=timeout)
        if self.done():
            return self._result()
        if _awaiting.get():
            raise _Pending(self)
        if self._dispatcher is not None:
            self._dispatcher.wait_for(self, timeout)
        else:
            self.wait_blocking(timeout)
        if not self.done():
            raise pykka.Timeout(f"{timeout} seconds")
        return self._result()

    def wait_blocking(self, timeout: float | None) -> bool:
        """Block this thread until the result is set or `timeout` passes; return `done()`.

        Thread-safe; never call it on the thread that sets the result.
        """
        with _future_lock:
            if not self.done() and self._event is None:
                self._event = threading.Event()
            event = self._event
        if event is not None:
            event.wait(timeout)
        return self.done()

    def _resolve(self) -> None:
        with _future_lock:
            event, waiters = self._event, self._waiters
            self._waiters = None
        if event is not None:
            event.set()
        if waiters:
            running = asyncio.events._get_running_loop()  # noqa: SLF001 - the cheap, non-raising lookup
            for loop, waiter in waiters:
                if loop is running:  # same thread: set it now (its awaiter resumes in a later callback)
                    _wake(waiter)
                else:
                    loop.call_soon_threadsafe(_wake, waiter)

    def set(self, value: Any = None) -> None:
        if self.done() or self._get_hook is not None:
            raise ValueError("future already has a result")
        self._value = value
        self._resolve()

    def set_exception(self, exc_info: OptExcInfo | None = None) -> None:
        if self.done() or self._get_hook is not None:
            raise ValueError("future already has a result")
        self._exc_info = exc_info if exc_info is not None else sys.exc_info()
        self._resolve()

    def _wait_async(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        with _future_lock:
            if self.done():
                waiter.set_result(None)
            else:
                if self._waiters is None:
                    self._waiters = []
                self._waiters.append((loop, waiter))
        return waiter

    def __await__(self) -> Generator[Any, None, Any]:
        while True:
            token = _awaiting.set(True)
            try:
                return self.get()
            except _Pending as pending:
                waiter = pending.future._wait_async()  # noqa: SLF001
            finally:
                _awaiting.reset(token)
            yield from waiter.__await__()

    __iter__ = __await__


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
