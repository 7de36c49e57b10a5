"""`actor-broker` (also `python -m broker`): the command line.

`serve` runs the daemon; `check-config` answers "would this file start?"
before a restart or a SIGHUP; `stats` and `publish` talk to a running daemon
over its HTTP API (stdlib urllib only, so they work wherever the package is
installed); `publish --stdin` keeps one WebSocket to `/ws/publish` instead
(Tornado's client, imported only then). Exit codes: 0 success, 1 the daemon
could not be reached or refused, 2 bad usage or bad configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import sys
import threading
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
        help="publish one event into a session, or a stream of them from stdin",
        description=(
            "POST one event to /api/sessions/SESSION/events and print the answer. Each key=value becomes "
            'a field; a value is JSON when it parses (40, true, [1,2], "40"), else a string. '
            "With --stdin: read one JSON event per line (NDJSON), publish them over one WebSocket "
            "(/ws/publish, without waiting for each answer) and print one answer per line, in order, "
            "its ref the line number; SESSION, if given, is the session_id of lines that name none."
        ),
        epilog=(
            "examples: actor-broker publish demo1 task_progress task_id=t1 progress=40 current_action='reading'; "
            "my-agent | actor-broker publish --stdin demo1"
        ),
    )
    publish.add_argument("session", metavar="SESSION", nargs="?", help="session id (with --stdin: optional)")
    publish.add_argument("type", metavar="TYPE", nargs="?", help="event type, e.g. task_progress (not with --stdin)")
    publish.add_argument("fields", metavar="key=value", nargs="*", type=_field, help="event fields")
    publish.add_argument("--url", default=DEFAULT_URL, help=f"the daemon's base URL (default {DEFAULT_URL})")
    publish.add_argument(
        "--api-key",
        default=None,
        help=f"publisher key sent as 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}; "
        "prefer the variable, a flag shows in the process list)",
    )
    publish.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer (default 5)")
    publish.add_argument(
        "--stdin", action="store_true", help="publish the NDJSON events read from stdin over /ws/publish"
    )
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
    if args.stdin:
        if args.type is not None or args.fields:
            _error("publish --stdin: the events come from stdin; give at most SESSION, no TYPE or fields")
            return EXIT_USAGE
        return asyncio.run(_publish_stream(args.url, args.session, _api_key(args), args.timeout))
    if args.session is None or args.type is None:
        _error("publish: SESSION and TYPE are required (or --stdin)")
        return EXIT_USAGE
    fields = dict(args.fields)
    if "type" in fields:
        _error("publish: give the event type as TYPE, not as a type=... field")
        return EXIT_USAGE
    event = {"type": args.type, **fields}
    url = args.url.rstrip("/") + f"/api/sessions/{quote(args.session, safe='')}/events"
    headers = {"Content-Type": "application/json"}
    api_key = _api_key(args)
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


def _api_key(args: argparse.Namespace) -> str | None:
    """The publisher key: --api-key, else $BROKER_API_KEY."""
    key: str | None = args.api_key or os.environ.get(API_KEY_ENV)
    return key


def publish_url(url: str) -> str:
    """The daemon's `/ws/publish` for its base URL (`http://` -> `ws://`, `https://` -> `wss://`)."""
    base = url.rstrip("/")
    for scheme, ws in (("https://", "wss://"), ("http://", "ws://")):
        if base.startswith(scheme):
            return ws + base[len(scheme) :] + "/ws/publish"
    return base + "/ws/publish"


def stdin_frame(line: bytes, number: int, session: str | None) -> str | bytes:
    """The frame for one NDJSON line: `{"ref": number, "events": [the line's value]}`.

    One event per line, so a line holding an array is refused as an event
    (422), not published as a batch. A line that is not JSON is sent as it is,
    and the daemon's 400 says what is wrong with it; `session` fills in a
    missing `session_id`.
    """
    try:
        value = json.loads(line)
    except ValueError:
        return line
    if session is not None and isinstance(value, dict) and "session_id" not in value:
        value = {**value, "session_id": session}
    return json.dumps({"ref": number, "events": [value]}, separators=(",", ":"))


async def _publish_stream(url: str, session: str | None, api_key: str | None, timeout: float) -> int:
    """`publish --stdin`: every line sent as it is read, every answer printed as it comes, in order.

    Exit 0 if every line was accepted, 1 if one was refused, the daemon
    could not be reached or refused the handshake, or the connection ended
    before every line was answered.
    """
    from tornado.httpclient import HTTPClientError, HTTPRequest
    from tornado.websocket import websocket_connect

    target = publish_url(url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        conn = await asyncio.wait_for(websocket_connect(HTTPRequest(target, headers=headers)), timeout)
    except HTTPClientError as exc:
        if exc.response is not None and exc.response.body:
            print(exc.response.body.decode(errors="replace"))
        _error(f"GET {target} answered {exc.code}")
        return EXIT_UNAVAILABLE
    except (OSError, TimeoutError) as exc:
        return _unreachable(target, exc)
    return await _StdinPublisher(conn, session, timeout).run()


class _StdinPublisher:
    """One `publish --stdin` run over an open `/ws/publish` connection.

    Frames go out without waiting for answers; a write waits only while the
    daemon holds reading (past its max_publish_inflight), and stdin is read
    no faster than writes go, so nothing piles up in this process. Stdin is
    read by a daemon thread: a pipe that stays open cannot keep the command
    from exiting once the daemon closed the connection.
    """

    def __init__(self, conn: Any, session: str | None, timeout: float) -> None:
        self.conn = conn
        self.session = session
        self.timeout = timeout
        #: line numbers sent and not answered yet, oldest first (answers come in this order)
        self.sent: collections.deque[int] = collections.deque()
        self.refused = 0
        self.lines: asyncio.Queue[bytes] = asyncio.Queue(maxsize=1000)
        #: set by each answer (the wait for the last ones after stdin ended is bounded per answer)
        self.answered = asyncio.Event()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._read_stdin, args=(loop,), daemon=True, name="stdin").start()
        reader = asyncio.ensure_future(self._answers())
        whole_input = await self._send(reader)
        while self.sent and not reader.done():  # stdin ended: wait for the answers still to come
            self.answered.clear()
            answer = asyncio.ensure_future(self.answered.wait())
            done, _ = await asyncio.wait([reader, answer], timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED)
            answer.cancel()
            if not done:
                _error(f"no answer within {self.timeout} s")
                break
        closed_early = reader.done()  # the daemon closed the connection (a shutdown: 1001)
        reader.cancel()
        self.conn.close()
        if closed_early and (self.sent or not whole_input):
            code, reason = self.conn.close_code, self.conn.close_reason
            unread = "" if whole_input else " before the end of stdin"
            _error(
                f"the daemon closed the connection ({code} {reason or ''}){unread}; {len(self.sent)} lines not answered"
            )
            return EXIT_UNAVAILABLE
        return EXIT_UNAVAILABLE if self.refused or self.sent else EXIT_OK

    def _read_stdin(self, loop: asyncio.AbstractEventLoop) -> None:
        """Thread: each line of stdin into the queue (waiting while it is full), then b"" at the end.

        Reads the descriptor itself (os.read), not sys.stdin: a daemon thread
        blocked inside a buffered file's read aborts the interpreter's exit.
        """

        def put(line: bytes) -> None:
            asyncio.run_coroutine_threadsafe(self.lines.put(line), loop).result()

        pending = b""
        try:
            try:
                while chunk := os.read(sys.stdin.fileno(), 65536):
                    *lines, pending = (pending + chunk).split(b"\n")
                    for line in lines:
                        put(line + b"\n")
            except OSError as exc:  # stdin cannot be read (closed, a directory): what was read is all
                _error(f"reading stdin: {exc}")
            if pending:
                put(pending)
            put(b"")
        except RuntimeError:  # the loop is gone: the command is exiting
            return

    async def _send(self, reader: asyncio.Future[None]) -> bool:
        """Send every line of stdin; True once stdin ended, False if the connection closed first."""
        from tornado.websocket import WebSocketClosedError

        number = 0
        while not reader.done():
            next_line = asyncio.ensure_future(self.lines.get())
            waiting: list[asyncio.Future[Any]] = [next_line, reader]
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if not next_line.done():
                next_line.cancel()
                return False
            line = next_line.result()
            if not line:
                return True
            number += 1
            if not line.strip():
                continue
            self.sent.append(number)
            try:
                await self.conn.write_message(stdin_frame(line, number, self.session))
            except WebSocketClosedError:
                return False
        return False

    async def _answers(self) -> None:
        """Print each answer as one line, its ref the line number, until the connection closes."""
        while (message := await self.conn.read_message()) is not None:
            answer = json.loads(message)
            if answer.get("type") not in ("accepted", "error"):
                _error(f"the daemon says: {message}")  # server_shutdown: the answers still come
                continue
            number = self.sent.popleft()
            if "ref" not in answer:  # a line that was not JSON went as it was
                answer = {"type": answer["type"], "ref": number, **answer}
            self.refused += answer["type"] != "accepted"
            print(json.dumps(answer, separators=(",", ":")), flush=True)
            self.answered.set()


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
