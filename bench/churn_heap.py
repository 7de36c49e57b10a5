"""What a node's Python heap keeps after clients come and go: the check behind the churn RSS figure.

    .venv/bin/python bench/churn_heap.py                  # on Redis (a redis-server of its own), 200 clients stay
    .venv/bin/python bench/churn_heap.py --backend memory
    .venv/bin/python bench/churn_heap.py --stay 0         # every session's last follower leaves each time

`make bench`'s churn scenario reads RSS, which moves in steps as the
allocator takes new arenas; this says whether objects are kept. The daemon
(broker.daemon.Daemon, default settings, `dedup_window` 1 s as in the
bench's churn) runs in this process; a child process (this file with
`--clients PORT`) opens `--stay` clients over 20 sessions that stay, then
runs phases of 2 000 clients that each connect to a random session, wait
for the greeting, stay 10-50 ms and leave (half close the WebSocket, half
drop the socket). After each phase this process collects, then:

* from the third phase on, tracemalloc (started after the second) gives
  the heap; the report is the growth over the last two phases, per
  churned connection, with the largest allocation sites;
* over one phase `gc.DEBUG_SAVEALL` keeps every object a collection found
  unreachable: cyclic garbage, which the daemon's GC set-up
  (broker/gc_tuning.py) would freeze out of collections until the next
  thaw. The count by type is printed (0 is the healthy answer).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import os
import random
import socket
import subprocess
import sys
import tempfile
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SESSIONS = [f"churn-heap-{i}" for i in range(20)]
PER_PHASE = 2000
PHASES = 6


async def clients(port: int, stay: int) -> None:
    """The child: staying clients, then PHASES phases of churn; "phase N" on stdout after each, then a line in."""
    from tornado.websocket import WebSocketClientConnection, websocket_connect

    def url(session: str) -> str:
        return f"ws://127.0.0.1:{port}/ws?session_id={session}&replay=none"

    async def drain(client: WebSocketClientConnection) -> None:
        while await client.read_message() is not None:  # read on, so pings are answered
            pass

    staying = [await websocket_connect(url(SESSIONS[i % len(SESSIONS)])) for i in range(stay)]
    readers = [asyncio.ensure_future(drain(c)) for c in staying]
    limit = asyncio.Semaphore(100)

    async def churn_one(i: int) -> None:
        async with limit:
            client = await websocket_connect(url(random.choice(SESSIONS)))
            await client.read_message()  # the greeting
            await asyncio.sleep(random.uniform(0.01, 0.05))  # noqa: sleep - how long a churning client stays
            if i % 2:
                client.close()
            else:
                client.protocol.stream.close()  # type: ignore[union-attr]  # dropped, no close frame

    loop = asyncio.get_running_loop()
    for phase in range(PHASES):
        await asyncio.gather(*(churn_one(i) for i in range(PER_PHASE)))
        await asyncio.sleep(1.0)  # noqa: sleep - let the server see the last ones go
        print("phase", phase, flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
    for reader in readers:
        reader.cancel()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def measure(backend: str, stay: int) -> None:
    from broker.config import Settings
    from broker.daemon import Daemon
    from broker.logs import configure_logging

    configure_logging("warning", "json", stream=sys.stderr)
    settings = Settings(host="127.0.0.1", port=0, log_level="warning", log_format="json", dedup_window=1.0)
    redis = None
    if backend == "redis":
        port = free_port()
        redis = subprocess.Popen(
            ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", tempfile.mkdtemp()],
            stdout=subprocess.DEVNULL,
        )
        settings = settings.replace(backend="redis", redis_url=f"redis://127.0.0.1:{port}/0")
    daemon = Daemon(settings, environ={})
    serving = asyncio.ensure_future(daemon.run())
    try:
        for _ in range(3000):  # the daemon retries Redis until it answers
            if daemon.port is not None and daemon.broker is not None and daemon.broker.ready:
                break
            await asyncio.sleep(0.01)  # noqa: sleep - bounded wait for start-up
        else:
            raise RuntimeError("the daemon did not become ready")
        child = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--clients", str(daemon.port), "--stay", str(stay),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        assert child.stdin is not None and child.stdout is not None
        snapshots = []
        for phase in range(PHASES):
            await child.stdout.readline()
            gc.unfreeze()  # what the daemon froze is collectable again: garbage is garbage here
            gc.collect()
            if phase == 1:
                tracemalloc.start(10)
            elif phase >= 2:
                snapshots.append(tracemalloc.take_snapshot())
            if phase == 2:
                gc.set_debug(gc.DEBUG_SAVEALL)
            elif phase == 3:
                gc.set_debug(0)
                kinds = collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage)
                print(f"cyclic garbage over one phase of {PER_PHASE}: {len(gc.garbage)} objects")
                for name, count in kinds.most_common(15):
                    print(f"  {count:7d}  {name}")
                gc.garbage.clear()
            broker = daemon.broker
            print(f"phase {phase}: {len(broker.connections)} connections, {len(broker.directory)} sessions")
            child.stdin.write(b"\n")
            await child.stdin.drain()
        await child.wait()
        diff = snapshots[-1].compare_to(snapshots[-3], "traceback")
        grown = sum(stat.size_diff for stat in diff)
        per_connection = grown / (2 * PER_PHASE)
        print(f"heap growth over the last 2 phases: {grown / 1024:.1f} KiB, {per_connection:.1f} B per connection")
        for stat in diff[:5]:
            print(f"  {stat.size_diff / 1024:8.1f} KiB {stat.count_diff:+d}  {stat.traceback.format()[-1].strip()}")
    finally:
        daemon.request_stop()
        await serving
        if redis is not None:
            redis.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("redis", "memory"), default="redis")
    parser.add_argument("--stay", type=int, default=200, help="clients that stay connected throughout (default 200)")
    parser.add_argument("--clients", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the child
    args = parser.parse_args()
    if args.clients is not None:
        asyncio.run(clients(args.clients, args.stay))
    else:
        asyncio.run(measure(args.backend, args.stay))


if __name__ == "__main__":
    main()
