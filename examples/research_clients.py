"""Three research clients follow one research run side by side.

    python examples/research_clients.py [--url http://127.0.0.1:8050]

Starts a run with `POST /api/research/start`, then connects three clients to
the returned `ws_url`, each with its own filter, the way the three research
UIs do:

    desktop    events=all        every event
    mobile     events=essential  lifecycle only
    dashboard  events=planning   plan, report, start and end

`/ws/research/{id}` replays the whole history to a new connection by default
(`replay=all`), so a client that connects a moment after the run started
misses nothing. Each client prints what it receives as it arrives and stops at
`session_completed`; then a table shows how many messages of each type each
client got. Exit code 1 if a client did not see `session_completed` in time.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from typing import Any
from urllib.parse import urlencode

import orjson
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

CLIENTS = (("desktop", "all"), ("mobile", "essential"), ("dashboard", "planning"))


async def start_run(url: str, query: str) -> dict[str, Any]:
    response = await AsyncHTTPClient().fetch(
        HTTPRequest(
            f"{url}/api/research/start",
            method="POST",
            headers={"Content-Type": "application/json"},
            body=orjson.dumps({"query": query, "user_id": "examples"}),
            request_timeout=10,
        )
    )
    return orjson.loads(response.body)


def describe(message: dict[str, Any]) -> str:
    """One compact line for a message."""
    kind = message["type"]
    if kind == "task_progress":
        return f"{message['task_id']} {message['progress']:>3}% {message.get('current_action', '')}"
    if kind in ("task_started", "task_completed", "task_failed"):
        return f"{message['task_id']} {message.get('title') or message.get('result') or message.get('error', '')}"
    if kind == "plan_generated":
        return f"{len(message['plan']['steps'])} steps"
    if kind == "report_generated":
        return repr(message["report"]["title"])
    if kind == "connection_established":
        return f"events: {','.join(message['events'])} (history up to seq {message['last_seq']})"
    if kind == "session_started":
        return repr(message.get("query", ""))
    return message.get("status", "")


async def follow(name: str, events: str, ws_url: str, deadline: float) -> tuple[Counter[str], bool]:
    """Read one client's messages until session_completed; return counts by type, and whether it ended."""
    query = urlencode({"events": events, "user_id": name})
    connection = await websocket_connect(f"{ws_url}?{query}", connect_timeout=10)
    counts: Counter[str] = Counter()
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return counts, False
            try:
                raw = await asyncio.wait_for(connection.read_message(), remaining)
            except TimeoutError:
                return counts, False
            if raw is None:  # the server closed the connection
                return counts, False
            message = orjson.loads(raw)
            counts[message["type"]] += 1
            seq = f"seq={message['seq']:<3}" if "seq" in message else " " * 7
            print(f"{name:<9} {seq} {message['type']:<22} {describe(message)}", flush=True)
            if message["type"] == "session_completed":
                return counts, True
    finally:
        connection.close()


def print_summary(results: dict[str, Counter[str]]) -> None:
    names = list(results)
    types = list(dict.fromkeys(t for counts in results.values() for t in counts))  # in order of arrival
    width = max(len(t) for t in [*types, "session messages"])
    header = f"{'type':<{width}} " + " ".join(f"{n:>9}" for n in names)
    print()
    print(header)
    print("-" * len(header))
    for kind in types:
        print(f"{kind:<{width}} " + " ".join(f"{results[n][kind]:>9}" for n in names))
    print("-" * len(header))
    totals = {n: sum(c.values()) - c["connection_established"] for n, c in results.items()}
    print(f"{'session messages':<{width}} " + " ".join(f"{totals[n]:>9}" for n in names))
    print()
    print("counts: " + " ".join(f"{n}={totals[n]}" for n in names))


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8050", help="the broker's base URL")
    parser.add_argument("--query", default="How do actor systems handle back-pressure?", help="the research query")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the run to complete")
    args = parser.parse_args()

    run = await start_run(args.url.rstrip("/"), args.query)
    print(f"started session {run['session_id']}: {run['ws_url']}", flush=True)
    deadline = time.monotonic() + args.timeout
    outcomes = await asyncio.gather(*(follow(name, events, run["ws_url"], deadline) for name, events in CLIENTS))
    results = {name: counts for (name, _), (counts, _) in zip(CLIENTS, outcomes, strict=True)}
    print_summary(results)
    missed = [name for (name, _), (_, completed) in zip(CLIENTS, outcomes, strict=True) if not completed]
    if missed:
        print(f"no session_completed within {args.timeout:g} s for: {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
