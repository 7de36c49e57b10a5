"""A pykka runtime that multiplexes many actors on one event-loop thread.

`pykka.ThreadingActor` gives every actor an OS thread; past a few thousand
actors that costs more in context switches and memory than the work itself
(see DESIGN.md). `LoopActor` keeps pykka's API and semantics (`start`,
`tell`, `ask`, proxies, `on_start` / `on_stop` / `on_failure`, `stop`,
`ActorRegistry`) but its inbox, on `put`, only marks the actor ready on a
`Dispatcher`; the dispatcher runs a bounded batch of each ready actor's
messages in turn on a single thread.

Two dispatchers exist: `LoopDispatcher` drives actors from a Tornado IOLoop
(the daemon), and `broker.testing.ManualDispatcher` drives them only when a
test says so. Actor classes do not know which one runs them.

Threading rules:

* `ActorRef.tell` and `ask` are safe from any thread. A put from the
  dispatcher's own thread is a deque append; from another thread it is
  handed over with one thread-safe callback.
* Every actor hook (`on_start`, `on_receive`, `on_stop`, `on_failure`) runs
  on the dispatcher's thread, never concurrently with another hook.
* A blocking `Future.get()` on the dispatcher's thread for a reply that has
  not arrived yet would deadlock the loop; it raises `BlockingGetError`
  instead. Await the future there.

This module is the only one that touches pykka internals (it is pinned to
pykka's minor version for that reason).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import sys
import threading
import uuid
from collections import deque
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any

import pykka
from pykka import ActorDeadError, ActorRef, ActorRegistry, messages
from pykka._envelope import Envelope

if TYPE_CHECKING:
    from pykka._types import OptExcInfo

    from actors.clock import Clock, TimerHandle

__all__ = [
    "BlockingGetError",
    "Dispatcher",
    "LoopActor",
    "LoopDispatcher",
    "LoopFuture",
    "current_dispatcher",
    "install_dispatcher",
]

logger = logging.getLogger("pykka")
_get_ident = threading.get_ident

#: Messages that pykka itself interprets; everything else goes to on_receive.
_PYKKA_MESSAGES = frozenset(
    {messages._ActorStop, messages.ProxyCall, messages.ProxyGetAttr, messages.ProxySetAttr}  # noqa: SLF001
)

#: How many messages one actor may handle before the dispatcher moves on.
DEFAULT_BATCH = 64


class BlockingGetError(RuntimeError):
    """A blocking `get()` was called on the dispatcher thread for a pending reply."""


# --------------------------------------------------------------------------
# Registry: pykka keeps running actors in a list, so unregistering is O(n).
# Churn of tens of thousands of connection actors would feel that, so the
# list is replaced by an insertion-ordered set that answers the same calls.
# --------------------------------------------------------------------------


class _OrderedRefSet:
    """The subset of `list` that `pykka.ActorRegistry` uses, in O(1) per call."""

    __slots__ = ("_refs",)

    def __init__(self, refs: Any = ()) -> None:
        self._refs: dict[ActorRef[Any], None] = dict.fromkeys(refs)

    def append(self, ref: ActorRef[Any]) -> None:
        self._refs[ref] = None

    def remove(self, ref: ActorRef[Any]) -> None:
        del self._refs[ref]

    def __contains__(self, ref: object) -> bool:
        return ref in self._refs

    def __iter__(self) -> Iterator[ActorRef[Any]]:
        return iter(list(self._refs))

    def __len__(self) -> int:
        return len(self._refs)

    def __getitem__(self, index: slice) -> list[ActorRef[Any]]:
        return list(self._refs)[index]


def _install_fast_registry() -> None:
    with ActorRegistry._actor_refs_lock:  # noqa: SLF001
        if not isinstance(ActorRegistry._actor_refs, _OrderedRefSet):  # noqa: SLF001
            ActorRegistry._actor_refs = _OrderedRefSet(ActorRegistry._actor_refs)  # type: ignore[assignment]  # noqa: SLF001


_install_fast_registry()


# --------------------------------------------------------------------------
# Dispatchers
# --------------------------------------------------------------------------


class Dispatcher:
    """Runs ready actors' messages in batches, one actor after another.

    Subclasses decide *when* `run_ready()` happens (`_request_run`) and
    provide the clock. All methods except `submit_from_thread` must be called
    on the dispatcher's thread.
    """

    clock: Clock

    def __init__(self, *, batch: int = DEFAULT_BATCH) -> None:
        self.batch = batch
        self.thread_id = threading.get_ident()
        self._ready: deque[_Inbox] = deque()
        self._run_requested = False
        #: drained mailbox deques for reuse, on this dispatcher's thread only (SPARE_QUEUES_MAX)
        self.spare_queues: list[deque[Any]] = []

    # -- called by inboxes ------------------------------------------------

    def on_thread(self) -> bool:
        return threading.get_ident() == self.thread_id

    def mark_ready(self, inbox: _Inbox) -> None:
        self._ready.append(inbox)
        if not self._run_requested:
            self._run_requested = True
            self._request_run()

    def submit_from_thread(self, callback: Callable[[], None]) -> None:
        """Run `callback` on the dispatcher thread soon. Thread-safe."""
        raise NotImplementedError

    def _request_run(self) -> None:
        raise NotImplementedError

    # -- running ------------------------------------------------------------

    def run_ready(self, max_turns: int | None = None) -> int:
        """Give each ready actor one turn (at most `batch` messages).

        Runs the actors that were ready when it was called, plus those that
        became ready meanwhile, up to `max_turns`. Returns the number of
        turns taken. An actor with messages left goes to the back of the queue,
        so a flooded actor cannot starve the others.
        """
        self._run_requested = False
        ready = self._ready
        turns = 0
        batch = self.batch
        while ready and (max_turns is None or turns < max_turns):
            inbox = ready.popleft()
            turns += 1
            if inbox.run_batch(batch):
                ready.append(inbox)
        if ready and not self._run_requested:
            self._run_requested = True
            self._request_run()
        return turns

    @property
    def idle(self) -> bool:
        return not self._ready

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

    Actors keep the dispatcher they were started on.
    """
    global _dispatcher
    previous, _dispatcher = _dispatcher, dispatcher
    return previous


def current_dispatcher() -> Dispatcher:
    if _dispatcher is None:
        msg = (
            "no actor dispatcher installed: call "
            "actors.runtime.install_dispatcher(LoopDispatcher(io_loop)) on the loop thread, "
            "or use broker.testing.ActorHarness in tests"
        )
        raise RuntimeError(msg)
    return _dispatcher


# --------------------------------------------------------------------------
# Futures
# --------------------------------------------------------------------------

_UNSET: Any = object()
_future_lock = threading.Lock()
# Set while a LoopFuture is being awaited, so that a get-hook (map/join/stop)
# that reaches a pending inner future reports it instead of blocking.
_awaiting: contextvars.ContextVar[bool] = contextvars.ContextVar("_awaiting", default=False)


class _Pending(Exception):  # noqa: N818
    def __init__(self, future: LoopFuture[Any]) -> None:
        self.future = future


class LoopFuture(pykka.Future[Any]):
    """A pykka future that can be awaited on the loop or `get()` from threads.

    The result is set on the dispatcher thread (an actor's reply). Waiters are
    woken where they wait: an `await` on any asyncio loop, a `get()` on
    another thread via a lazily created event (most futures never need one).
    """

    __slots__ = ("_dispatcher", "_event", "_exc_info", "_value", "_waiters")

    def __init__(self, dispatcher: Dispatcher | None = None) -> None:
        super().__init__()
        self._dispatcher = dispatcher if dispatcher is not None else _dispatcher
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
        dispatcher = self._dispatcher
        if dispatcher is not None and dispatcher.on_thread():
            wait = getattr(dispatcher, "wait_for", None)
            if wait is None:
                msg = (
                    "blocking get() on the actor dispatcher's thread would deadlock "
                    "the event loop: 'await' the future instead"
                )
                raise BlockingGetError(msg)
            wait(self, timeout)
            if not self.done():
                raise pykka.Timeout(f"{timeout} seconds")
            return self._result()
        with _future_lock:
            if not self.done() and self._event is None:
                self._event = threading.Event()
            event = self._event
        if event is not None and not event.wait(timeout):
            raise pykka.Timeout(f"{timeout} seconds")
        return self._result()

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


# --------------------------------------------------------------------------
# Actors
# --------------------------------------------------------------------------


class _StoppedFlag:
    """The part of `threading.Event` that pykka reads (`is_set`, `set`).

    A real Event costs a lock and a condition per actor; actors that live on
    one thread do not need them.
    """

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True

    def wait(self, timeout: float | None = None) -> bool:  # pragma: no cover - API parity
        return self._set


class _Start:
    """Inbox marker: run `on_start` before anything else."""


_START = _Start()

#: Inbox items that need more than a plain on_receive call.
_SPECIAL_ITEMS = frozenset({Envelope, _Start, *_PYKKA_MESSAGES})


#: Empty mailbox deques a dispatcher keeps for the next inbox that gets mail
#: (Dispatcher.spare_queues). A drained inbox gives its deque back instead of
#: freeing it: an actor that gets one message at a time (the usual case)
#: would otherwise allocate and free a ~600-byte deque per message. Bounded,
#: so idle actors still hold none.
SPARE_QUEUES_MAX = 1024


class _Inbox:
    """An actor's mailbox. Holds plain messages (tell) and Envelopes (ask).

    The deque exists only while mail waits: most actors are idle most of the
    time, and an empty deque costs ~600 bytes per actor. Drained deques are
    reused (SPARE_QUEUES_MAX).
    """

    __slots__ = ("actor", "dispatcher", "queue", "scheduled")

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.actor: LoopActor | None = None
        self.queue: deque[Any] | None = None
        self.scheduled = False

    # pykka's ActorInbox protocol ------------------------------------------------

    def put(self, item: Any, /) -> None:
        dispatcher = self.dispatcher
        if _get_ident() != dispatcher.thread_id:
            dispatcher.submit_from_thread(lambda: self._put_local(item))
            return
        self._put_local(item)

    def get(self) -> Any:
        if not self.queue:
            raise IndexError("inbox is empty")
        return self.queue.popleft()

    def empty(self) -> bool:
        return not self.queue

    # runtime ------------------------------------------------------------------

    def _put_local(self, item: Any) -> None:
        actor = self.actor
        if actor is None or actor._stopped._set:  # noqa: SLF001
            _reject(item, actor)
            return
        queue = self.queue
        if queue is None:
            spare = self.dispatcher.spare_queues
            queue = self.queue = spare.pop() if spare else deque()
        queue.append(item)
        if not self.scheduled:
            self.scheduled = True
            self.dispatcher.mark_ready(self)

    def run_batch(self, batch: int) -> bool:
        """Handle up to `batch` messages; return True if more are waiting."""
        actor = self.actor
        queue = self.queue
        assert actor is not None and queue is not None
        stopped = actor._stopped  # noqa: SLF001
        on_receive = actor.on_receive
        receive_one = actor._receive_one  # noqa: SLF001
        special = _SPECIAL_ITEMS
        n = 0
        while queue and n < batch:
            item = queue.popleft()
            n += 1
            if item.__class__ in special:
                receive_one(item)
            else:
                # Fast path for a plain tell; failures handled as in _receive_one.
                try:
                    on_receive(item)
                except Exception:  # noqa: BLE001 - an actor's failure is logged and stops it
                    actor._fail(*sys.exc_info())  # noqa: SLF001
                except BaseException:  # noqa: BLE001
                    actor._fail_hard()  # noqa: SLF001
            if stopped._set:  # noqa: SLF001
                actor._teardown()  # noqa: SLF001
                self.scheduled = False
                return False
        if queue:
            return True
        self.scheduled = False
        self.queue = None
        spare = self.dispatcher.spare_queues
        if len(spare) < SPARE_QUEUES_MAX:
            spare.append(queue)
        return False

    def __len__(self) -> int:
        return len(self.queue) if self.queue is not None else 0


def _reject(item: Any, actor: LoopActor | None) -> None:
    """Answer a message that reached a stopped actor the way pykka does."""
    if item.__class__ is Envelope and item.reply_to is not None:
        if isinstance(item.message, messages._ActorStop):  # noqa: SLF001
            item.reply_to.set(None)
        else:
            item.reply_to.set_exception(
                exc_info=(ActorDeadError, ActorDeadError(f"{actor} stopped before handling the message"), None)
            )


class LoopActorRef(ActorRef[Any]):
    """`pykka.ActorRef` with a shorter `tell` path (no Envelope for tells)."""

    # pykka.ActorRef's own attributes, in slots: one ref per actor, 100 000 actors.
    __slots__ = ("_actor_weakref", "actor_class", "actor_inbox", "actor_stopped", "actor_urn")

    def tell(self, message: Any) -> None:
        if self.actor_stopped._set:  # type: ignore[attr-defined]  # noqa: SLF001
            msg = f"{self} not found"
            raise ActorDeadError(msg)
        if message.__class__ is Envelope:  # keep "Envelope means ask" unambiguous
            message = Envelope(message)
        inbox: _Inbox = self.actor_inbox  # type: ignore[assignment]
        if _get_ident() != inbox.dispatcher.thread_id:
            inbox.dispatcher.submit_from_thread(lambda: inbox._put_local(message))  # noqa: SLF001
            return
        # The hot path of every delivery: _Inbox._put_local inlined.
        queue = inbox.queue
        if queue is None:
            spare = inbox.dispatcher.spare_queues
            queue = inbox.queue = spare.pop() if spare else deque()
        queue.append(message)
        if not inbox.scheduled:
            inbox.scheduled = True
            inbox.dispatcher.mark_ready(inbox)


class LoopActor(pykka.Actor):
    """A pykka actor that runs on the installed `Dispatcher` instead of a thread.

    Subclass it exactly like `pykka.ThreadingActor`. Hooks run on the
    dispatcher thread. An exception in `on_receive` for a `tell` stops this
    actor (logged, `on_failure` called); other actors keep running. For an
    `ask`, the exception goes to the caller and the actor lives on.

    Timers: `self.clock` is the dispatcher's clock; `self.tell_later(delay,
    message)` delivers `message` to this actor after `delay` seconds (not if
    it has stopped by then).
    """

    # What every actor has, in slots rather than in its instance dict.
    __slots__ = ("_actor_ref", "_stopped", "actor_inbox", "actor_stopped", "actor_urn", "dispatcher")

    _stopped: _StoppedFlag

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        # Deliberately not pykka.Actor.__init__: that allocates a
        # threading.Event per actor, which 100 000 actors cannot afford.
        dispatcher = current_dispatcher()
        self.actor_urn = uuid.uuid4().urn
        inbox = _Inbox(dispatcher)
        inbox.actor = self
        self.actor_inbox = inbox
        self._stopped = _StoppedFlag()
        self.actor_stopped = self._stopped  # type: ignore[assignment]
        self._actor_ref = LoopActorRef(self)
        self.dispatcher = dispatcher

    @property
    def clock(self) -> Clock:
        return self.dispatcher.clock

    @staticmethod
    def _create_actor_inbox() -> _Inbox:  # pragma: no cover - __init__ builds the inbox
        return _Inbox(current_dispatcher())

    @staticmethod
    def _create_future() -> LoopFuture:
        return LoopFuture()

    def _start_actor_loop(self) -> None:
        inbox: _Inbox = self.actor_inbox  # type: ignore[assignment]
        if inbox.queue is None:
            inbox.queue = deque()
        inbox.queue.appendleft(_START)
        if inbox.dispatcher.on_thread():
            if not inbox.scheduled:
                inbox.scheduled = True
                inbox.dispatcher.mark_ready(inbox)
        else:
            inbox.dispatcher.submit_from_thread(lambda: _schedule(inbox))

    def _receive_one(self, item: Any) -> None:
        if item is _START:
            self._actor_loop_setup()
            return
        if item.__class__ is Envelope:
            reply_to = item.reply_to
            message = item.message
        else:
            reply_to = None
            message = item
        try:
            if message.__class__ in _PYKKA_MESSAGES:
                response = self._handle_receive(message)
            else:
                response = self.on_receive(message)
            if reply_to is not None:
                reply_to.set(response)
        except Exception:
            if reply_to is not None:
                logger.info(f"Exception returned from {self} to caller:", exc_info=sys.exc_info())
                reply_to.set_exception()
            else:
                self._fail(*sys.exc_info())
        except BaseException:  # noqa: BLE001
            self._fail_hard()

    def _fail(self, *exc_info: Any) -> None:
        """An exception escaped a tell: log it, stop this actor, call on_failure."""
        self._handle_failure(*exc_info)
        try:
            self.on_failure(*exc_info)
        except Exception:  # noqa: BLE001
            self._handle_failure(*sys.exc_info())

    def _fail_hard(self) -> None:
        """A BaseException (SystemExit, KeyboardInterrupt) stops every actor, as pykka does."""
        logger.debug(f"{sys.exc_info()[1]!r} in {self}. Stopping all actors.")
        self._stop()
        for ref in reversed(ActorRegistry.get_all()):
            if ref.is_alive():
                ref.tell(messages._ActorStop())  # noqa: SLF001

    def _teardown(self) -> None:
        inbox: _Inbox = self.actor_inbox  # type: ignore[assignment]
        queue, inbox.queue = inbox.queue, None
        while queue:
            _reject(queue.popleft(), self)
        # actor -> ref -> inbox -> actor is a cycle; cut it so reference counting
        # frees a stopped actor at once instead of leaving it to a full collection
        # (connection churn makes thousands of them). Late puts are rejected.
        inbox.actor = None

    def has_mail(self) -> bool:
        """Whether more messages wait in this actor's mailbox right now.

        Lets an actor batch work across messages already queued (a connection
        writes once for a burst of frames) without delaying a lone message.
        """
        return bool(self.actor_inbox.queue)  # type: ignore[attr-defined]

    def tell_later(self, delay: float, message: Any) -> TimerHandle:
        """Deliver `message` to this actor after `delay` seconds of its clock."""
        ref = self.actor_ref

        def fire() -> None:
            if ref.is_alive():
                ref.tell(message)

        return self.clock.call_later(delay, fire)


def _schedule(inbox: _Inbox) -> None:
    if not inbox.scheduled and inbox.queue:
        inbox.scheduled = True
        inbox.dispatcher.mark_ready(inbox)
