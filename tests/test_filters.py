"""Event filters: the `events` grammar of docs/protocol.md section 3.4."""

from __future__ import annotations

import dataclasses

import pytest

from actors.filters import (
    ALL,
    DEFAULT_PRESETS,
    EventFilter,
    FilterError,
    parse_event_list,
    parse_events_param,
)

ESSENTIAL = sorted(DEFAULT_PRESETS["essential"])
PLANNING = sorted(DEFAULT_PRESETS["planning"])
EVERY_KNOWN = [
    "session_started", "session_completed", "session_cancelled", "plan_generated", "task_started",
    "task_progress", "task_completed", "task_failed", "report_generated", "query_start", "chunk",
    "complete", "error", "system_notification",
]


def test_default_presets_are_the_documented_ones() -> None:
    assert set(DEFAULT_PRESETS) == {"essential", "planning"}  # `all` is built in
    assert DEFAULT_PRESETS["essential"] == {"session_started", "session_completed", "session_cancelled",
                                            "task_completed", "task_failed", "complete", "error"}
    assert DEFAULT_PRESETS["planning"] == {"session_started", "session_completed", "plan_generated",
                                           "report_generated"}
    with pytest.raises(TypeError):
        DEFAULT_PRESETS["mine"] = frozenset()  # type: ignore[index]


@pytest.mark.parametrize("value", [None, "", "   ", "*", "all", " all ", "*,all", "all,essential", "essential,*"])
def test_everything(value: str | None) -> None:
    f = parse_events_param(value)
    assert f == ALL
    assert f.echo() == ["*"]
    assert all(f.admits(t) for t in [*EVERY_KNOWN, "my_custom", "x"])


@pytest.mark.parametrize(("value", "expected"), [
    ("essential", ESSENTIAL),
    ("planning", PLANNING),
    (" planning ", PLANNING),
    ("essential,task_progress", sorted([*ESSENTIAL, "task_progress"])),
    ("essential,planning", sorted(set(ESSENTIAL) | set(PLANNING))),
    ("task_progress,chunk,chunk", ["chunk", "task_progress"]),
    ("my_custom", ["my_custom"]),  # unknown but valid name: publishers may use their own types
    ("zeta,alpha.beta,a", ["a", "alpha.beta", "zeta"]),
    ("essential,-error,-complete", sorted(set(ESSENTIAL) - {"error", "complete"})),
    ("essential,-essential", []),
    ("essential,-planning", sorted(set(ESSENTIAL) - set(PLANNING))),
])
def test_explicit_types(value: str, expected: list[str]) -> None:
    f = parse_events_param(value)
    assert not f.everything
    assert f.echo() == expected
    for t in [*EVERY_KNOWN, "my_custom", "other_custom"]:
        assert f.admits(t) == (t in expected)


@pytest.mark.parametrize(("value", "removed"), [
    ("all,-task_progress", ["task_progress"]),
    ("*,-task_progress", ["task_progress"]),
    ("-task_progress", ["task_progress"]),  # only removals: start from all
    ("-b,-a", ["a", "b"]),
    (" -chunk , -query_start ", ["chunk", "query_start"]),
    ("-essential", ESSENTIAL),
    ("all,-planning,-chunk", sorted([*PLANNING, "chunk"])),
    # Removals apply after every addition, whatever the order, so `-a,all` excludes a.
    ("-task_progress,all", ["task_progress"]),
    ("all,-chunk,chunk", ["chunk"]),
])
def test_everything_but(value: str, removed: list[str]) -> None:
    f = parse_events_param(value)
    assert f.everything
    assert f.echo() == ["*", *("-" + t for t in removed)]
    for t in [*EVERY_KNOWN, "my_custom", "other.custom"]:
        assert f.admits(t) == (t not in removed)


def test_removal_after_addition_regardless_of_order() -> None:
    assert parse_events_param("-chunk,essential,chunk") == parse_events_param("essential,chunk,-chunk")
    assert not parse_events_param("-chunk,chunk").admits("chunk")


@pytest.mark.parametrize(("value", "named"), [
    ("Bad", "'Bad'"),
    ("1x", "'1x'"),
    ("essential,task-progress", "'task-progress'"),
    ("_x", "'_x'"),
    ("a b", "'a b'"),
    ("-*", "'-*'"),
    ("-all", "'-all'"),
    ("all,-*", "'-*'"),
    ("-", "'-'"),
    ("--chunk", "'--chunk'"),
    ("-Bad", "'-Bad'"),
    ("a" * 65, "'aaaa"),  # over 64 characters
    ("a,,b", "position 2"),
    ("a,", "position 2"),
    (",a", "position 1"),
    (",", "position 1"),
    ("a, ,b", "position 2"),
    ("x" * 5000 + "!", "..."),  # a huge item is clipped, the reason stays short
    ("caf\u00e9", "'caf\\xe9'"),  # non-ASCII is escaped, so bytes == characters
])
def test_bad_items_raise_short_reason_naming_the_item(value: str, named: str) -> None:
    with pytest.raises(FilterError) as info:
        parse_events_param(value)
    reason = str(info.value)
    assert named in reason
    assert len(reason.encode()) < 100
    assert isinstance(info.value, ValueError)


def test_longest_valid_type_is_accepted() -> None:
    name = "a" + "b" * 63
    assert parse_events_param(name).echo() == [name]


CUSTOM = {"lifecycle": frozenset({"session_started", "session_completed"}), "progress": frozenset({"task_progress"})}


def test_custom_presets() -> None:
    assert parse_events_param("lifecycle", CUSTOM).echo() == ["session_completed", "session_started"]
    assert parse_events_param("-progress", CUSTOM).echo() == ["*", "-task_progress"]
    assert parse_events_param("lifecycle,progress,-session_started", CUSTOM).echo() == [
        "session_completed", "task_progress"]
    # Without the default presets, `essential` is just a (valid) type name.
    assert parse_events_param("essential", CUSTOM).echo() == ["essential"]
    assert parse_events_param("all", CUSTOM) == ALL
    assert ALL.unsubscribe(["progress"], CUSTOM).echo() == ["*", "-task_progress"]
    assert parse_event_list(["lifecycle"], CUSTOM) == ["lifecycle"]


def test_subscribe_and_unsubscribe_round() -> None:
    f = ALL.unsubscribe(["task_progress"])
    assert f.echo() == ["*", "-task_progress"]  # every other type stays
    assert not f.admits("task_progress")
    assert f.admits("chunk")
    assert f.admits("my_custom")
    f = f.subscribe(["task_progress"])
    assert f == ALL
    assert f.echo() == ["*"]
    f = f.unsubscribe(["*"])
    assert f.echo() == []
    assert not any(f.admits(t) for t in [*EVERY_KNOWN, "my_custom"])
    f = f.subscribe(["*"])
    assert f == ALL


@pytest.mark.parametrize(("start", "op", "items", "expected"), [
    ("essential", "subscribe", ["task_progress"], sorted([*ESSENTIAL, "task_progress"])),
    ("essential", "subscribe", ["planning"], sorted(set(ESSENTIAL) | set(PLANNING))),
    ("essential", "subscribe", ["all"], ["*"]),
    ("essential", "unsubscribe", ["error", "nonexistent"], sorted(set(ESSENTIAL) - {"error"})),
    ("essential", "unsubscribe", ["essential"], []),
    ("essential", "unsubscribe", ["all"], []),
    ("all,-a,-b", "subscribe", ["a"], ["*", "-b"]),
    ("all,-a", "unsubscribe", ["planning"], ["*", "-a", *("-" + t for t in PLANNING)]),
    ("all", "unsubscribe", ["essential", "chunk"], ["*", *("-" + t for t in sorted([*ESSENTIAL, "chunk"]))]),
    ("chunk", "unsubscribe", [], ["chunk"]),
    ("chunk", "subscribe", [], ["chunk"]),
])
def test_subscribe_unsubscribe(start: str, op: str, items: list[str], expected: list[str]) -> None:
    before = parse_events_param(start)
    after = getattr(before, op)(items)
    assert after.echo() == expected
    assert before == parse_events_param(start)  # immutable: the old filter is untouched


@pytest.mark.parametrize("op", ["subscribe", "unsubscribe"])
@pytest.mark.parametrize("items", [["chunk", "Bad"], ["-chunk"], ["chunk", ""], ["chunk", 3], [" chunk"]])
def test_bad_subscribe_item_raises_and_changes_nothing(op: str, items: list[object]) -> None:
    before = parse_events_param("essential")
    with pytest.raises(FilterError) as info:
        getattr(before, op)(items)
    assert len(str(info.value).encode()) < 100
    assert before.echo() == ESSENTIAL


def test_subscribe_refuses_a_bare_string() -> None:
    with pytest.raises(TypeError):
        ALL.unsubscribe("chunk")


@pytest.mark.parametrize("items", [["*"], ["all"], ["essential", "chunk"], ["my_custom"], ["a", "a"]])
def test_parse_event_list_accepts(items: list[str]) -> None:
    assert parse_event_list(items) == items


@pytest.mark.parametrize(("items", "named"), [
    (None, "non-empty list"),
    ("chunk", "non-empty list"),
    (("chunk",), "non-empty list"),
    ({"chunk": True}, "non-empty list"),
    ([], "non-empty list"),
    (["chunk", 1], "events[1]"),
    ([None], "events[0]"),
    ([["chunk"]], "events[0]"),
    (["-chunk"], "'-chunk'"),
    (["-all"], "'-all'"),
    (["chunk", "Bad"], "'Bad'"),
    ([""], "''"),
    ([" chunk"], "' chunk'"),  # a JSON list is not stripped
    (["chunk\n"], "'chunk\\n'"),
])
def test_parse_event_list_rejects(items: object, named: str) -> None:
    with pytest.raises(FilterError) as info:
        parse_event_list(items)
    assert named in str(info.value)
    assert len(str(info.value).encode()) < 100


def test_echo_round_trips_through_the_parameter() -> None:
    for value in ["all", "all,-z,-a,-m", "essential,chunk", "-planning"]:
        f = parse_events_param(value)
        assert parse_events_param(",".join(f.echo())) == f


def test_filter_is_frozen_slotted_and_consistent() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ALL.everything = False  # type: ignore[misc]
    assert not hasattr(ALL, "__dict__")
    assert hash(parse_events_param("-a")) == hash(parse_events_param("all,-a"))
    with pytest.raises(ValueError, match="only for"):
        EventFilter(True, types=frozenset({"a"}))
    with pytest.raises(ValueError, match="only for"):
        EventFilter(False, excluded=frozenset({"a"}))
