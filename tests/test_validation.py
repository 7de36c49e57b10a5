"""What a publisher notices about broker.validation (docs/protocol.md section 2).

The expected values are written out here from the protocol rather than derived
from the module's own tables, so a drift between code and contract fails.
"""

from __future__ import annotations

import copy
import itertools
import re
from typing import Any

import pytest

from broker.validation import (
    MAX_BATCH_EVENTS,
    REQUIRED_FIELDS,
    RESERVED_FIELDS,
    SESSION_ID_RE,
    TYPE_RE,
    BadRequest,
    UnsupportedMediaType,
    ValidationFailed,
    iso_timestamp,
    normalize_events,
    normalize_timestamp,
    parse_body,
)

NOW = 1761395696.123  # 2025-10-25T12:34:56.123Z
NOW_ISO = "2025-10-25T12:34:56.123Z"
ADDED = ["event_id", "correlation_id", "timestamp", "session_id"]

# One minimal valid event per known type (section 1 table), without session_id.
VALID: dict[str, dict[str, Any]] = {
    "session_started": {"type": "session_started"},
    "session_completed": {"type": "session_completed"},
    "session_cancelled": {"type": "session_cancelled"},
    "plan_generated": {"type": "plan_generated", "plan": {"steps": ["a", "b"]}},
    "task_started": {"type": "task_started", "task_id": "t1"},
    "task_progress": {"type": "task_progress", "task_id": "t1", "progress": 40},
    "task_completed": {"type": "task_completed", "task_id": "t1"},
    "task_failed": {"type": "task_failed", "task_id": "t1", "error": "boom"},
    "report_generated": {"type": "report_generated", "report": "# Findings"},
    "query_start": {"type": "query_start", "query": "why?"},
    "chunk": {"type": "chunk", "content": "Hel", "chunk_number": 1},
    "complete": {"type": "complete", "full_response": "Hello", "total_chunks": 2},
    "error": {"type": "error", "error": "upstream failed"},
    "system_notification": {"type": "system_notification", "message": "maintenance at 5"},
}

REQUIRED_ROWS = [
    ("plan_generated", "plan"),
    ("task_started", "task_id"),
    ("task_progress", "task_id"),
    ("task_progress", "progress"),
    ("task_completed", "task_id"),
    ("task_failed", "task_id"),
    ("task_failed", "error"),
    ("report_generated", "report"),
    ("query_start", "query"),
    ("chunk", "content"),
    ("chunk", "chunk_number"),
    ("complete", "full_response"),
    ("complete", "total_chunks"),
    ("error", "error"),
    ("system_notification", "message"),
]

ILL_TYPED = [
    ("task_started", "task_id", ""),
    ("task_started", "task_id", 5),
    ("task_started", "task_id", None),
    ("task_progress", "task_id", ["t1"]),
    ("task_progress", "progress", "40"),
    ("task_progress", "progress", True),
    ("task_progress", "progress", False),
    ("task_progress", "progress", None),
    ("task_progress", "progress", -0.1),
    ("task_progress", "progress", 100.1),
    ("task_progress", "progress", -1),
    ("task_progress", "current_action", 5),
    ("task_progress", "current_action", None),
    ("task_completed", "task_id", 7),
    ("task_failed", "task_id", ""),
    ("task_failed", "error", 3),
    ("task_failed", "error", None),
    ("chunk", "content", 1),
    ("chunk", "content", None),
    ("chunk", "chunk_number", 0),
    ("chunk", "chunk_number", -1),
    ("chunk", "chunk_number", 1.5),
    ("chunk", "chunk_number", 1.0),
    ("chunk", "chunk_number", True),
    ("chunk", "chunk_number", "1"),
    ("complete", "full_response", None),
    ("complete", "total_chunks", -1),
    ("complete", "total_chunks", 2.0),
    ("complete", "total_chunks", True),
    ("complete", "total_chunks", "3"),
    ("error", "error", {"message": "x"}),
    ("system_notification", "message", 1),
]


def event(event_type: str = "task_started", **fields: Any) -> dict[str, Any]:
    """A valid event of a known type with `session_id` s1, fields overridden."""
    return {**VALID[event_type], "session_id": "s1", **fields}


def counter() -> Any:
    numbers = itertools.count(1)
    return lambda: f"id-{next(numbers)}"


def normalize(items: list[Any], session_id: str | None = None, **kwargs: Any) -> list[dict[str, Any]]:
    return normalize_events(items, session_id=session_id, now=NOW, **kwargs)


def details(items: list[Any], session_id: str | None = None) -> list[dict[str, Any]]:
    with pytest.raises(ValidationFailed) as caught:
        normalize(items, session_id)
    return caught.value.details


def fields_at(problems: list[dict[str, Any]]) -> list[tuple[int, str]]:
    return [(d["index"], d["field"]) for d in problems]


# ---------------------------------------------------------------- constants


def test_required_fields_cover_the_protocol_table() -> None:
    assert set(REQUIRED_FIELDS) == set(VALID)
    rows = {(t, f) for t, fields in REQUIRED_FIELDS.items() for f in fields}
    assert rows == set(REQUIRED_ROWS)
    assert {"seq", "epoch"} == RESERVED_FIELDS


@pytest.mark.parametrize("name", ["task_started\n", "Task", ""])
def test_type_re_rejects_even_with_plain_match(name: str) -> None:
    assert TYPE_RE.match(name) is None


def test_session_id_re_rejects_trailing_newline() -> None:
    assert SESSION_ID_RE.match("abc\n") is None
    assert SESSION_ID_RE.match("user-1:run_2.x")


# ---------------------------------------------------------------- known types


@pytest.mark.parametrize("event_type", sorted(VALID))
def test_every_known_type_accepts_its_minimal_event(event_type: str) -> None:
    [out] = normalize([event(event_type)])
    assert out["type"] == event_type


@pytest.mark.parametrize(("event_type", "field"), REQUIRED_ROWS)
def test_missing_required_field_is_named(event_type: str, field: str) -> None:
    item = event(event_type)
    del item[field]
    [problem] = details([event(), item], None)
    assert (problem["index"], problem["field"]) == (1, field)
    assert problem["error"]


@pytest.mark.parametrize(("event_type", "field", "value"), ILL_TYPED)
def test_ill_typed_field_is_named(event_type: str, field: str, value: Any) -> None:
    [problem] = details([event(), event(), event(event_type, **{field: value})])
    assert (problem["index"], problem["field"]) == (2, field)
    assert problem["error"]


@pytest.mark.parametrize("progress", [0, 100, 0.0, 100.0, 42.5])
def test_progress_bounds_are_inclusive(progress: float) -> None:
    [out] = normalize([event("task_progress", progress=progress, current_action="reading")])
    assert out["progress"] == progress


def test_current_action_is_optional() -> None:
    [out] = normalize([event("task_progress")])
    assert "current_action" not in out


def test_zero_total_chunks_accepted() -> None:
    [out] = normalize([event("complete", total_chunks=0, full_response="")])
    assert out["total_chunks"] == 0


@pytest.mark.parametrize("value", [None, "text", 3, [], {"nested": [1, 2]}])
@pytest.mark.parametrize(
    ("event_type", "field"), [("plan_generated", "plan"), ("report_generated", "report"), ("query_start", "query")]
)
def test_any_json_fields_only_need_to_be_present(event_type: str, field: str, value: Any) -> None:
    [out] = normalize([event(event_type, **{field: value})])
    assert out[field] == value


def test_unknown_custom_type_accepted_with_any_payload() -> None:
    item = {"type": "billing.invoice_paid", "session_id": "s1", "progress": "lots", "task_id": 5, "data": [1]}
    [out] = normalize([item])
    assert {k: out[k] for k in item} == item


def test_optional_field_checks_do_not_apply_to_other_types() -> None:
    [out] = normalize([event("chunk", current_action=7, progress="n/a")])
    assert (out["current_action"], out["progress"]) == (7, "n/a")


# ---------------------------------------------------------------- type and session_id


@pytest.mark.parametrize("bad_type", ["Task", "1abc", "a" * 65, "task started", "task_started\n", "", "_x", 5, None])
def test_bad_type_names_rejected(bad_type: Any) -> None:
    assert fields_at(details([event(type=bad_type)])) == [(0, "type")]


def test_missing_type_rejected() -> None:
    item = event()
    del item["type"]
    assert fields_at(details([item])) == [(0, "type")]


def test_longest_type_name_accepted() -> None:
    longest = "a" + "b.9_" * 15 + "abc"
    assert len(longest) == 64
    assert normalize([event(type=longest)])[0]["type"] == longest


def test_cross_session_path_requires_session_id() -> None:
    item = event()
    del item["session_id"]
    assert fields_at(details([event(), item])) == [(1, "session_id")]


@pytest.mark.parametrize("bad_id", ["", "a b", "x" * 129, "abc\n", "é", 5, None])
def test_cross_session_path_rejects_malformed_session_id(bad_id: Any) -> None:
    assert fields_at(details([event(session_id=bad_id)])) == [(0, "session_id")]


def test_session_path_fills_in_or_accepts_matching_session_id() -> None:
    bare = dict(VALID["task_started"])
    out = normalize([bare, event(session_id="abc")], "abc")
    assert [e["session_id"] for e in out] == ["abc", "abc"]


@pytest.mark.parametrize("other", ["xyz", "", None, 5])
def test_session_path_rejects_other_session_id(other: Any) -> None:
    [problem] = details([event(session_id=other)], "abc")
    assert (problem["index"], problem["field"]) == (0, "session_id")
    assert "abc" in problem["error"]


def test_session_path_itself_must_be_valid() -> None:
    with pytest.raises(BadRequest):
        normalize([VALID["task_started"]], "bad id")


# ---------------------------------------------------------------- envelope and reserved fields


@pytest.mark.parametrize("field", ["event_id", "correlation_id"])
@pytest.mark.parametrize("value", ["", "x" * 129, 5, None, ["a"]])
def test_bad_given_ids_rejected(field: str, value: Any) -> None:
    assert fields_at(details([event(**{field: value})])) == [(0, field)]


@pytest.mark.parametrize("value", [123, None, {"t": 1}])
def test_timestamp_must_be_a_string(value: Any) -> None:
    assert fields_at(details([event(timestamp=value)])) == [(0, "timestamp")]


LONG_BUT_PARSEABLE = "2025-10-25T12:34:56." + "1" * 60 + "Z"  # refused unparsed: no real timestamp is that long


@pytest.mark.parametrize(
    "value", ["", "yesterday", "2025-13-01T00:00:00Z", "12:34:56", "2025-10-25T25:00:00Z", LONG_BUT_PARSEABLE]
)
def test_timestamp_must_be_iso_8601(value: str) -> None:
    [problem] = details([event(timestamp=value)])
    assert (problem["field"], problem["error"]) == (
        "timestamp",
        "must be an ISO 8601 date and time, e.g. 2025-10-25T12:34:56.123Z",
    )


@pytest.mark.parametrize(
    ("given", "delivered"),
    [
        ("2025-10-25T12:34:56.123Z", "2025-10-25T12:34:56.123Z"),
        ("2025-10-25T12:34:56Z", "2025-10-25T12:34:56.000Z"),
        ("2025-10-25T12:34:56.123456+00:00", "2025-10-25T12:34:56.123Z"),  # Python's isoformat()
        ("2025-10-25T14:34:56.999999+02:00", "2025-10-25T12:34:56.999Z"),  # truncated, not rounded
        ("2025-10-25T12:34:56", "2025-10-25T12:34:56.000Z"),  # no offset: UTC
        ("2025-10-25", "2025-10-25T00:00:00.000Z"),
        ("2025-01-01T00:30:00-01:00", "2025-01-01T01:30:00.000Z"),
        ("2025-10-25t12:34:56.5z", "2025-10-25T12:34:56.500Z"),  # RFC 3339 allows lowercase
    ],
)
def test_given_timestamps_are_delivered_in_the_protocol_form(given: str, delivered: str) -> None:
    [out] = normalize([event(timestamp=given)], new_id=counter())
    assert out["timestamp"] == delivered == normalize_timestamp(given)


def test_a_timestamp_that_leaves_the_calendar_in_utc_is_refused() -> None:
    assert normalize_timestamp("0001-01-01T00:00:00+01:00") is None
    assert fields_at(details([event(timestamp="9999-12-31T23:59:59-01:00")])) == [(0, "timestamp")]


@pytest.mark.parametrize("reserved", ["seq", "epoch"])
def test_reserved_payload_fields_rejected(reserved: str) -> None:
    assert fields_at(details([event(**{reserved: 1})])) == [(0, reserved)]


def test_both_reserved_fields_each_reported() -> None:
    assert sorted(fields_at(details([event(seq=1, epoch="e")]))) == [(0, "epoch"), (0, "seq")]


@pytest.mark.parametrize("item", [1, "text", None, True, [{"type": "x"}]])
def test_non_object_items_rejected(item: Any) -> None:
    [problem] = details([event(), item])
    assert (problem["index"], problem["field"]) == (1, "")
    assert "object" in problem["error"]


# ---------------------------------------------------------------- batches


def test_one_bad_item_gives_one_detail_with_its_index() -> None:
    batch = [event(), event("chunk"), event("task_progress", progress=101), event("complete")]
    assert details(batch) == [{"index": 2, "field": "progress", "error": "must be a number from 0 to 100"}]


def test_all_problems_of_all_items_in_index_order() -> None:
    item_1 = event("chunk", chunk_number=0)
    del item_1["content"]
    batch = [event(type="Bad"), item_1, event(), "nope", event(seq=3)]
    problems = details(batch)
    assert [d["index"] for d in problems] == [0, 1, 1, 3, 4]
    assert sorted(fields_at(problems)) == [(0, "type"), (1, "chunk_number"), (1, "content"), (3, ""), (4, "seq")]


def test_validation_failed_summary_is_one_line() -> None:
    with pytest.raises(ValidationFailed) as caught:
        normalize([event(), event(type="X"), event(progress=None, seq=1)])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("2 problems in 2 events")
    assert "event 1" in message


def test_batch_limit() -> None:
    assert len(normalize([event()] * MAX_BATCH_EVENTS)) == MAX_BATCH_EVENTS
    with pytest.raises(BadRequest, match=f"{MAX_BATCH_EVENTS + 1}.*{MAX_BATCH_EVENTS}"):
        normalize([event()] * (MAX_BATCH_EVENTS + 1))


def test_empty_list_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="empty"):
        normalize([])


# ---------------------------------------------------------------- generated and kept fields


def test_generated_ids_present_and_distinct() -> None:
    out = normalize([event(), event()])
    ids = [e[f] for e in out for f in ("event_id", "correlation_id")]
    assert all(isinstance(i, str) and i.startswith("ev-") and len(i) <= 128 for i in ids)
    assert len(set(ids)) == 4


def test_injected_id_generator_and_clock() -> None:
    [out] = normalize([event()], new_id=counter())
    assert (out["event_id"], out["correlation_id"], out["timestamp"]) == ("id-1", "id-2", NOW_ISO)


def test_given_envelope_fields_kept() -> None:
    given = {"event_id": "e-42", "correlation_id": "c-7", "timestamp": "2025-10-25T12:34:56.123Z"}
    [out] = normalize([event(**given)], new_id=counter())
    assert {k: out[k] for k in given} == given


def test_only_missing_id_is_generated() -> None:
    [out] = normalize([event(event_id="mine")], new_id=counter())
    assert (out["event_id"], out["correlation_id"]) == ("mine", "id-1")


def test_no_ids_spent_on_a_rejected_batch() -> None:
    calls = []
    with pytest.raises(ValidationFailed):
        normalize_events([event(), event(type="X")], session_id=None, now=NOW, new_id=lambda: calls.append(1) or "x")
    assert calls == []


def test_field_order_kept_and_added_fields_last() -> None:
    item = {"progress": 5, "type": "task_progress", "zeta": 1, "task_id": "t", "alpha": {"b": 2}}
    [out] = normalize([item], "s9")
    assert list(out) == [*item, *ADDED]
    assert out["session_id"] == "s9"


def test_input_not_mutated() -> None:
    batch = [event(), dict(VALID["task_progress"]), event(extra={"nested": [1]})]
    before = copy.deepcopy(batch)
    out = normalize(batch, "s1")
    assert batch == before
    assert all(o is not i for o, i in zip(out, batch, strict=True))


# ---------------------------------------------------------------- parse_body


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON; Charset=UTF-8",
        'application/json;charset="utf-8"',
        "application/json; charset=utf-8; foo=bar",
    ],
)
def test_json_content_types_accepted(content_type: str) -> None:
    assert parse_body(b'{"type": "x"}', content_type) == [{"type": "x"}]


def test_json_array_stays_a_list() -> None:
    assert parse_body(b'[{"a": 1}, {"b": 2}, 3]', "application/json") == [{"a": 1}, {"b": 2}, 3]


@pytest.mark.parametrize("content_type", ["application/x-ndjson", "application/x-ndjson; charset=utf-8"])
def test_ndjson_one_value_per_non_blank_line(content_type: str) -> None:
    body = b'{"a": 1}\n\n   \n{"b": "\xc3\xa9"}\r\n[1]\n'
    assert parse_body(body, content_type) == [{"a": 1}, {"b": "é"}, [1]]


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "",
        "text/plain",
        "application/jsonx",
        "application/x-www-form-urlencoded",
        "application/json; charset=latin-1",
        "application/x-ndjson; charset=iso-8859-1",
    ],
)
def test_other_content_types_are_415(content_type: str | None) -> None:
    with pytest.raises(UnsupportedMediaType):
        parse_body(b'{"type": "x"}', content_type)


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (b"", "application/json", "empty"),
        (b" \n\t", "application/json", "empty"),
        (b"[]", "application/json", "empty"),
        (b"", "application/x-ndjson", "empty"),
        (b"\n \n\r\n", "application/x-ndjson", "empty"),
        (b'{"type": ', "application/json", "invalid JSON"),
        (b"{} {}", "application/json", "invalid JSON"),
        (b'{"a": "\xff"}', "application/json", "UTF-8"),
        (b"3", "application/json", "object"),
        (b'"event"', "application/json", "object"),
        (b"null", "application/json", "object"),
    ],
)
def test_unreadable_bodies_are_400(body: bytes, content_type: str, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse_body(body, content_type)


@pytest.mark.parametrize(
    ("body", "line"),
    [
        (b'{"a": 1}\n\n{bad\n{"b": 2}', 3),
        (b'{"a": 1}\n{"b": "\xfe"}\n', 2),
        (b'{"a": 1}\n{"a": 1} {"a": 2}\n', 2),
    ],
)
def test_ndjson_bad_line_is_named(body: bytes, line: int) -> None:
    with pytest.raises(BadRequest, match=rf"\bline {line}\b"):
        parse_body(body, "application/x-ndjson")


def test_ndjson_end_to_end_on_a_session_path() -> None:
    body = b'{"type": "task_started", "task_id": "t1"}\n\n{"type": "task_progress", "task_id": "t1", "progress": 150}\n'
    with pytest.raises(ValidationFailed) as caught:
        normalize(parse_body(body, "application/x-ndjson"), "s1")
    assert fields_at(caught.value.details) == [(1, "progress")]


# ---------------------------------------------------------------- iso_timestamp


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0, "1970-01-01T00:00:00.000Z"),
        (0.1234, "1970-01-01T00:00:00.123Z"),
        (0.9999, "1970-01-01T00:00:00.999Z"),
        (59.5, "1970-01-01T00:00:59.500Z"),
        (NOW, NOW_ISO),
    ],
)
def test_iso_timestamp(seconds: float, expected: str) -> None:
    assert iso_timestamp(seconds) == expected
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", expected)
