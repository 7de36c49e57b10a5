"""The Redis client's own cost of one publish: CPU of this process per `RedisStore.publish` call.

    .venv/bin/python bench/store_publish.py               # 20 000 single-event publishes, both ways
    .venv/bin/python bench/store_publish.py --calls 5000

A node's CPU per publish on Redis is the memory path's plus what redis-py
spends packing the script call, sending it, waiting on the pool and parsing
the reply. This isolates that part: one session, single-event publishes one
after another against a redis-server of its own (a free port, no
persistence), timed with `time.process_time()` (this process's user and
system CPU; the wait for Redis is not in it). It runs the store three
ways, taking turns for `--rounds` rounds, and prints the median of each:

* as the daemon builds it (`RedisStore.from_url`): publishes on the
  store's pipelined line (broker/cluster/line.py), the store's own
  deadline per call;
* the script called through redis-py's command path instead
  (`AsyncScript`, `execute_command`: a pool checkout and return, the retry
  wrapper, the observability hooks, per call), as before the line;
* that, with redis-py's `socket_timeout` set and no deadline of the
  store's: the set-up before that (on Python 3.11 it wraps every command's
  send in `asyncio.wait_for`, a task per command).

The figures move with the machine; the ratios are the point.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import orjson
from redis.commands.core import AsyncScript

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from broker.cluster.store import EventMeta, Limits, RedisStore

LIMITS = Limits(
    buffer_size=1000,
    dedup_window_ms=300_000,
    min_delta=1.0,
    max_interval_ms=1000,
    session_ttl_ms=3_600_000,
    connection_stale_ms=15_000,
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


SETUPS = ("line", "command path", "command path + socket_timeout")


async def _through_redis_py(script: AsyncScript, keys: list[bytes], args: list[str | bytes]) -> Any:
    """The publish script called as before the line: redis-py's AsyncScript on the pool."""
    return await script(keys=keys, args=args)


async def one_round(url: str, calls: int, setup: str, round_number: int) -> float:
    """Microseconds of this process's CPU per publish call."""
    store = RedisStore.from_url(url)
    if setup != "line":
        store._on_line = _through_redis_py  # type: ignore[method-assign]  # the comparison
    if setup == "command path + socket_timeout":  # redis-py's socket_timeout, no deadline of the store's
        store.client.connection_pool.connection_kwargs["socket_timeout"] = 1.0
        store.call_timeout = None
    session = f"bench-{round_number}-{SETUPS.index(setup)}"
    try:
        events = [
            {"event_id": f"e{i}", "type": "agent_message", "session_id": session, "text": "x" * 100}
            for i in range(calls + 200)
        ]
        encoded = [orjson.dumps(event) for event in events]
        metas = [EventMeta.of(event) for event in events]
        for i in range(200):  # warm the pool, the script cache and the session
            await store.publish(session, [encoded[i]], [metas[i]], LIMITS)
        started = time.process_time()
        for i in range(200, calls + 200):
            await store.publish(session, [encoded[i]], [metas[i]], LIMITS)
        return (time.process_time() - started) / calls * 1e6
    finally:
        await store.close()


async def main(calls: int, rounds: int) -> None:
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", tempfile.mkdtemp()],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        for _ in range(500):
            probe = RedisStore.from_url(url)
            try:
                await probe.ping()
                break
            except Exception:  # not up yet
                await asyncio.sleep(0.02)  # noqa: sleep - bounded wait for redis-server to listen
            finally:
                await probe.close()
        else:
            raise RuntimeError("redis-server did not answer")
        figures: dict[str, list[float]] = {setup: [] for setup in SETUPS}
        for n in range(rounds):
            for setup in SETUPS:
                figures[setup].append(await one_round(url, calls, setup, n))
        ours = statistics.median(figures["line"])
        print(f"client CPU per publish call, median of {rounds} rounds of {calls}:")
        print(f"  as the daemon builds the store (the pipelined line): {ours:.0f} µs")
        for setup in SETUPS[1:]:
            figure = statistics.median(figures[setup])
            print(f"  {setup}: {figure:.0f} µs ({figure / ours:.2f}x)")
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    asyncio.run(main(options.calls, options.rounds))
