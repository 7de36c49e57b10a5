"""What a connection receives from history when it attaches (docs/protocol.md section 3.5).

Pure: history and the request in, frames out. With `last_seq` the client
gets exactly what came after it (a `gap` first for what was evicted, or a
`gap` from 1 and the whole history when its epoch is not the session's);
without it, `replay` chooses all, what no connection was sent yet
(`missed`), or nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from actors.wire import control_frame, iso_timestamp

if TYPE_CHECKING:
    from actors.filters import EventFilter
    from actors.history import History
    from actors.messages import Attach, Frame


class BeyondNewestError(ValueError):
    """`last_seq` names a seq the session never had (and the epoch agrees): close 1008."""


def greeting_frame(
    request: Attach, session_id: str, epoch: str, last_seq: int, keepalive_interval: float, at: float
) -> Frame:
    """`connected` / `connection_established`: taken at the same moment as the replay that follows it."""
    return control_frame(
        {
            "type": request.greeting_type,
            "message": "WebSocket connection established",
            "session_id": session_id,
            "connection_id": request.connection_id,
            "user_id": request.user_id,
            "events": request.filter.echo(),
            "epoch": epoch,
            "last_seq": last_seq,
            "keepalive_interval": _plain_number(keepalive_interval),
            "timestamp": iso_timestamp(at),
        }
    )


def _plain_number(value: float) -> float | int:
    """25.0 -> 25: settings are floats, the wire shows whole seconds as integers."""
    return int(value) if float(value).is_integer() else value


def gap_frame(from_seq: int, to_seq: int | None, epoch: str) -> Frame:
    return control_frame({"type": "gap", "from_seq": from_seq, "to_seq": to_seq, "epoch": epoch})


def replay_frames(
    history: History,
    epoch: str,
    event_filter: EventFilter,
    *,
    replay: str,
    last_seq: int | None,
    client_epoch: str | None,
) -> list[Frame]:
    """The frames to send before live ones, gaps first; marks replayed frames delivered (replay=missed)."""
    notices: list[Frame] = []
    frames: list[Frame]
    if last_seq is not None:
        if client_epoch is not None and client_epoch != epoch:
            notices.append(gap_frame(1, None, epoch))
            frames = list(history)
        elif last_seq > history.last_seq:
            raise BeyondNewestError("last_seq is beyond the session's newest seq")
        else:
            if last_seq + 1 < history.first_seq:
                notices.append(gap_frame(last_seq + 1, history.first_seq - 1, epoch))
            frames = history.since(last_seq)
    elif replay == "all":
        frames = list(history)
    elif replay == "missed":
        frames = [f for f in history if not f.delivered]
    else:
        frames = []
    admits = event_filter.admits
    frames = [f for f in frames if admits(f.type)]
    for frame in frames:
        frame.delivered = True
    return notices + frames
