"""Typed constructors for the known domain events, for in-process publishers.

Each returns a plain event dict (docs/protocol.md section 2.3) ready for
`Broker.emit()` / `Broker.publish_events()`; extra keyword arguments become
payload fields. Nothing here validates: the broker does, the same way for
HTTP and in-process publishers.
"""

from __future__ import annotations

from typing import Any


def event(type_: str, session_id: str, **payload: Any) -> dict[str, Any]:
    """Any event, including your own types (`^[a-z][a-z0-9_.]{0,63}$`)."""
    return {"type": type_, "session_id": session_id, **payload}


def session_started(session_id: str, **payload: Any) -> dict[str, Any]:
    return event("session_started", session_id, **payload)


def session_completed(session_id: str, **payload: Any) -> dict[str, Any]:
    return event("session_completed", session_id, **payload)


def session_cancelled(session_id: str, **payload: Any) -> dict[str, Any]:
    return event("session_cancelled", session_id, **payload)


def plan_generated(session_id: str, plan: Any, **payload: Any) -> dict[str, Any]:
    return event("plan_generated", session_id, plan=plan, **payload)


def task_started(session_id: str, task_id: str, **payload: Any) -> dict[str, Any]:
    return event("task_started", session_id, task_id=task_id, **payload)


def task_progress(
    session_id: str, task_id: str, progress: float, current_action: str | None = None, **payload: Any
) -> dict[str, Any]:
    if current_action is not None:
        payload["current_action"] = current_action
    return event("task_progress", session_id, task_id=task_id, progress=progress, **payload)


def task_completed(session_id: str, task_id: str, **payload: Any) -> dict[str, Any]:
    return event("task_completed", session_id, task_id=task_id, **payload)


def task_failed(session_id: str, task_id: str, error: str, **payload: Any) -> dict[str, Any]:
    return event("task_failed", session_id, task_id=task_id, error=error, **payload)


def report_generated(session_id: str, report: Any, **payload: Any) -> dict[str, Any]:
    return event("report_generated", session_id, report=report, **payload)


def query_start(session_id: str, query: Any, **payload: Any) -> dict[str, Any]:
    return event("query_start", session_id, query=query, **payload)


def chunk(session_id: str, content: str, chunk_number: int, **payload: Any) -> dict[str, Any]:
    return event("chunk", session_id, content=content, chunk_number=chunk_number, **payload)


def complete(session_id: str, full_response: str, total_chunks: int, **payload: Any) -> dict[str, Any]:
    return event("complete", session_id, full_response=full_response, total_chunks=total_chunks, **payload)


def error(session_id: str, error: str, **payload: Any) -> dict[str, Any]:
    return event("error", session_id, error=error, **payload)


def system_notification(session_id: str, message: str, **payload: Any) -> dict[str, Any]:
    return event("system_notification", session_id, message=message, **payload)
