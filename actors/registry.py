"""An O(1) store for pykka's `ActorRegistry`.

pykka keeps running actors in a list, so unregistering one is O(n): with
tens of thousands of connection actors coming and going, every disconnect
would scan them all. `install_fast_registry()` swaps that list for an
insertion-ordered set that answers the same calls in O(1). It is called by
`actors.dispatcher.install_dispatcher`, so it is in place before the first
`LoopActor` registers; refs registered before (say, a `ThreadingActor`) are
carried over in order.

Part of the actor runtime (`actors.dispatcher`, `actors.future`,
`actors.inbox`, `actors.registry`, `actors.runtime`): only these modules may
touch pykka internals (here `ActorRegistry._actor_refs` and its lock).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from pykka import ActorRef, ActorRegistry

__all__ = ["OrderedRefSet", "install_fast_registry"]


class OrderedRefSet:
    """The subset of `list` that `pykka.ActorRegistry` uses, in O(1) per call."""

    __slots__ = ("_refs",)

    def __init__(self, refs: Iterable[ActorRef[Any]] = ()) -> None:
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


def install_fast_registry() -> None:
    """Make `ActorRegistry` store its refs in an `OrderedRefSet`. Idempotent, thread-safe."""
    with ActorRegistry._actor_refs_lock:  # noqa: SLF001
        refs: object = ActorRegistry._actor_refs  # noqa: SLF001  # typed `list` by pykka, whatever it holds now
        if not isinstance(refs, OrderedRefSet):
            # pykka types the store as a list; OrderedRefSet answers every list call pykka makes.
            ActorRegistry._actor_refs = OrderedRefSet(ActorRegistry._actor_refs)  # type: ignore[assignment]  # noqa: SLF001
