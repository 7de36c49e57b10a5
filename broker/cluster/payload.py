"""The pub/sub payload of a session's channel (`ab:{sid}:events`), as the store's scripts write it.

Text, one PUBLISH per script call (a whole batch):

    E <epoch>
    <seq>\\t<type>\\t<task_id or empty>\\t<message JSON>
    ...

or, when the session was deleted, the single line `D <epoch>`. JSON encoders
escape tabs and newlines inside strings, so splitting a line on its first
three tabs and the payload on newlines is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Deleted", "Published", "StoredLine", "committed_through", "parse_payload"]


@dataclass(frozen=True, slots=True)
class StoredLine:
    seq: int
    type: str
    task_id: str | None
    data: bytes


@dataclass(frozen=True, slots=True)
class Published:
    epoch: str
    messages: list[StoredLine]


@dataclass(frozen=True, slots=True)
class Deleted:
    epoch: str


def parse_payload(payload: bytes) -> Published | Deleted:
    """A channel payload; ValueError if it is not one (a bug or a foreign publisher)."""
    head, _, body = payload.partition(b"\n")
    kind, _, epoch = head.partition(b" ")
    if kind == b"D":
        return Deleted(epoch.decode())
    if kind != b"E" or not epoch:
        raise ValueError(f"not a session payload: {payload[:60]!r}")
    messages = []
    for line in body.split(b"\n"):
        if not line:
            continue
        seq, etype, task_id, data = line.split(b"\t", 3)
        messages.append(StoredLine(int(seq), etype.decode(), task_id.decode() or None, data))
    return Published(epoch.decode(), messages)


def committed_through(payload: bytes, epoch_line: bytes) -> int | None:
    """The newest seq a payload of that life commits (its last line's), without parsing the rest.

    `epoch_line` is b"E <epoch>\\n"; None for any other payload (another life,
    a deletion). The lines are in seq order, so the last one holds the newest.
    """
    if not payload.startswith(epoch_line):
        return None
    start = payload.rfind(b"\n") + 1
    end = payload.find(b"\t", start)
    if start < len(epoch_line) or end <= start:
        return None
    return int(payload[start:end])
