"""A pykka runtime that multiplexes many actors on one event-loop thread.

`pykka.ThreadingActor` gives every actor an OS thread; past a few thousand
actors that costs more in context switches and memory than the work itself
(`make bench-actors` shows both; README.md, "The actor runtime").
`LoopActor` keeps pykka's API and semantics (`start`, `tell`, `ask`,
proxies, `on_start` / `on_stop` / `on_failure`, `stop`, `ActorRegistry`)
but its inbox, on `put`, only marks the actor ready on a `Dispatcher`; the
dispatcher runs a bounded batch of each ready actor's messages in turn on a
single thread.

The runtime is five modules, one concern each:

* `actors.dispatcher`: `Dispatcher`, `LoopDispatcher`, `install_dispatcher`
  (which also installs the registry) and `current_dispatcher`;
* `actors.future`: `LoopFuture`, awaited or `get()`, and `BlockingGetError`;
* `actors.inbox`: the delivery path, `Inbox` and `LoopActorRef`;
* `actors.registry`: the O(1) store behind pykka's `ActorRegistry`;
* this module: `LoopActor`, its lifecycle, failures and timers. It
  re-exports the public names of the others, so `from actors.runtime import
  X` is all an actor or a composition root needs.

Threading rules:

* `ActorRef.tell` and `ask` are safe from any thread. A put from the
  dispatcher's own thread is a deque append; from another thread it is
  handed over with one thread-safe callback.
* Every actor hook (`on_start`, `on_receive`, `on_stop`, `on_failure`) runs
  on the dispatcher's thread, never concurrently with another hook.
* A blocking `Future.get()` on the dispatcher's thread for a reply that has
  not arrived yet would deadlock the loop; it raises `BlockingGetError`
  instead (`Dispatcher.wait_for`). Await the future there.

Only the runtime's modules may touch pykka internals (pykka is pinned to its
minor version for that reason); here `pykka.Actor`'s private hooks.
"""

from __future__ import annotations

import logging
import sys
import uuid
from typing import TYPE_CHECKING, Any

import pykka
from pykka import ActorRegistry, messages
from pykka._envelope import Envelope

from actors.dispatcher import (
    DEFAULT_BATCH,
    Dispatcher,
    LoopDispatcher,
    current_dispatcher,
    install_dispatcher,
    installed_dispatcher,
)
from actors.future import BlockingGetError, LoopFuture
from actors.inbox import PYKKA_MESSAGES, SPARE_QUEUES_MAX, START, Inbox, LoopActorRef

if TYPE_CHECKING:
    from actors.clock import Clock, TimerHandle

__all__ = [
    "DEFAULT_BATCH",
    "SPARE_QUEUES_MAX",
    "BlockingGetError",
    "Dispatcher",
    "LoopActor",
    "LoopActorRef",
    "LoopDispatcher",
    "LoopFuture",
    "current_dispatcher",
    "install_dispatcher",
    "installed_dispatcher",
]

logger = logging.getLogger("pykka")


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
    actor_inbox: Inbox  # pykka's ActorInbox protocol, as the dispatcher's inbox implements it
    # pykka declares a threading.Event; a LoopActor's flag is the lighter _StoppedFlag (is_set, set, wait).
    actor_stopped: _StoppedFlag  # type: ignore[assignment]

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        # Deliberately not pykka.Actor.__init__: that allocates a
        # threading.Event per actor, which 100 000 actors cannot afford.
        dispatcher = current_dispatcher()
        self.actor_urn = uuid.uuid4().urn
        inbox = Inbox(dispatcher)
        inbox.actor = self
        self.actor_inbox = inbox
        self._stopped = _StoppedFlag()
        self.actor_stopped = self._stopped
        self._actor_ref = LoopActorRef(self)
        self.dispatcher = dispatcher

    @property
    def clock(self) -> Clock:
        return self.dispatcher.clock

    @staticmethod
    def _create_actor_inbox() -> Inbox:  # pragma: no cover - __init__ builds the inbox
        return Inbox(current_dispatcher())

    @staticmethod
    def _create_future() -> LoopFuture:
        # pykka asks the class, not the actor, for a future: the answering
        # actor runs on the installed dispatcher (the usual single one).
        return LoopFuture(installed_dispatcher())

    def _start_actor_loop(self) -> None:
        self.actor_inbox.put_start()

    def _receive_one(self, item: Any) -> None:
        """Handle one inbox item that is not a plain tell (see Inbox.run_batch)."""
        if item is START:
            self._actor_loop_setup()
            return
        if item.__class__ is Envelope:
            reply_to = item.reply_to
            message = item.message
        else:
            reply_to = None
            message = item
        try:
            if message.__class__ in PYKKA_MESSAGES:
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

    def has_mail(self) -> bool:
        """Whether more messages wait in this actor's mailbox right now.

        Lets an actor batch work across messages already queued (a connection
        writes once for a burst of frames) without delaying a lone message.
        """
        return bool(self.actor_inbox.queue)

    def tell_later(self, delay: float, message: Any) -> TimerHandle:
        """Deliver `message` to this actor after `delay` seconds of its clock."""
        ref = self.actor_ref

        def fire() -> None:
            if ref.is_alive():
                ref.tell(message)

        return self.clock.call_later(delay, fire)
