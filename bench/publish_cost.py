"""Server CPU per single-event HTTP publish, the figure issue 14's lean publish path is judged by.

    .venv/bin/python bench/publish_cost.py                  # 1 000 idle clients over 100 sessions, 3 rounds
    .venv/bin/python bench/publish_cost.py --clients 0      # publishing alone, no fan-out
    .venv/bin/python bench/publish_cost.py --target baseline  # bench/baseline.py (or fastapi), for comparison
    .venv/bin/python bench/publish_cost.py --profile /tmp/p # + py-spy (raw stacks) per round, summarised

Starts one server on a free port (`python -m broker serve`, in memory, log
level warning, as `make bench` does; extra settings with `--env KEY=VALUE`),
and for every round opens `--clients` WebSocket clients over `--sessions`
fresh sessions (bench/loadgen; none with `--clients 0`), then sends
`--publishes` POSTs of one event each to `/api/sessions/{id}/events`,
`--rate` a second, round-robin over the sessions, over 16 keep-alive
connections (bench/run.py's client). It reads the server's utime + stime
from /proc/<pid>/stat just before the first publish and once the last
answer is in and the clients have received every event, and prints CPU ms
per publish for each round and the median. That CPU includes the fan-out to
the session's clients (10 each by default), as the `latency` scenario of
`make bench` counts it. Each round also reports the publisher's view of the
round trip (p50 / p99 of the time to the 202) and, with clients, the
publish-to-receive latency they measured (p50 / p99), and fails on any lost,
duplicated or reordered message.

On a shared machine the figures move with what else runs: compare runs made
minutes apart, or take the median of several.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# bench/run.py's keep-alive client, its seq check and its profile summary; the rest is here,
# so that this script keeps working while run.py's drivers change
from run import (
    BASELINE,
    CLK_TCK,
    EVENT_TYPE,
    LOADGEN_DIR,
    Http,
    Loadgen,
    Published,
    now_ms,
    record_py_spy,
    stop_py_spy,
    summarize_profile,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_FASTAPI = os.path.join(ROOT, "bench", "peer_fastapi.py")
LABEL = {
    "broker": "actor-broker",
    "baseline": "bare Tornado (bench/baseline.py)",
    "fastapi": "FastAPI on uvicorn (bench/peer_fastapi.py)",
}
COMMAND = {
    "broker": [sys.executable, "-m", "broker", "serve"],
    "baseline": [sys.executable, BASELINE],
    "fastapi": [sys.executable, PEER_FASTAPI],
}


class Server:
    """The server process on a free port, its log in a file."""

    def __init__(self, target: str, logdir: str, env: dict[str, str]) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port: int = s.getsockname()[1]
        command = COMMAND[target]
        environ = {**os.environ, "BROKER_LOG_LEVEL": "warning", "BROKER_LOG_FORMAT": "json", **env}
        self.log_path = os.path.join(logdir, f"{target}-{self.port}.log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*command, "--port", str(self.port)], cwd=ROOT, env=environ, stdout=log, stderr=subprocess.STDOUT
            )
        self.pid = self.proc.pid
        #: actor-broker is ready when /readyz says so (on Redis: once its node has heard Redis back)
        self.ready_path = "/readyz" if target == "broker" else "/healthz"

    async def ready(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                http = await Http.connect(self.port)
                status, _ = await http.request("GET", self.ready_path)
                http.close()
                if status == 200:
                    return
            except (OSError, asyncio.IncompleteReadError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"no 200 from {self.ready_path} within 30 s; see {self.log_path}")
            await asyncio.sleep(0.1)  # a bounded poll of another process

    def logged_errors(self) -> list[str]:
        with open(self.log_path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
        errors = [line for line in text.splitlines() if '"level": "error"' in line or line.startswith("Traceback")]
        return [line for line in errors if '"path": "/readyz"' not in line]  # our own polls before it is ready

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Clients(Loadgen):
    """bench/loadgen with idle WebSocket clients that check every seq and time every delivery."""

    @classmethod
    async def open(cls, server: Server, target: str, config: dict[str, Any]) -> Loadgen:
        base = f"ws://127.0.0.1:{server.port}/ws/research/"
        query = "?replay=none" if target == "broker" else ""
        clients = await cls.spawn({"base": base, "bases": [base], "query": query, **config})
        await clients.expect("warm")
        clients.send(cmd="open")
        ready = await clients.expect("ready", timeout=180)
        if ready["greeted"] != ready["clients"]:
            await clients.close()
            raise RuntimeError(f"only {ready['greeted']} of {ready['clients']} clients were greeted")
        return clients


def user_system_seconds(pid: int) -> tuple[float, float]:
    """utime and stime of a process, from /proc/<pid>/stat (bench/run.py's cpu_seconds is their sum)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def paced(port: int, sessions: list[str], rate: float, count: int) -> tuple[Published, list[float], float]:
    """`count` single-event publishes at `rate`/s, round-robin; what was published, each answer's time (ms), wall s."""
    published = Published()
    loop = asyncio.get_running_loop()
    pool: asyncio.Queue[Http] = asyncio.Queue()
    for _ in range(16):
        pool.put_nowait(await Http.connect(port))
    times: list[float] = []

    async def post(http: Http, session: str, i: int) -> None:
        try:
            sent = time.perf_counter()
            await published.post(http, session, [{"type": EVENT_TYPE, "i": i, "ts": now_ms()}])
            times.append(1000 * (time.perf_counter() - sent))
        finally:
            pool.put_nowait(http)

    start = loop.time() + 0.05
    tasks = []
    for i in range(count):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        http = await pool.get()
        tasks.append(asyncio.create_task(post(http, sessions[i % len(sessions)], i)))
    await asyncio.gather(*tasks)
    wall = loop.time() - start
    while not pool.empty():
        pool.get_nowait().close()
    return published, times, wall


async def one_round(server: Server, args: argparse.Namespace, n: int) -> dict[str, float | None]:
    # fresh names every run: a Redis backend keeps sessions (and their seqs) from the run before
    sessions = [f"cost-{os.getpid()}-r{n}-s{i}" for i in range(args.sessions)]
    per_session = args.clients // args.sessions
    clients = None
    if per_session:
        # the first half second of events is not counted in the latency (as make bench's warm-up)
        config = {"sessions": sessions, "perSession": per_session, "latency": True, "warmupEvents": int(args.rate / 2)}
        clients = await Clients.open(server, args.target, config)
    spy = None
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        spy = record_py_spy(server.pid, os.path.join(args.profile, f"{args.target}-publish-r{n}.txt"))
    try:
        await asyncio.sleep(0.5)  # the clients' greetings are written and the server is idle again
        before = user_system_seconds(server.pid)
        published, times, wall = await paced(server.port, sessions, args.rate, args.publishes)
        result: dict[str, float | None] = {"p50 latency ms": None, "p99 latency ms": None}
        if clients is not None:
            clients.send(cmd="finish", maxSeq=published.max_seq())
            res = await clients.expect("results", timeout=120)
            after = user_system_seconds(server.pid)
            if res["lost"] or res["dup"] or res["reorder"] or res["errors"]:
                raise RuntimeError(
                    f"round {n}: lost {res['lost']}, duplicated {res['dup']}, out of order {res['reorder']}, "
                    f"client errors {res['errors']}"
                )
            result["p50 latency ms"] = res["latency"]["p50"]
            result["p99 latency ms"] = res["latency"]["p99"]
        else:
            after = user_system_seconds(server.pid)
    finally:
        if spy is not None:
            stop_py_spy(spy)
        if clients is not None:
            await clients.close()
    if published.problems():
        raise RuntimeError(f"round {n}: {published.problems()}")
    user, system = (1000 * (a - b) / args.publishes for a, b in zip(after, before, strict=True))
    result["CPU ms per publish"] = user + system
    result["of it user"] = user
    result["of it system"] = system
    result["p50 answer ms"] = percentile(times, 0.5)
    result["p99 answer ms"] = percentile(times, 0.99)
    result["rate achieved"] = args.publishes / wall
    return result


async def main_async(args: argparse.Namespace) -> int:
    logdir = tempfile.mkdtemp(prefix="actor-broker-publish-cost-")
    env = dict(item.split("=", 1) for item in args.env)
    server = Server(args.target, logdir, env)
    rounds = []
    try:
        await server.ready()
        # a warm-up: every code path of a publish has run before anything is measured
        warm = await Http.connect(server.port)
        for i in range(50):
            await warm.publish("cost-warm", [{"type": EVENT_TYPE, "i": i, "ts": now_ms()}])
        warm.close()
        for n in range(1, args.rounds + 1):
            r = await one_round(server, args, n)
            rounds.append(r)
            print(f"round {n}: " + ", ".join(f"{k} {fmt(v)}" for k, v in r.items()), flush=True)
    finally:
        server.stop()
    print(
        f"{LABEL[args.target]}, {args.publishes} publishes at {args.rate:g}/s, {args.clients} clients "
        f"over {args.sessions} sessions; median of {len(rounds)} rounds:"
    )
    for key in rounds[0]:
        values = [v for r in rounds if (v := r[key]) is not None]
        print(f"  {key}: {fmt(statistics.median(values)) if values else '-'}")
    if args.profile:
        for entry in sorted(os.listdir(args.profile)):
            print(summarize_profile(os.path.join(args.profile, entry), top=25))
    errors = server.logged_errors()
    if errors:
        print(f"the server logged errors (see {server.log_path}): {errors[:3]}")
        return 1
    return 0


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--publishes", type=int, default=2500, help="publishes per round (default %(default)s)")
    parser.add_argument("--rate", type=float, default=500, help="publishes a second (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported (default %(default)s)")
    parser.add_argument("--clients", type=int, default=1000, help="idle WebSocket clients (default %(default)s)")
    parser.add_argument("--sessions", type=int, default=100, help="sessions published to (default %(default)s)")
    parser.add_argument("--target", choices=tuple(LABEL), default="broker", help="server (default %(default)s)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="server environment")
    parser.add_argument("--profile", metavar="DIR", help="record the server with py-spy into DIR (raw stacks)")
    args = parser.parse_args(argv)
    if args.clients and not os.path.isdir(os.path.join(LOADGEN_DIR, "node_modules", "ws")):
        print(f"publish_cost: clients need `npm ci` in {LOADGEN_DIR} (or --clients 0)", file=sys.stderr)
        return 2
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the clients and the server inherit it
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
