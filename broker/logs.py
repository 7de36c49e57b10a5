"""Structured logging: JSON lines for journald, readable lines on a terminal.

One pipeline for everything: structlog events (the broker's own) and stdlib
records (tornado, pykka) go through the same processors and the same
handler on stdout, so journald and `jq` see one format, and context bound
with `structlog.contextvars` (the request id of the HTTP request being
handled) shows up on tornado's lines too.

Loggers bind their ids where they are made (`log.bind(session_id=...,
connection_id=...)` in the actors), so every line about a session or a
connection carries them without the call sites repeating them.
"""

from __future__ import annotations

import logging
import sys
from typing import IO, Any

import structlog
from structlog.typing import Processor

from actors.wire import session_id_problem

__all__ = ["LEVELS", "configure_logging", "log_request", "set_level"]

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

access_log = structlog.get_logger("actor_broker.access")
#: The stdlib logger behind `access_log`: its level check is cached, and asking
#: it first spares a request whose line would be dropped the work of making one.
_access_level_check = logging.getLogger("actor_broker.access")


def configure_logging(level: str = "info", fmt: str = "auto", stream: IO[str] | None = None) -> None:
    """Route structlog and stdlib logging (tornado, pykka) through one pipeline.

    `fmt="auto"` picks JSON when the stream is not a terminal (systemd,
    pipes), and a coloured console on a terminal. Safe to call again (a
    SIGHUP that changes `log_level` or `log_format`): the root handler is
    replaced, not added to.
    """
    out = stream if stream is not None else sys.stdout
    tty = _isatty(out)
    json_lines = fmt == "json" or (fmt == "auto" and not tty)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    final: list[Processor]
    if json_lines:
        # One line per event: tracebacks become a string field, not extra lines.
        final = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        # ConsoleRenderer draws exc_info itself (and warns if it was pre-formatted).
        final = [structlog.dev.ConsoleRenderer(colors=tty)]
    structlog.configure(
        processors=[
            # Drop disabled levels before any work: debug lines sit on hot paths.
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)
    # Python's own warnings (deprecations in libraries) become log lines too.
    logging.captureWarnings(True)


def set_level(level: str) -> None:
    """Change the level of every logger at once (the root's; nothing sets others)."""
    logging.getLogger().setLevel(LEVELS.get(level, logging.INFO))


def log_request(handler: Any) -> None:
    """Tornado's `log_function`: the access log line, carrying the request id.

    Replaces tornado's own access log so the line is a structured event with
    `request_id` (from `ApiHandler`, or the client's `X-Request-ID` for the
    handlers that do not make one) and the same level rule: info below 400,
    warning for 4xx, error for 5xx. The path is logged without its query
    string: WebSocket tokens travel there.
    """
    status = handler.get_status()
    if status < 400:
        level, emit = logging.INFO, access_log.info
    elif status < 500:
        level, emit = logging.WARNING, access_log.warning
    else:
        level, emit = logging.ERROR, access_log.error
    if not _access_level_check.isEnabledFor(level):
        return
    request = handler.request
    request_id = getattr(handler, "request_id", None) or request.headers.get("X-Request-ID") or None
    emit(
        "http_request",
        status=status,
        method=request.method,
        path=request.path,
        remote_ip=request.remote_ip,
        duration_ms=round(1000.0 * request.request_time(), 2),
        request_id=request_id,
        session_id=named_session(handler),
    )


def named_session(handler: Any) -> str | None:
    """The session a request names, for its access line: in the path, or the `session_id` query argument.

    Every route with a path argument names a session by it (`/ws/research/{id}`,
    `/api/sessions/{id}...`, `/sse/research/{id}`); `/ws` and `/sse` take it as a
    query argument. A publish to `POST /api/events` names its sessions in
    the body: the handler sets `session_id` when there is exactly one.
    Anything that is not a valid session id is not logged as one.
    """
    named = getattr(handler, "session_id", None)
    if named is None:
        path_args = getattr(handler, "path_args", None)
        if path_args:
            named = path_args[0]
        else:
            values = handler.request.query_arguments.get("session_id")
            named = values[0].decode("utf-8", "replace") if values else None
    if isinstance(named, bytes):
        named = named.decode("utf-8", "replace")
    return named if isinstance(named, str) and session_id_problem(named) is None else None


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real file
        return False
