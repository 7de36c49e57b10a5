"""The delivery path: an actor's inbox, and the ref whose `tell` feeds it.

Every message any actor receives goes through `LoopActorRef.tell` (or
`Inbox.put`, pykka's entry point for asks and proxies) and then
`Inbox.run_batch`, so this is the runtime's hot path. A put from the
dispatcher's own thread is a deque append plus, for an idle actor, one
`Dispatcher.mark_ready`; from another thread it is handed over with one
thread-safe callback.

The enqueue step is written twice on purpose: `Inbox._put_local` and its
inlined copy in `LoopActorRef.tell` (one call frame less on every tell, which
`make bench-actors` measures). Change one, change the other.

Part of the actor runtime (`actors.dispatcher`, `actors.future`,
`actors.inbox`, `actors.registry`, `actors.runtime`): only these modules may
touch pykka internals (here `Envelope`, pykka's message classes and
`ActorRef`'s attributes).
"""

from __future__ import annotations

import sys
import threading
from collections import deque
from typing import TYPE_CHECKING, Any

from pykka import ActorDeadError, ActorRef, messages
from pykka._envelope import Envelope

if TYPE_CHECKING:
    from actors.dispatcher import Dispatcher
    from actors.runtime import LoopActor, _StoppedFlag

__all__ = ["PYKKA_MESSAGES", "SPARE_QUEUES_MAX", "START", "Inbox", "LoopActorRef"]

_get_ident = threading.get_ident

#: Messages that pykka itself interprets; everything else goes to on_receive.
PYKKA_MESSAGES = frozenset(
    {messages._ActorStop, messages.ProxyCall, messages.ProxyGetAttr, messages.ProxySetAttr}  # noqa: SLF001
)


class _Start:
    """Inbox marker: run `on_start` before anything else."""


START = _Start()

#: Inbox items that need more than a plain on_receive call.
_SPECIAL_ITEMS = frozenset({Envelope, _Start, *PYKKA_MESSAGES})

#: Empty mailbox deques a dispatcher keeps for the next inbox that gets mail
#: (Dispatcher.spare_queues). A drained inbox gives its deque back instead of
#: freeing it: an actor that gets one message at a time (the usual case)
#: would otherwise allocate and free a ~600-byte deque per message. Bounded,
#: so idle actors still hold none.
SPARE_QUEUES_MAX = 1024


class Inbox:
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
        # Inlined, after its own stopped check, in LoopActorRef.tell: keep the two alike.
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

    def put_start(self) -> None:
        """Queue the `on_start` marker ahead of any mail and make the actor ready; any thread."""
        if self.queue is None:
            self.queue = deque()
        self.queue.appendleft(START)
        if self.dispatcher.on_thread():
            self._schedule()
        else:
            self.dispatcher.submit_from_thread(self._schedule)

    def _schedule(self) -> None:
        if not self.scheduled and self.queue:
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
                # Fast path for a plain tell; failures handled as in LoopActor._receive_one.
                try:
                    on_receive(item)
                except Exception:  # noqa: BLE001 - an actor's failure is logged and stops it
                    actor._fail(*sys.exc_info())  # noqa: SLF001
                except BaseException:  # noqa: BLE001
                    actor._fail_hard()  # noqa: SLF001
            if stopped._set:  # noqa: SLF001
                self._close()
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

    def _close(self) -> None:
        """The actor has stopped: answer what still waits, and let go of the actor."""
        actor = self.actor
        queue, self.queue = self.queue, None
        while queue:
            _reject(queue.popleft(), actor)
        # actor -> ref -> inbox -> actor is a cycle; cut it so reference counting
        # frees a stopped actor at once instead of leaving it to a full collection
        # (connection churn makes thousands of them). Late puts are rejected.
        self.actor = None

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

    # pykka's ActorRef.__init__ copies these from the LoopActor (see the declarations there).
    actor_inbox: Inbox
    actor_stopped: _StoppedFlag  # type: ignore[assignment]  # pykka declares a threading.Event

    def ask_now(self, message: Any) -> tuple[bool, Any]:
        """`(True, answer)` if the actor was idle and handled `message` in this call; else `(False, None)`.

        Idle: started, nothing in its inbox, not in a turn, and the caller on
        the dispatcher's thread (never from inside another actor's turn). Then
        handling it now is what the dispatcher's next turn would do, without
        the ask's future and the loop turns before the answer. As for an ask,
        an exception from `on_receive` goes to the caller and the actor lives on.
        """
        inbox = self.actor_inbox
        actor = inbox.actor
        if (
            actor is None
            or self.actor_stopped._set  # noqa: SLF001
            or inbox.scheduled
            or inbox.queue
            or _get_ident() != inbox.dispatcher.thread_id
        ):
            return False, None
        return True, actor.on_receive(message)

    def tell(self, message: Any) -> None:
        if self.actor_stopped._set:  # noqa: SLF001
            msg = f"{self} not found"
            raise ActorDeadError(msg)
        if message.__class__ is Envelope:  # keep "Envelope means ask" unambiguous
            message = Envelope(message)
        inbox = self.actor_inbox
        if _get_ident() != inbox.dispatcher.thread_id:
            inbox.dispatcher.submit_from_thread(lambda: inbox._put_local(message))  # noqa: SLF001
            return
        # The hot path of every delivery: Inbox._put_local inlined (see the module docstring).
        queue = inbox.queue
        if queue is None:
            spare = inbox.dispatcher.spare_queues
            queue = inbox.queue = spare.pop() if spare else deque()
        queue.append(message)
        if not inbox.scheduled:
            inbox.scheduled = True
            inbox.dispatcher.mark_ready(inbox)
