"""Parsing and validation of what publishers POST (docs/protocol.md section 2).

The HTTP handlers stay thin: they hand the raw body and its Content-Type to
`parse_body`, pass the resulting items to `normalize_events`, and map the three
exceptions defined here to HTTP statuses (400, 415, 422). Everything in this
module is pure (no I/O, no clock, no Tornado), so the whole publishing contract
can be tested without a server, and ids and timestamps are injectable.

A batch is validated whole before anything is built: a publisher gets every
problem of every event in one 422, and nothing of a bad batch is published.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from actors.ids import new_event_id
from actors.wire import RESERVED_FIELDS, SESSION_ID_RE, TYPE_PATTERN, TYPE_RE, iso_timestamp, session_id_problem

__all__ = [
    "MAX_BATCH_EVENTS",
    "MAX_NESTING",
    "REQUIRED_FIELDS",
    "RESERVED_FIELDS",
    "SESSION_ID_RE",
    "TYPE_RE",
    "BadRequest",
    "UnsupportedMediaType",
    "ValidationFailed",
    "iso_timestamp",
    "nesting_problems",
    "normalize_events",
    "normalize_timestamp",
    "parse_body",
]

#: Known event types and the payload fields each requires (section 1 table).
#: Types not listed here are accepted with any payload.
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "session_started": (),
    "session_completed": (),
    "session_cancelled": (),
    "plan_generated": ("plan",),
    "task_started": ("task_id",),
    "task_progress": ("task_id", "progress"),
    "task_completed": ("task_id",),
    "task_failed": ("task_id", "error"),
    "report_generated": ("report",),
    "query_start": ("query",),
    "chunk": ("content", "chunk_number"),
    "complete": ("full_response", "total_chunks"),
    "error": ("error",),
    "system_notification": ("message",),
}

#: Fields a known type may leave out, but that must be well typed when given.
#: `current_action` matters to progress throttling (section 4), so a wrong
#: type there would silently change which progress events get delivered.
_OPTIONAL_FIELDS: dict[str, tuple[str, ...]] = {
    "task_progress": ("current_action",),
}

#: Ceiling on events per request, so one POST cannot monopolise the broker.
MAX_BATCH_EVENTS = 1000

#: Deepest nesting of arrays and objects in one event, the event object itself
#: being level 1. Every delivered message is the event written out again by
#: orjson, which refuses more than 254 levels: a deeper event used to be
#: accepted by validation and then fail (HTTP 500) when the session wrote it.
#: The margin leaves room for envelopes a backend may wrap messages in.
MAX_NESTING = 128

_MAX_ID_LENGTH = 128
_JSON = "application/json"
_NDJSON = "application/x-ndjson"
_ID_FIELDS = ("event_id", "correlation_id")


class BadRequest(Exception):  # noqa: N818 - named after the HTTP status it maps to
    """The body cannot be read as a batch of events (HTTP 400).

    `str(exc)` is meant for the `{"error": ...}` body.
    """

    status = 400


class UnsupportedMediaType(Exception):  # noqa: N818 - named after the HTTP status it maps to
    """The Content-Type (or its charset) is not one we accept (HTTP 415)."""

    status = 415


class ValidationFailed(Exception):  # noqa: N818 - named after the HTTP status it maps to
    """One or more events break the schema (HTTP 422).

    `details` lists every problem found, in event order, as
    `{"index": int, "field": str, "error": str}`, ready for the response body;
    `str(exc)` is a one-line summary for `{"error": ...}` and for logs.
    """

    status = 422

    def __init__(self, details: list[dict[str, Any]]) -> None:
        self.details = details
        super().__init__(_summarize(details))


def _summarize(details: list[dict[str, Any]]) -> str:
    """One line that says how much is wrong and shows the first problem."""
    if not details:
        return "invalid events"
    events = len({d["index"] for d in details})
    first = details[0]
    where = f"field {first['field']!r}" if first["field"] else "the event"
    noun = "problem" if len(details) == 1 else "problems"
    plural = "event" if events == 1 else "events"
    return f"{len(details)} {noun} in {events} {plural}; first: event {first['index']}, {where} {first['error']}"


# --------------------------------------------------------------------------
# Body parsing


def parse_body(body: bytes, content_type: str | None) -> list[Any]:
    """Turn a request body into a list of raw items, one per event.

    Only the shape of the body is checked here (content type, JSON syntax,
    not empty); what each item contains is `normalize_events`' job, so that
    schema problems are all reported together as a 422.
    """
    media_type = _media_type(content_type)
    if media_type == _NDJSON:
        return _parse_ndjson(body)
    return _parse_json(body)


def _media_type(content_type: str | None) -> str:
    """Return the accepted media type, or raise 415 saying what to send."""
    if not content_type or not content_type.strip():
        raise UnsupportedMediaType(f"missing Content-Type; send {_JSON} or {_NDJSON}")
    media_type, *params = content_type.split(";")
    media_type = media_type.strip().lower()
    if media_type not in (_JSON, _NDJSON):
        raise UnsupportedMediaType(f"unsupported Content-Type {media_type!r}; send {_JSON} or {_NDJSON}")
    charset = _charset(params)
    if charset is not None and charset != "utf-8":
        raise UnsupportedMediaType(f"unsupported charset {charset!r}; bodies must be UTF-8")
    return media_type


def _charset(params: list[str]) -> str | None:
    """The lower-cased `charset` parameter, if any; other parameters are ignored."""
    for param in params:
        name, sep, value = param.partition("=")
        if sep and name.strip().lower() == "charset":
            return value.strip().strip('"').lower()
    return None


def _parse_json(body: bytes) -> list[Any]:
    """A single object becomes a one-event batch; an array is the batch."""
    if not body.strip():
        raise BadRequest("empty batch: the body is empty")
    value = _loads(body, line=None)
    if isinstance(value, dict):
        return [value]
    if not isinstance(value, list):
        raise BadRequest("the body must be a JSON object or an array of objects")
    if not value:
        raise BadRequest("empty batch: the array holds no events")
    return value


def _parse_ndjson(body: bytes) -> list[Any]:
    """One JSON value per non-blank line; errors name the 1-based line."""
    items = [_loads(line, line=number) for number, line in enumerate(body.split(b"\n"), start=1) if line.strip()]
    if not items:
        raise BadRequest("empty batch: the NDJSON body holds no events")
    return items


def _loads(data: bytes, *, line: int | None) -> Any:
    """`orjson.loads` with a 400 that says where the problem is.

    `line` is the NDJSON line `data` came from (None for a whole JSON body),
    so the message points at the publisher's line, not at orjson's view of a
    one-line document. orjson reports invalid UTF-8 as a surrogate problem,
    which confuses publishers; on that (rare, error-only) path we decode once
    more to say so plainly.
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        where = "body" if line is None else f"line {line}"
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as utf8_error:
            raise BadRequest(f"{where} is not valid UTF-8 (byte {utf8_error.start})") from None
        position = f"line {exc.lineno}" if line is None else where
        raise BadRequest(f"invalid JSON at {position}, column {exc.colno}: {exc.msg}") from None


# --------------------------------------------------------------------------
# Field checks: each returns None when the value is fine, else the error text.

Check = Callable[[Any], str | None]


def _is_int(value: Any) -> bool:
    """JSON integers only: `True` is an int to Python but not to a publisher."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _any_json(_value: Any) -> str | None:
    return None


def _string(value: Any) -> str | None:
    return None if isinstance(value, str) else "must be a string"


def _non_empty_string(value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return "must be a non-empty string"
    return None


def _progress(value: Any) -> str | None:
    if not _is_number(value) or not 0 <= value <= 100:
        return "must be a number from 0 to 100"
    return None


def _int_at_least(minimum: int) -> Check:
    def check(value: Any) -> str | None:
        if not _is_int(value) or value < minimum:
            return f"must be an integer >= {minimum}"
        return None

    return check


def _id(value: Any) -> str | None:
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_ID_LENGTH:
        return f"must be a non-empty string of at most {_MAX_ID_LENGTH} characters"
    return None


_FIELD_CHECKS: dict[str, Check] = {
    "plan": _any_json,
    "report": _any_json,
    "query": _any_json,
    "task_id": _non_empty_string,
    "progress": _progress,
    "current_action": _string,
    "chunk_number": _int_at_least(1),
    "total_chunks": _int_at_least(0),
    "content": _string,
    "full_response": _string,
    "error": _string,
    "message": _string,
}


# --------------------------------------------------------------------------
# Event validation


def normalize_events(
    items: list[Any],
    *,
    session_id: str | None,
    now: float,
    new_id: Callable[[], str] | None = None,
    owned: bool = False,
) -> list[dict[str, Any]]:
    """Validate a batch and return new event dicts ready to publish.

    `session_id` is the session named by the path (`POST
    /api/sessions/{id}/events`), or None for `POST /api/events`, where each
    event names its own. Every problem of every item is collected before one
    `ValidationFailed` is raised, so a publisher fixes a batch in one round
    trip. Ids are generated only once the whole batch is known to be good.
    The input is never mutated (the caller may still log or retry it) unless
    the caller gives the items up with `owned=True` (they were parsed from a
    body for this call alone): then the valid items are completed in place and
    returned, and no copy is made only to be dropped. A batch that fails is
    never touched either way.
    """
    _check_batch_size(items)
    if session_id is not None and not SESSION_ID_RE.match(session_id):
        raise BadRequest(f"invalid session id {session_id!r}")
    details = [
        {"index": index, "field": field, "error": error}
        for index, item in enumerate(items)
        for field, error in _item_problems(item, session_id)
    ]
    if details:
        raise ValidationFailed(details)
    make_id = new_id or _default_id
    stamp = iso_timestamp(now)
    return [_complete(item if owned else dict(item), session_id, stamp, make_id) for item in items]


def _check_batch_size(items: list[Any]) -> None:
    if not items:
        raise BadRequest("empty batch: no events")
    if len(items) > MAX_BATCH_EVENTS:
        raise BadRequest(f"batch of {len(items)} events is over the limit of {MAX_BATCH_EVENTS} per request")


_default_id = new_event_id


def _item_problems(item: Any, path_session: str | None) -> list[tuple[str, str]]:
    """All (field, error) pairs for one item, envelope first, then payload."""
    if not isinstance(item, dict):
        return [("", f"each event must be a JSON object, not {_json_kind(item)}")]
    problems: list[tuple[str, str]] = []
    problems += _type_problems(item)
    problems += _session_problems(item, path_session)
    problems += _envelope_problems(item)
    problems += [(name, "is reserved for the broker") for name in item if name in RESERVED_FIELDS]
    problems += _payload_problems(item)
    problems += nesting_problems(item)
    return problems


def _json_kind(value: Any) -> str:
    """How the publisher wrote the value, in JSON words, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _type_problems(item: Mapping[str, Any]) -> list[tuple[str, str]]:
    if "type" not in item:
        return [("type", "is required")]
    event_type = item["type"]
    if not isinstance(event_type, str):
        return [("type", "must be a string")]
    if not TYPE_RE.match(event_type):
        return [("type", f"must match {TYPE_PATTERN}")]
    return []


def _session_problems(item: Mapping[str, Any], path_session: str | None) -> list[tuple[str, str]]:
    """On a session's own path the id may be omitted but must not disagree."""
    if path_session is not None:
        if "session_id" in item and item["session_id"] != path_session:
            return [("session_id", f"must be {path_session!r}, the session in the path, or be left out")]
        return []
    if "session_id" not in item:
        return [("session_id", "is required")]
    problem = session_id_problem(item["session_id"])
    if problem is not None:
        return [("session_id", problem.removeprefix("session_id "))]
    return []


def _envelope_problems(item: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Optional envelope fields: absent is fine (they are generated), wrong is not."""
    problems = [(name, error) for name in _ID_FIELDS if name in item and (error := _id(item[name]))]
    if "timestamp" in item:
        value = item["timestamp"]
        if not isinstance(value, str):
            problems.append(("timestamp", "must be a string"))
        elif normalize_timestamp(value) is None:
            problems.append(("timestamp", "must be an ISO 8601 date and time, e.g. 2025-10-25T12:34:56.123Z"))
    return problems


#: No ISO 8601 date and time is longer; a longer string is refused unparsed
#: (and never enters the cache below).
_MAX_TIMESTAMP_LENGTH = 64


def normalize_timestamp(text: str) -> str | None:
    """A publisher's ISO 8601 time in the protocol's form (UTC, milliseconds, `Z`), or None.

    Subscribers parse one format, whatever each publisher's clock library
    writes (`+00:00`, `+02:00`, microseconds, no fraction). A time without an
    offset is taken as UTC. Milliseconds are truncated, as for the broker's
    own timestamps. A lowercase `t` or `z` is read as RFC 3339 allows.
    """
    if len(text) > _MAX_TIMESTAMP_LENGTH:
        return None
    return _parse_timestamp(text)


@functools.lru_cache(maxsize=MAX_BATCH_EVENTS)
def _parse_timestamp(text: str) -> str | None:
    """Cached for a batch's worth: validation and completion both ask for each
    event's timestamp, so each is parsed once (keys are at most 64 characters)."""
    try:
        moment = datetime.fromisoformat(text.upper())
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        moment = moment.astimezone(UTC)
    except (ValueError, OverflowError):
        return None
    return moment.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


def _payload_problems(item: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Required (and typed optional) fields of known types; unknown types pass."""
    event_type = item.get("type")
    if not isinstance(event_type, str):
        return []
    problems: list[tuple[str, str]] = []
    for name in REQUIRED_FIELDS.get(event_type, ()):
        if name not in item:
            problems.append((name, "is required"))
        elif error := _FIELD_CHECKS[name](item[name]):
            problems.append((name, error))
    for name in _OPTIONAL_FIELDS.get(event_type, ()):
        if name in item and (error := _FIELD_CHECKS[name](item[name])):
            problems.append((name, error))
    return problems


def nesting_problems(item: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(field, error) for each top-level field nested deeper than MAX_NESTING allows (the object is level 1).

    Also for other objects the broker writes out again (broadcasts).
    """
    # (dict, list) rather than dict | list here and below: on every call that builds a union object anew
    return [
        (name, f"is nested more than {MAX_NESTING} levels deep (counting the event)")
        for name, value in item.items()
        if isinstance(value, (dict, list)) and _deeper_than(value, MAX_NESTING - 1)
    ]


def _deeper_than(value: dict[str, Any] | list[Any], levels: int) -> bool:
    """Whether `value` has more than `levels` levels of arrays / objects (iterative: no recursion limit)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        container, depth = stack.pop()
        if depth > levels:
            return True
        for child in container.values() if isinstance(container, dict) else container:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return False


def _complete(
    event: dict[str, Any],
    path_session: str | None,
    stamp: str,
    make_id: Callable[[], str],
) -> dict[str, Any]:
    """A valid item (a copy, or one the caller owns) with the envelope fields it left out filled in.

    Input order is kept and generated fields go last, so what a client
    receives reads like what the publisher wrote.
    """
    if "event_id" not in event:
        event["event_id"] = make_id()
    if "correlation_id" not in event:
        event["correlation_id"] = make_id()
    if "timestamp" not in event:
        event["timestamp"] = stamp
    else:
        event["timestamp"] = normalize_timestamp(event["timestamp"])
    if "session_id" not in event:
        event["session_id"] = path_session
    return event
