"""Three research clients follow one research run side by side.

    python examples/research_clients.py [--url http://127.0.0.1:8050]

Starts a run with `POST /api/research/start`, then follows the returned
session with three `broker.client.follow` streams on `/ws/research/{id}`,
each with its own filter, the way the three research UIs do:

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

import orjson
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from broker.client import follow

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


async def watch(name: str, events: str, url: str, session_id: str, deadline: float) -> tuple[Counter[str], bool]:
    """Follow the run as one client until session_completed; return counts by type, and whether it ended.

    `broker.client.follow` keeps the client's place: a dropped connection is
    resumed where it left off, so the counts are exact even on a bad network.
    """
    counts: Counter[str] = Counter()
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            async with follow(url, session_id, endpoint="research", events=events, user_id=name) as stream:
                assert stream.greeting is not None
                show(name, stream.greeting, counts)
                async for message in stream:
                    show(name, message, counts)
                    if message["type"] == "session_completed":
                        return counts, True
    except TimeoutError:
        pass
    return counts, False


def show(name: str, message: dict[str, Any], counts: Counter[str]) -> None:
    counts[message["type"]] += 1
    seq = f"seq={message['seq']:<3}" if "seq" in message else " " * 7
    print(f"{name:<9} {seq} {message['type']:<22} {describe(message)}", flush=True)


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

    url = args.url.rstrip("/")
    run = await start_run(url, args.query)
    print(f"started session {run['session_id']}: {run['ws_url']}", flush=True)
    deadline = time.monotonic() + args.timeout
    outcomes = await asyncio.gather(
        *(watch(name, events, url, run["session_id"], deadline) for name, events in CLIENTS)
    )
    results = {name: counts for (name, _), (counts, _) in zip(CLIENTS, outcomes, strict=True)}
    print_summary(results)
    missed = [name for (name, _), (_, completed) in zip(CLIENTS, outcomes, strict=True) if not completed]
    if missed:
        print(f"no session_completed within {args.timeout:g} s for: {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
