"""`actor-broker` (also `python -m broker`): the command line.

`serve` runs the daemon; `check-config` answers "would this file start?"
before a restart or a SIGHUP; `stats` and `publish` talk to a running daemon
over its HTTP API (stdlib urllib only, so they work wherever the package is
installed). Exit codes: 0 success, 1 the daemon could not be reached or
refused, 2 bad usage or bad configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from broker.config import DEFAULT_SETTINGS, LOG_LEVELS, ConfigError, load_settings, resolve_config_path

PROG = "actor-broker"
DEFAULT_URL = f"http://{DEFAULT_SETTINGS.host}:{DEFAULT_SETTINGS.port}"
#: The publisher key `publish` sends when --api-key is not given.
API_KEY_ENV = "BROKER_API_KEY"

EXIT_OK = 0
EXIT_UNAVAILABLE = 1
EXIT_USAGE = 2


def _error(message: str) -> None:
    """One line on stderr, prefixed like every other tool's, so it greps well in a journal."""
    print(f"{PROG}: {message}", file=sys.stderr)


def _field(text: str) -> tuple[str, Any]:
    """`key=value` -> (key, value); the value is JSON when it parses (numbers, true,
    lists...), else the text itself, so `progress=40` is a number and `action=reading` a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Real-time message broker: domain events from backend services to WebSocket clients.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the daemon",
        description=(
            "Run the daemon. With no options: in memory, on 127.0.0.1:8050. Settings come from the "
            "file (--config, or BROKER_CONFIG), then BROKER_* environment variables, then these flags."
        ),
    )
    serve.add_argument("--config", metavar="PATH", help="TOML configuration file (wins over BROKER_CONFIG)")
    serve.add_argument("--host", help=f"address to listen on (default {DEFAULT_SETTINGS.host})")
    serve.add_argument("--port", type=int, help=f"port to listen on, 0 for any (default {DEFAULT_SETTINGS.port})")
    serve.add_argument(
        "--log-level", choices=LOG_LEVELS, default=None, help=f"log level (default {DEFAULT_SETTINGS.log_level})"
    )

    check = commands.add_parser(
        "check-config",
        help="check a configuration file",
        description=(
            "Load PATH as serve would (with the BROKER_* environment on top) and report the first problem. "
            "Exit 0 and print 'ok: PATH', or exit 2 with one line naming the key."
        ),
    )
    check.add_argument("path", metavar="PATH", help="TOML configuration file")

    stats = commands.add_parser(
        "stats",
        help="show a running daemon's counters",
        description="Fetch GET /api/websocket/stats from a running daemon and print it as a table.",
    )
    stats.add_argument("--url", default=DEFAULT_URL, help=f"the daemon's base URL (default {DEFAULT_URL})")
    stats.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer (default 5)")

    publish = commands.add_parser(
        "publish",
        help="publish one event into a session",
        description=(
            "POST one event to /api/sessions/SESSION/events and print the answer. Each key=value becomes "
            "a field; a value is JSON when it parses (40, true, [1,2], \"40\"), else a string."
        ),
        epilog="example: actor-broker publish demo1 task_progress task_id=t1 progress=40 current_action='reading'",
    )
    publish.add_argument("session", metavar="SESSION", help="session id")
    publish.add_argument("type", metavar="TYPE", help="event type, e.g. task_progress")
    publish.add_argument("fields", metavar="key=value", nargs="*", type=_field, help="event fields")
    publish.add_argument("--url", default=DEFAULT_URL, help=f"the daemon's base URL (default {DEFAULT_URL})")
    publish.add_argument(
        "--api-key",
        default=None,
        help=f"publisher key sent as 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}; "
        "prefer the variable, a flag shows in the process list)",
    )
    publish.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer (default 5)")
    return parser


def _serve(args: argparse.Namespace) -> int:
    overrides = {"host": args.host, "port": args.port, "log_level": args.log_level}
    try:
        settings = load_settings(args.config, env=os.environ, overrides=overrides)
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_USAGE
    from broker.daemon import serve  # lazily: the other commands need no Tornado app

    return serve(settings, resolve_config_path(args.config, os.environ))


def _check_config(args: argparse.Namespace) -> int:
    try:
        load_settings(args.path, env=os.environ)
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_USAGE
    print(f"ok: {args.path}")
    return EXIT_OK


def _request(
    url: str, timeout: float, body: bytes | None = None, headers: Mapping[str, str] | None = None
) -> tuple[int, bytes]:
    """(status, body) of one request; HTTP errors are answers too. Raises OSError when unreachable."""
    method = "GET" if body is None else "POST"
    request = urllib.request.Request(url, data=body, headers=dict(headers or {}), method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def _unreachable(url: str, exc: OSError) -> int:
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    _error(f"cannot reach {url}: {reason} (is the daemon running? see --url)")
    return EXIT_UNAVAILABLE


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(str(item) for item in value) if value else "-"
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def format_table(data: Mapping[str, Any]) -> str:
    """Two aligned columns, key and value, in the daemon's order."""
    width = max((len(key) for key in data), default=0)
    return "\n".join(f"{key:<{width}}  {_cell(value)}" for key, value in data.items())


def _stats(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/") + "/api/websocket/stats"
    try:
        status, body = _request(url, args.timeout)
    except OSError as exc:
        return _unreachable(url, exc)
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if status != 200 or not isinstance(data, dict):
        _error(f"GET {url} answered {status}: {body.decode(errors='replace')[:500]}")
        return EXIT_UNAVAILABLE
    print(format_table(data))
    return EXIT_OK


def _publish(args: argparse.Namespace) -> int:
    fields = dict(args.fields)
    if "type" in fields:
        _error("publish: give the event type as TYPE, not as a type=... field")
        return EXIT_USAGE
    event = {"type": args.type, **fields}
    url = args.url.rstrip("/") + f"/api/sessions/{quote(args.session, safe='')}/events"
    headers = {"Content-Type": "application/json"}
    api_key = args.api_key or os.environ.get(API_KEY_ENV)
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    try:
        status, body = _request(url, args.timeout, json.dumps(event).encode(), headers)
    except OSError as exc:
        return _unreachable(url, exc)
    text = body.decode(errors="replace")
    print(text)
    if not 200 <= status < 300:
        _error(f"POST {url} answered {status}")
        return EXIT_UNAVAILABLE
    return EXIT_OK


_COMMANDS = {"serve": _serve, "check-config": _check_config, "stats": _stats, "publish": _publish}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the process exit code (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command = _COMMANDS.get(args.command)
    if command is None:
        parser.print_help()
        return EXIT_USAGE
    return command(args)
