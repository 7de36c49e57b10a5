"""Dispatchers: what runs ready actors' messages, on which thread, and when.

An actor's inbox, on `put`, only marks the actor ready on its `Dispatcher`;
the dispatcher gives each ready actor a turn of at most `batch` messages,
one actor after another, on a single thread. Two dispatchers exist:
`LoopDispatcher` drives actors from a Tornado IOLoop (the daemon), and
`broker.testing.ManualDispatcher` drives them only when a test says so.
Actor classes do not know which one runs them.

`install_dispatcher` chooses the dispatcher new actors run on. It is also
the one place that installs the O(1) actor registry (`actors.registry`):
no `LoopActor` can be made before a dispatcher is installed, so none can
register before the registry is ready for connection churn.

Part of the actor runtime (`actors.dispatcher`, `actors.future`,
`actors.inbox`, `actors.registry`, `actors.runtime`): only these modules may
touch pykka internals.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pykka import ActorRef, ActorRegistry

from actors.future import BlockingGetError
from actors.registry import install_fast_registry

if TYPE_CHECKING:
    from actors.clock import Clock
    from actors.future import LoopFuture
    from actors.inbox import Inbox

__all__ = [
    "DEFAULT_BATCH",
    "Dispatcher",
    "LoopDispatcher",
    "current_dispatcher",
    "install_dispatcher",
    "installed_dispatcher",
]

logger = logging.getLogger("pykka")

#: How many messages one actor may handle before the dispatcher moves on.
DEFAULT_BATCH = 64


class Dispatcher:
    """Runs ready actors' messages in batches, one actor after another.

    Subclasses decide *when* `run_ready()` happens (`_request_run`) and
    provide the clock. All methods except `submit_from_thread` and
    `wait_for` must be called on the dispatcher's thread.
    """

    clock: Clock

    def __init__(self, *, batch: int = DEFAULT_BATCH) -> None:
        self.batch = batch
        self.thread_id = threading.get_ident()
        self._ready: deque[Inbox] = deque()
        self._run_requested = False
        #: drained mailbox deques for reuse, on this dispatcher's thread only (actors.inbox.SPARE_QUEUES_MAX)
        self.spare_queues: list[deque[Any]] = []

    # -- called by inboxes ------------------------------------------------

    def on_thread(self) -> bool:
        return threading.get_ident() == self.thread_id

    def mark_ready(self, inbox: Inbox) -> None:
        self._ready.append(inbox)
        if not self._run_requested:
            self._run_requested = True
            self._request_run()

    def submit_from_thread(self, callback: Callable[[], None]) -> None:
        """Run `callback` on the dispatcher thread soon. Thread-safe."""
        raise NotImplementedError

    def _request_run(self) -> None:
        raise NotImplementedError

    # -- called by futures --------------------------------------------------

    def wait_for(self, future: LoopFuture, timeout: float | None) -> None:
        """Block until `future`, answered by one of this dispatcher's actors, is done.

        Called by a blocking `get()` on a pending future, from any thread;
        it returns when the future is done or `timeout` has passed (the
        caller raises `pykka.Timeout` then). On the dispatcher's own thread
        the answer can never come while this thread waits, so it raises
        `BlockingGetError` instead of deadlocking; await the future there.
        """
        if self.on_thread():
            msg = (
                "blocking get() on the actor dispatcher's thread would deadlock "
                "the event loop: 'await' the future instead"
            )
            raise BlockingGetError(msg)
        future.wait_blocking(timeout)

    # -- running ------------------------------------------------------------

    def run_ready(self, max_turns: int | None = None) -> int:
        """Give each ready actor one turn (at most `batch` messages).

        Runs the actors that were ready when it was called, plus those that
        became ready meanwhile, up to `max_turns`. Returns the number of
        turns taken. An actor with messages left goes to the back of the queue,
        so a flooded actor cannot starve the others.
        """
        self._run_requested = False
        turns = self._turns(max_turns)
        if self._ready and not self._run_requested:
            self._run_requested = True
            self._request_run()
        return turns

    def run_now(self, max_turns: int) -> int:
        """Up to `max_turns` turns here and now, ahead of the run already asked for.

        For a caller on the dispatcher's thread, outside any actor's turn (a
        handler), whose next step should come after what it just told the
        actors: the publish handlers deliver an event to its session's
        connections before they write the publisher's answer (issue 14), so
        the answer's write does not sit between the publish and its
        deliveries. The run asked for earlier still comes and takes what is
        left. A fresh context, as a tick's: the caller's bound log fields stay
        out of the actors' lines.
        """
        if not self._ready:  # nothing was told (a publish without a follower here): no context to make
            return 0
        return contextvars.Context().run(self._turns, max_turns)

    def _turns(self, max_turns: int | None) -> int:
        ready = self._ready
        turns = 0
        batch = self.batch
        while ready and (max_turns is None or turns < max_turns):
            inbox = ready.popleft()
            turns += 1
            if inbox.run_batch(batch):
                ready.append(inbox)
        return turns

    @property
    def idle(self) -> bool:
        return not self._ready

    def actors(self, actor_class: type | None = None) -> list[ActorRef[Any]]:
        """Live actors this dispatcher runs, oldest first (optionally only those of `actor_class`).

        A scan of pykka's registry, for shutdown, metrics and tests: never on
        a per-message path. Thread-safe (the registry locks).
        """
        return [
            ref
            for ref in ActorRegistry.get_all()
            if getattr(ref.actor_inbox, "dispatcher", None) is self
            and ref.is_alive()
            and (actor_class is None or issubclass(ref.actor_class, actor_class))
        ]

    def ready_count(self) -> int:
        return len(self._ready)


class LoopDispatcher(Dispatcher):
    """Dispatcher driven by a Tornado IOLoop (the daemon's runtime).

    Create it on the thread that runs the loop. Each loop iteration gives at
    most `turns_per_tick` actor turns before yielding back to the loop, so
    socket I/O and timers interleave with actor work.
    """

    def __init__(self, io_loop: Any, *, batch: int = DEFAULT_BATCH, turns_per_tick: int = 512) -> None:
        from actors.clock import LoopClock

        super().__init__(batch=batch)
        self.io_loop = io_loop
        self.asyncio_loop: asyncio.AbstractEventLoop = io_loop.asyncio_loop
        self.turns_per_tick = turns_per_tick
        self.clock = LoopClock(self.asyncio_loop)

    def _request_run(self) -> None:
        # A fresh context: actor turns must not inherit whatever the caller had
        # bound (a request id in a handler, say) into their log lines.
        self.asyncio_loop.call_soon(self._tick, context=contextvars.Context())

    def _tick(self) -> None:
        self.run_ready(self.turns_per_tick)

    def submit_from_thread(self, callback: Callable[[], None]) -> None:
        try:
            self.asyncio_loop.call_soon_threadsafe(callback, context=contextvars.Context())
        except RuntimeError:  # loop closed: the actor is gone with it
            logger.debug("dispatcher loop closed; message dropped")


_dispatcher: Dispatcher | None = None


def install_dispatcher(dispatcher: Dispatcher | None) -> Dispatcher | None:
    """Make `dispatcher` the one new actors run on; return the previous one.

    Actors keep the dispatcher they were started on. Installing a dispatcher
    also makes pykka's `ActorRegistry` O(1) per register / unregister
    (`actors.registry`), before any actor of it can register.
    """
    global _dispatcher
    if dispatcher is not None:
        install_fast_registry()
    previous, _dispatcher = _dispatcher, dispatcher
    return previous


def installed_dispatcher() -> Dispatcher | None:
    """The dispatcher new actors run on, or None if none is installed."""
    return _dispatcher


def current_dispatcher() -> Dispatcher:
    """The dispatcher new actors run on; a clear error if none is installed."""
    if _dispatcher is None:
        msg = (
            "no actor dispatcher installed: call "
            "actors.runtime.install_dispatcher(LoopDispatcher(io_loop)) on the loop thread, "
            "or use broker.testing.ActorHarness in tests"
        )
        raise RuntimeError(msg)
    return _dispatcher
