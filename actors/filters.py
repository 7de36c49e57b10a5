"""Per-connection event filters (the `events` grammar of docs/protocol.md section 3.4).

The session actor asks `admits(type)` for every message and every connection, so a
filter is an immutable, precomputed value and that check is one frozenset lookup."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from actors.wire import TYPE_RE

__all__ = ["ALL", "DEFAULT_PRESETS", "EventFilter", "FilterError", "parse_event_list", "parse_events_param"]

# Read-only, so a caller cannot change the defaults for every other connection.
DEFAULT_PRESETS: Mapping[str, frozenset[str]] = MappingProxyType({
    "essential": frozenset({"session_started", "session_completed", "session_cancelled",
                            "task_completed", "task_failed", "complete", "error"}),
    "planning": frozenset({"session_started", "session_completed", "plan_generated", "report_generated"}),
})

_EVERYTHING = frozenset({"*", "all"})  # built in, checked before the presets, so a preset cannot shadow it


class FilterError(ValueError):
    """A bad item. `str(exc)` names it in < 100 bytes: it becomes a close reason (max 123)."""


def _show(item: str) -> str:
    """Quote `item` in ASCII and clip it, so an error reason stays short in bytes."""
    text = ascii(item)
    return text if len(text) <= 42 else text[:38] + "...'"


def _expand(name: str, presets: Mapping[str, frozenset[str]], shown: str) -> frozenset[str] | None:
    """The types `name` stands for; None for everything. `shown` is the item as written."""
    if name in _EVERYTHING:
        return None
    if name in presets:
        return frozenset(presets[name])
    if not TYPE_RE.match(name):  # any other valid name is a type: publishers may use their own
        raise FilterError(f"events: unknown event type or preset {_show(shown)}")
    return frozenset((name,))


def _collect(items: Iterable[str], presets: Mapping[str, frozenset[str]]) -> tuple[frozenset[str], bool]:
    """The types named by subscribe/unsubscribe items, and whether one was `*`/`all`."""
    if isinstance(items, str):  # a bare string would be taken letter by letter
        raise TypeError("items must be an iterable of strings, not a string")
    types: set[str] = set()
    everything = False
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise FilterError(f"events[{index}] is not a string")
        if item.startswith("-"):
            raise FilterError(f"events: {_show(item)} is a removal; use unsubscribe")
        expanded = _expand(item, presets, item)
        everything = everything or expanded is None
        types |= expanded or set()
    return frozenset(types), everything


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Everything but `excluded`, or exactly `types` (the other set is empty).
    Two shapes, because `all` must admit types that publishers invent later."""

    everything: bool
    types: frozenset[str] = frozenset()
    excluded: frozenset[str] = frozenset()

    def __post_init__(self) -> None:  # one shape per filter keeps == and echo() meaningful
        if self.types if self.everything else self.excluded:
            raise ValueError("types is only for everything=False, excluded only for everything=True")

    def admits(self, event_type: str) -> bool:
        """Whether a message of `event_type` goes to this connection. Hot path: one lookup."""
        return (event_type not in self.excluded) if self.everything else (event_type in self.types)

    def echo(self) -> list[str]:
        """The filter as shown to clients: `["*"]`, `["*", "-a", ...]` or the sorted types."""
        if self.everything:
            return ["*", *("-" + t for t in sorted(self.excluded))]
        return sorted(self.types)

    def subscribe(self, items: Iterable[str], presets: Mapping[str, frozenset[str]] = DEFAULT_PRESETS) -> EventFilter:
        """This filter plus `items` (presets, types, `*`/`all`); raises FilterError, never half-applies."""
        added, everything = _collect(items, presets)
        if everything:
            return ALL
        if self.everything:
            return EventFilter(True, excluded=self.excluded - added)
        return EventFilter(False, types=self.types | added)

    def unsubscribe(self, items: Iterable[str], presets: Mapping[str, frozenset[str]] = DEFAULT_PRESETS) -> EventFilter:
        """This filter minus `items` (from all, the rest stays); minus `*` admits nothing."""
        removed, everything = _collect(items, presets)
        if everything:
            return EventFilter(False)
        if self.everything:
            return EventFilter(True, excluded=self.excluded | removed)
        return EventFilter(False, types=self.types - removed)


ALL = EventFilter(True)


def parse_events_param(value: str | None, presets: Mapping[str, frozenset[str]] = DEFAULT_PRESETS) -> EventFilter:
    """Parse the `events` query parameter; absent, empty or blank means `all`.
    Removals apply after all additions, whatever the order (`-a,all` is all but `a`):
    the result must not depend on how a client happened to order its list."""
    if value is None or not value.strip():
        return ALL
    additions: list[str] = []
    removed: set[str] = set()
    for position, raw in enumerate(value.split(","), 1):
        item = raw.strip()
        if not item:
            raise FilterError(f"events: empty item at position {position}")
        if not item.startswith("-"):
            additions.append(item)
            continue
        types = _expand(item[1:], presets, item)
        if types is None:
            raise FilterError(f"events: cannot remove everything ({_show(item)})")
        removed |= types
    added, everything = _collect(additions, presets)
    if everything or not additions:  # only removals: they start from all
        return EventFilter(True, excluded=frozenset(removed))
    return EventFilter(False, types=added - removed)


def parse_event_list(items: Any, presets: Mapping[str, frozenset[str]] = DEFAULT_PRESETS) -> list[str]:
    """Check the `events` list of a subscribe/unsubscribe message and return it.
    Stricter than the query parameter: no stripping, no `-type` (use unsubscribe)."""
    if not isinstance(items, list) or not items:
        raise FilterError("events must be a non-empty list of strings")
    _collect(items, presets)
    return list(items)
