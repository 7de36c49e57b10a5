"""Fan-out benchmark: actor-broker (in memory, on Redis, two nodes on one Redis) against its peers, in one run.

    make bench                                          # every scenario, every row (see bench/README.md)
    python bench/run.py --scenario fanout --rounds 1    # one scenario, one round
    python bench/run.py --scenario latency --row broker --row baseline   # a subset of the rows
    python bench/run.py --scenario fanout --profile     # + py-spy of actor-broker

Rows: actor-broker in memory (`python -m broker serve`), actor-broker on a
Redis the bench starts itself, two actor-broker nodes on one Redis (clients
and publishers spread over both), and three peers: bench/baseline.py (the
bare Tornado fan-out every ratio is taken against), bench/peer_fastapi.py
(FastAPI on uvicorn[standard], built as the seed systems are) and
bench/loadgen/peer_ws.js (bare Node `ws`). Every server is started fresh for
every scenario on a free port and driven by the same load generator
(bench/loadgen, Node + `ws`), the rows taking turns round after round
(A B C ... A B C ...). Prints the medians with their ratios to bare Tornado
and to the best peer, the CPU share of every process, the issues' criteria,
and exits 1 if any message was lost, duplicated or reordered, a publish
failed, a client was refused or closed by the server, a server logged an
error, or connections outlived their clients.

See bench/README.md for what each scenario and measure is.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOADGEN_DIR = os.path.join(ROOT, "bench", "loadgen")
LOADGEN = os.path.join(LOADGEN_DIR, "loadgen.js")
BASELINE = os.path.join(ROOT, "bench", "baseline.py")
PEER_FASTAPI = os.path.join(ROOT, "bench", "peer_fastapi.py")
PEER_WS = os.path.join(LOADGEN_DIR, "peer_ws.js")
CLK_TCK = os.sysconf("SC_CLK_TCK")
NODE = os.environ.get("NODE", shutil.which("node") or "node")
REDIS_SERVER = os.environ.get("REDIS_SERVER", shutil.which("redis-server") or "redis-server")


@dataclass(frozen=True)
class Row:
    """One line of the table: a server (or a cluster of them) the scenarios are run against."""

    name: str  # as given to --row
    label: str  # as printed
    kind: str  # "broker", "baseline", "fastapi" or "node": which program
    backend: str = "memory"  # "redis": the bench starts a redis-server for it
    nodes: int = 1  # daemons on one Redis; clients and publishers are spread over them


ROWS = {
    r.name: r
    for r in (
        Row("broker", "actor-broker", "broker"),
        Row("redis", "AB on Redis", "broker", backend="redis"),
        Row("redis2", "AB 2 nodes", "broker", backend="redis", nodes=2),
        Row("baseline", "bare Tornado", "baseline"),
        Row("fastapi", "FastAPI", "fastapi"),
        Row("node", "Node ws", "node"),
    )
}
BASELINE_ROW = "baseline"  # every ratio is to this row of the same run
PEERS = ("baseline", "fastapi", "node")  # "best peer" is the best of these, per measure
BROKER_ROWS = ("broker", "redis", "redis2")
EVENT_TYPE = "bench.tick"  # any valid type; not task_progress, which is throttled
SCENARIOS = ("fanout", "latency", "latency-ws", "idle", "idle-19k", "churn")
DEFAULT_ROUNDS = {"fanout": 3, "latency": 5, "latency-ws": 5, "idle": 3, "idle-19k": 3, "churn": 1}
#: The rows each scenario runs when --row does not say. /ws/publish is actor-broker's
#: alone; a 19 000-connection round takes one to two minutes per row, so by default
#: it runs the two rows issue 14 compares (--row adds the others); churn is a leak
#: check of actor-broker, with bare Tornado for scale.
SCENARIO_ROWS = {
    "fanout": tuple(ROWS),
    "latency": tuple(ROWS),
    "latency-ws": BROKER_ROWS,
    "idle": tuple(ROWS),
    "idle-19k": ("broker", "baseline"),
    "churn": (*BROKER_ROWS, "baseline"),
}

# -- the shape of each scenario (the issues' numbers) ---------------------------

FANOUT = {"sessions": 10, "clients": 1000, "events_per_session": 1000, "batch": 50, "http_connections": 4}
LATENCY = {"sessions": 100, "clients": 1000, "deliveries_per_s": 5000, "seconds": 5.0, "warmup_s": 1.0}
IDLE = {"sessions": 50, "clients": 5000, "warm_clients": 10}
#: issue 14: this machine's open-file limit is 20 000; the load generator, the
#: server and the bench each hold their own descriptors, so 19 000 fit in each.
IDLE_19K = {"sessions": 190, "clients": 19000, "warm_clients": 10}
CHURN = {
    "sessions": 20,
    "stable_per_session": 10,
    "churners": 200,  # connections coming and going at any moment
    "life_ms": (50, 600),  # each stays this long once greeted, then half close, half drop the TCP connection
    "prefill": 150,  # events per session before churning: histories (buffer_size 100) are full
    "per_phase": 2000,  # connections opened and closed per phase
    "phases": 4,
    "warmup_phases": 1,  # RSS must not grow phase after phase once these are done
    "events_per_s": 200,
}
#: Broker settings per scenario. In churn, the dedup window (300 s by default)
#: would keep every event id published during the run, a growth that is bounded
#: by design and is not what churn looks for: memory that connections leave behind.
SERVER_ENV = {"churn": {"BROKER_DEDUP_WINDOW": "1"}}
#: RSS growth per 1 000 churned connections, after the warm-up phases, that
#: counts as a leak: 200 bytes a connection (its own footprint is 15-25 KiB).
CHURN_GROWTH_LIMIT_KIB = 200

#: Which way is better, per measure: the best peer is the one with the highest
#: (or lowest) median. Measures not named here get no best-peer ratio.
HIGHER_IS_BETTER = {"deliveries/s", "deliveries/s (paced)", "handshakes/s", "connections/s"}
LOWER_IS_BETTER = {
    "server CPU µs per delivery",
    "server CPU ms per publish",
    "server CPU µs per handshake",
    "p50 ms",
    "p99 ms",
    "max ms",
    "KiB per connection",
    "RSS MiB, all open",
    "publish done s",
    "last delivery s",
    "RSS growth KiB per 1000 conns",
}


# -- processes -------------------------------------------------------------------


def raise_nofile() -> int:
    """As many descriptors as the hard limit allows (19 000 connections need 19 000 on each side).

    The servers and the load generator are children of this process and inherit it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def machine_busy_seconds() -> float:
    """CPU time every process on the machine has used (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


class CpuWindow:
    """CPU used by groups of processes (and by this one) over a wall-clock window, as % of one core.

    Each group (`server`: every node of a row; `redis`; `loadgen`) is summed
    over its processes. `other` is what every other process on the machine
    used meanwhile: on a shared machine, a reason for numbers to move between runs.
    """

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.pids = pids
        self.start = {name: self._used(name) for name in pids}
        self.self_start = sum(os.times()[:2])
        self.machine_start = machine_busy_seconds()
        self.t0 = time.monotonic()

    def _used(self, name: str) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids[name])

    def stop(self) -> dict[str, float]:
        """% of one core used by each, over the window; `seconds` holds the CPU seconds."""
        wall = max(time.monotonic() - self.t0, 1e-9)
        used = {name: self._used(name) - self.start[name] for name in self.pids}
        used["publisher"] = sum(os.times()[:2]) - self.self_start
        used["other"] = max(0.0, machine_busy_seconds() - self.machine_start - sum(used.values()))
        self.seconds = used
        return {name: 100 * seconds / wall for name, seconds in used.items()}


def broker_setting_names() -> set[str]:
    """The settings this checkout's daemon knows (an unknown BROKER_ key stops it with exit 2)."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)  # this checkout's, as `python -m broker` run in ROOT imports it
    try:
        from broker.config import Settings
    except Exception:  # an older or broken checkout: set nothing optional
        return set()
    return {f.name for f in dataclasses.fields(Settings)}


class Options:
    """Run-wide choices from the command line that the servers need."""

    broker_loop = "asyncio"  # BROKER_EVENT_LOOP for every actor-broker row, where the daemon knows it
    inject_loss = 0  # bare Tornado skips every Nth write (checks that the bench fails on a loss)


class Server:
    """One server process on a free port: an actor-broker daemon or one of the peers."""

    def __init__(self, kind: str, logdir: str, env: dict[str, str] | None = None, tag: str = "") -> None:
        self.kind = kind
        self.env = dict(env or {})
        self.port = free_port()
        self.tag = tag or kind
        self.log_path = os.path.join(logdir, f"{self.tag}-{self.port}.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.http: Http | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        port = str(self.port)
        if self.kind == "broker":
            return [sys.executable, "-m", "broker", "serve", "--port", port]
        if self.kind == "baseline":
            drop = ["--drop-every", str(Options.inject_loss)] if Options.inject_loss else []
            return [sys.executable, BASELINE, "--port", port, *drop]
        if self.kind == "fastapi":
            return [sys.executable, PEER_FASTAPI, "--port", port]
        if self.kind == "node":
            return [NODE, PEER_WS, "--port", port]
        raise ValueError(self.kind)

    async def start(self) -> None:
        env = dict(os.environ)
        if self.kind == "broker":
            # The peers log nothing per request or connection; neither should the broker here.
            env.setdefault("BROKER_LOG_LEVEL", "warning")
            env.setdefault("BROKER_LOG_FORMAT", "json")
            if "event_loop" in broker_setting_names():
                env.setdefault("BROKER_EVENT_LOOP", Options.broker_loop)
        env.update(self.env)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            self.check_alive()
            try:
                self.http = await Http.connect(self.port)
                status, _ = await self.http.request("GET", "/healthz")
                if status == 200:
                    return
            except (OSError, asyncio.IncompleteReadError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.tag} did not answer /healthz within 30 s; see {self.log_path}")
            await asyncio.sleep(0.1)

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.tag} exited with {self.proc.returncode}; see {self.log_path}")

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def log_position(self) -> int:
        return os.path.getsize(self.log_path)

    def logged_errors(self, since: int) -> list[str]:
        """Lines the server logged at error level (or tracebacks) after `since`."""
        with open(self.log_path, "rb") as f:
            f.seek(since)
            text = f.read().decode("utf-8", "replace")
        return [
            line
            for line in text.splitlines()
            if '"level": "error"' in line or '"level": "critical"' in line or line.startswith(("ERROR", "Traceback"))
        ]

    async def get(self, path: str) -> tuple[int, bytes]:
        """GET on the kept connection, opening a new one if the server closed it meanwhile."""
        if self.http is not None:
            try:
                return await self.http.request("GET", path)
            except (ConnectionError, asyncio.IncompleteReadError):
                self.http.close()
        self.http = await Http.connect(self.port)
        return await self.http.request("GET", path)

    async def counts(self) -> dict[str, int]:
        """Live connections and sessions as the server counts them (actors, for the broker)."""
        if self.kind != "broker":
            _, body = await self.get("/stats")
            stats = json.loads(body)
            return {"connections": stats["active_connections"], "sessions": stats["active_sessions"]}
        _, body = await self.get("/api/websocket/stats")
        stats = json.loads(body)
        result = {"connections": stats["active_connections"], "sessions": stats["active_sessions"]}
        status, body = await self.get("/metrics")
        if status == 200:  # broker_actors{kind="..."}, where /metrics is served
            for kind, value in re.findall(rb'^broker_actors\{kind="(\w+)"\} ([0-9.e+]+)$', body, re.MULTILINE):
                result[f"{kind.decode()}_actors"] = int(float(value))
        return result

    async def stop(self) -> None:
        if self.http is not None:
            self.http.close()
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        for _ in range(100):
            if self.proc.poll() is not None:
                return
            await asyncio.sleep(0.1)
        self.proc.kill()
        self.proc.wait()


class RedisProcess:
    """A redis-server of the bench's own: a free port, its own directory, no persistence, stopped at the end."""

    def __init__(self, logdir: str) -> None:
        if not shutil.which(REDIS_SERVER):
            raise RuntimeError(
                f"{REDIS_SERVER} not found: the Redis rows need redis-server (apt-get install redis-server), "
                "or leave them out with --row"
            )
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix=f"redis-{self.port}-", dir=logdir)
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: Any = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        import redis  # the daemon's own dependency, in the same venv

        args = [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", self.dir,
            "--save", "",
            "--appendonly", "no",
            "--maxmemory-policy", "noeviction",
            "--logfile", os.path.join(self.dir, "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10)
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}; see {self.dir}/redis.log")
            with contextlib.suppress(redis.RedisError):
                if self.client.ping():
                    return
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer PING within 10 s")
            await asyncio.sleep(0.05)

    def calls(self) -> Counter[str]:
        """Commands Redis has run since it started, by name (INFO commandstats), the INFO calls left out;
        and under `USEC + name` the microseconds Redis spent in each (a script's own commands included)."""
        stats = self.client.info("commandstats")
        calls: Counter[str] = Counter()
        for key, value in stats.items():
            name = key.removeprefix("cmdstat_")
            if name != "info":
                calls[name] = int(value["calls"])
                calls[USEC + name] = int(value["usec"])
        return calls

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class Deployment:
    """What one row runs: one server, or nodes on a Redis of their own (started first, stopped last)."""

    def __init__(self, row: Row, logdir: str, env: dict[str, str] | None = None) -> None:
        self.row = row
        self.logdir = logdir
        env = dict(env or {}) if row.kind == "broker" else {}
        tags = [f"{row.name}-{i}" for i in range(row.nodes)] if row.nodes > 1 else [row.name]
        self.servers = [Server(row.kind, logdir, env, tag=tag) for tag in tags]
        self.redis: RedisProcess | None = None

    async def start(self) -> None:
        if self.row.backend == "redis":
            self.redis = RedisProcess(self.logdir)
            await self.redis.start()
            for i, server in enumerate(self.servers):
                server.env.update(
                    BROKER_BACKEND="redis", BROKER_REDIS_URL=self.redis.url, BROKER_NODE_ID=f"bench-{self.row.name}-{i}"
                )
        for server in self.servers:
            await server.start()

    async def stop(self) -> None:
        for server in self.servers:
            await server.stop()
        if self.redis is not None:
            self.redis.stop()

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    @property
    def ws_bases(self) -> list[str]:
        return [f"ws://127.0.0.1:{s.port}/ws/research/" for s in self.servers]

    @property
    def ws_query(self) -> str:
        # live messages only: clients are connected before anything is published
        return "?replay=none" if self.row.kind == "broker" else ""

    @property
    def is_broker(self) -> bool:
        return self.row.kind == "broker"

    def cpu_pids(self, loadgen: int) -> dict[str, list[int]]:
        pids = {"server": [s.pid for s in self.servers], "loadgen": [loadgen]}
        if self.redis is not None:
            pids["redis"] = [self.redis.pid]
        return pids

    def redis_calls(self) -> Counter[str] | None:
        return self.redis.calls() if self.redis is not None else None

    def check_alive(self) -> None:
        for server in self.servers:
            server.check_alive()
        if self.redis is not None and self.redis.proc is not None and self.redis.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.redis.proc.returncode}")

    def rss_kib(self) -> int:
        """Every node's RSS, summed (Redis's is not the daemons' and is left out)."""
        return sum(s.rss_kib() for s in self.servers)

    def log_positions(self) -> list[int]:
        return [s.log_position() for s in self.servers]

    def logged_errors(self, since: list[int]) -> list[str]:
        return [line for s, at in zip(self.servers, since, strict=True) for line in s.logged_errors(at)]

    async def counts(self) -> dict[str, int]:
        """Connections, sessions and actors counted by each node, summed over the nodes."""
        total: Counter[str] = Counter()
        for server in self.servers:
            total.update(await server.counts())
        return dict(total)


class PublishError(RuntimeError):
    """The server did not answer a publish with 202 and one seq per event."""


class Http:
    """A minimal keep-alive HTTP/1.1 client: cheap enough that publishing is never the bottleneck."""

    def __init__(self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.port = port
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> Http:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(port, reader, writer)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
        if method == "POST":
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("server closed the connection")
        status = int(status_line.split()[1])
        length = None
        chunked = False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        if chunked:
            parts = []
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readline()
                    break
                parts.append(await self.reader.readexactly(size))
                await self.reader.readline()
            return status, b"".join(parts)
        return status, await self.reader.readexactly(length or 0)

    async def publish(self, session: str, events: list[dict[str, Any]]) -> list[int]:
        status, body = await self.request("POST", f"/api/sessions/{session}/events", json.dumps(events).encode())
        if status != 202:
            raise PublishError(f"publish to {session}: HTTP {status} {body[:200]!r}")
        answer = json.loads(body)
        seqs = answer["seq"]
        if answer["accepted"] != len(events) or len(seqs) != len(events) or None in seqs:
            raise PublishError(f"publish to {session}: unexpected answer {answer!r}")
        return seqs

    def close(self) -> None:
        self.writer.close()


class Loadgen:
    """The Node load generator, one process per round: JSON lines both ways."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, dep: Deployment, config: dict[str, Any]) -> Loadgen:
        # several bases: client i connects to node i % n (a session's clients are on every node)
        return await cls.spawn({"bases": dep.ws_bases, "query": dep.ws_query, **config})

    @classmethod
    async def spawn(cls, config: dict[str, Any]) -> Loadgen:
        """The process, given its whole config (bench/publish_cost.py builds its own)."""
        proc = await asyncio.create_subprocess_exec(
            NODE,
            LOADGEN,
            json.dumps(config),
            cwd=LOADGEN_DIR,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=16 * 1024 * 1024,
        )
        return cls(proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")

    async def expect(self, event: str, timeout: float = 120) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
            if not line:
                raise RuntimeError(f"load generator exited (code {await self.proc.wait()}) waiting for {event!r}")
            message = json.loads(line)
            if message.get("event") == "fatal":
                raise RuntimeError(f"load generator failed: {message['error']}")
            if message.get("event") == event:
                return message

    async def close(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                self.send(cmd="exit")
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


# -- publishing ------------------------------------------------------------------


@contextlib.contextmanager
def collections_held() -> Iterator[None]:
    """Hold off this process's garbage collector while it publishes a timed scenario.

    The publisher stamps each event's `ts` just before it sends it; a
    collection between the two is counted as the server's latency. A full
    collection of this process (its heap holds every round's records) took
    15 ms here, and fell inside a round: one such pause moved that round's
    p99 by 2 ms or more. Holding it off for a round costs nothing here: what a
    publish allocates is freed by reference counting. (The load generator,
    Node, keeps its own collector.)
    """
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def now_ms() -> float:
    return time.time() * 1000


class Published:
    """The seqs the server assigned, per session: they must be 1..n with no holes."""

    def __init__(self) -> None:
        self.seqs: dict[str, list[int]] = {}
        self.events = 0
        self.requests = 0  # POSTs (or /ws/publish frames) answered with seqs
        self.failures: list[str] = []

    async def post(self, http: Http, session: str, events: list[dict[str, Any]]) -> None:
        """Publish, and keep a failure (an error answer) instead of raising: the run goes on."""
        try:
            self.add(session, await http.publish(session, events))
        except PublishError as exc:
            self.failures.append(str(exc))

    def add(self, session: str, seqs: list[int], requests: int = 1) -> None:
        self.seqs.setdefault(session, []).extend(seqs)
        self.events += len(seqs)
        self.requests += requests

    def max_seq(self) -> dict[str, int]:
        return {s: max(v) for s, v in self.seqs.items()}

    def merge(self, other: Published) -> None:
        for session, seqs in other.seqs.items():
            self.add(session, seqs, requests=0)
        self.requests += other.requests
        self.failures.extend(other.failures)

    def problems(self) -> list[str]:
        bad = []
        if self.failures:
            bad.append(f"{len(self.failures)} publishes failed, e.g. {self.failures[0]}")
            return bad  # seqs taken by a failed publish are unknown to the publisher
        for session, seqs in self.seqs.items():
            if sorted(seqs) != list(range(1, len(seqs) + 1)):
                bad.append(f"{session}: publisher was answered seqs that are not 1..{len(seqs)}")
        return bad


async def publish_batches(
    ports: list[int], sessions: list[str], per_session: int, batch: int, connections: int
) -> Published:
    """Every session gets `per_session` events in batches of `batch`, over a few keep-alive connections.

    Each connection carries a fixed share of the sessions (so each session's
    batches go out in order) and posts as fast as the server answers.
    Connection w goes to node w % n: with two nodes, publishers on either.
    """
    published = Published()
    counter = [0]

    async def worker(port: int, mine: list[str]) -> None:
        http = await Http.connect(port)
        try:
            for start in range(0, per_session, batch):
                for session in mine:
                    ts = now_ms()
                    events = []
                    for _ in range(min(batch, per_session - start)):
                        events.append({"type": EVENT_TYPE, "i": counter[0], "ts": ts})
                        counter[0] += 1
                    await published.post(http, session, events)
        finally:
            http.close()

    shares = [sessions[w::connections] for w in range(connections)]
    await asyncio.gather(*(worker(ports[w % len(ports)], share) for w, share in enumerate(shares) if share))
    return published


async def publish_paced(
    ports: list[int],
    sessions: list[str],
    rate: float,
    seconds: float | None,
    connections: int = 16,
    stop: asyncio.Event | None = None,
) -> tuple[Published, dict[str, float]]:
    """One event per POST, `rate` a second, round-robin over the sessions, each stamped `ts` as it is sent.

    Runs for `seconds`, or until `stop` is set. The keep-alive connections are
    spread over the nodes. Returns what was published and how well the pace
    held (achieved rate, worst lag).
    """
    published = Published()
    loop = asyncio.get_running_loop()
    pool: asyncio.Queue[Http] = asyncio.Queue()
    for k in range(connections):
        pool.put_nowait(await Http.connect(ports[k % len(ports)]))
    total = round(rate * seconds) if seconds is not None else None
    start = loop.time() + 0.05
    worst_lag = 0.0
    tasks = []

    async def post(http: Http, session: str, i: int) -> None:
        try:
            await published.post(http, session, [{"type": EVENT_TYPE, "i": i, "ts": now_ms()}])
        finally:
            pool.put_nowait(http)

    i = 0
    while (total is None or i < total) and not (stop is not None and stop.is_set()):
        due = start + i / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        http = await pool.get()
        worst_lag = max(worst_lag, loop.time() - due)
        tasks.append(asyncio.create_task(post(http, sessions[i % len(sessions)], i)))
        i += 1
    await asyncio.gather(*tasks)
    elapsed = loop.time() - start
    while not pool.empty():
        pool.get_nowait().close()
    return published, {"achieved_rate": i / elapsed, "worst_lag_ms": worst_lag * 1000}


async def ws_publish_served(port: int) -> str | None:
    """None when the server takes a `/ws/publish` handshake; otherwise why not (e.g. HTTP 404)."""
    from tornado.httpclient import HTTPClientError
    from tornado.websocket import websocket_connect

    try:
        conn = await asyncio.wait_for(websocket_connect(f"ws://127.0.0.1:{port}/ws/publish"), 10)
    except HTTPClientError as exc:
        return f"the /ws/publish handshake was answered HTTP {exc.code}"
    except (OSError, TimeoutError) as exc:
        return f"the /ws/publish handshake failed: {exc!r}"
    conn.close()
    return None


async def publish_paced_ws(
    ports: list[int], sessions: list[str], rate: float, seconds: float
) -> tuple[Published, dict[str, float]]:
    """publish_paced over `/ws/publish` (PROTOCOL.md section 5): one frame per event, pipelined.

    One publisher connection per node; frame i is `{"ref": i, "events": [event]}`
    with the event's `session_id` in it (as on POST /api/events), sent on its
    pace whatever is still unanswered. Answers come in the order of the
    frames: each must be `accepted` with the frame's `ref` and one seq; an
    `error` answer is a failed publish.
    """
    from tornado.websocket import websocket_connect

    published = Published()
    loop = asyncio.get_running_loop()
    conns = [await websocket_connect(f"ws://127.0.0.1:{port}/ws/publish") for port in ports]
    pending: list[deque[tuple[int, str]]] = [deque() for _ in conns]
    drained = asyncio.Event()
    sent_all = False

    async def read_answers(k: int) -> None:
        conn, waiting = conns[k], pending[k]
        while True:
            text = await conn.read_message()
            if text is None:
                if waiting:
                    published.failures.append(f"/ws/publish closed with {len(waiting)} frames unanswered")
                return
            answer = json.loads(text)
            if not waiting:
                published.failures.append(f"/ws/publish answer to no frame: {str(text)[:200]}")
                continue
            ref, session = waiting.popleft()
            seqs = answer.get("seq") or []
            if answer.get("type") != "accepted" or answer.get("ref") != ref or len(seqs) != 1 or None in seqs:
                published.failures.append(f"/ws/publish frame {ref} to {session}: {str(text)[:200]}")
            else:
                published.add(session, seqs)
            if sent_all and not any(pending):
                drained.set()

    readers = [asyncio.create_task(read_answers(k)) for k in range(len(conns))]
    total = round(rate * seconds)
    start = loop.time() + 0.05
    worst_lag = 0.0
    try:
        for i in range(total):
            due = start + i / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            worst_lag = max(worst_lag, loop.time() - due)
            session = sessions[i % len(sessions)]
            k = i % len(conns)
            pending[k].append((i, session))
            event = {"type": EVENT_TYPE, "session_id": session, "i": i, "ts": now_ms()}
            await conns[k].write_message(json.dumps({"ref": i, "events": [event]}))
        elapsed = loop.time() - start
        sent_all = True
        if any(pending):
            try:
                await asyncio.wait_for(drained.wait(), 30)
            except TimeoutError:
                published.failures.append(f"{sum(map(len, pending))} /ws/publish frames unanswered after 30 s")
    finally:
        for conn in conns:
            conn.close()
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    return published, {"achieved_rate": total / elapsed, "worst_lag_ms": worst_lag * 1000}


# -- results ---------------------------------------------------------------------


@dataclass
class Round:
    """One round of one scenario against one row."""

    metrics: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    lost: int = 0
    dup: int = 0
    reorder: int = 0
    errors: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)


async def results_of(lg: Loadgen, published: Published, window: CpuWindow, r: Round, timeout: float) -> dict[str, Any]:
    """Publishing is over: tell the load generator, take its results, close the CPU window."""
    lg.send(cmd="finish", maxSeq=published.max_seq())
    res = await lg.expect("results", timeout=timeout)
    r.cpu = window.stop()
    return res


def check_loadgen_results(r: Round, res: dict[str, Any], published: Published) -> None:
    r.lost += res["lost"]
    r.dup += res["dup"]
    r.reorder += res["reorder"]
    if res.get("lostBySession"):
        r.errors.append(f"lost by session (up to 5): {res['lostBySession']}")
    if res["errors"]:
        r.errors.append(f"{res['errors']} client errors, e.g. {res['errorSamples'][:3]}")
    if res["greeted"] != res["clients"]:
        r.errors.append(f"only {res['greeted']} of {res['clients']} clients were greeted")
    r.errors.extend(published.problems())
    if res.get("unpublishedSeqs"):
        r.notes["seqs the publisher was not told about"] = res["unpublishedSeqs"]
    r.notes["avg_message_bytes"] = res["bytes"] / max(res["received"], 1)


def cpu_metrics(r: Round, window: CpuWindow, deliveries: int, publishes: int | None = None) -> None:
    """Server CPU per delivery (and per publish), from the window's CPU seconds; Redis's own beside it."""
    server = window.seconds["server"]
    r.metrics["server CPU µs per delivery"] = 1e6 * server / max(deliveries, 1)
    if publishes is not None:
        r.metrics["server CPU ms per publish"] = 1e3 * server / max(publishes, 1)
    if "redis" in window.seconds:
        r.metrics["Redis CPU µs per delivery"] = 1e6 * window.seconds["redis"] / max(deliveries, 1)
        if publishes is not None:
            r.metrics["Redis CPU ms per publish"] = 1e3 * window.seconds["redis"] / max(publishes, 1)


#: The prefix of RedisServer.calls()'s microsecond entries.
USEC = "usec:"


def redis_cost(r: Round, before: Counter[str] | None, after: Counter[str] | None, published: Published) -> None:
    """What publishing cost Redis over the window (INFO commandstats), per publish request.

    `Redis EVALSHA per publish` is the round trips of the publish path (one
    script call per session and batch, broker/cluster/store.py); `Redis
    commands per publish` is every command Redis ran, those inside the
    scripts (commandstats counts them too) and the nodes' background work
    (heartbeat, canary, stats sync) included. The breakdown by command is kept.
    """
    if before is None or after is None:
        return
    delta = after - before
    usec = Counter({k.removeprefix(USEC): v for k, v in delta.items() if k.startswith(USEC)})
    delta = Counter({k: v for k, v in delta.items() if not k.startswith(USEC)})
    requests = max(published.requests, 1)
    r.metrics["Redis EVALSHA per publish"] = (delta["evalsha"] + delta["eval"]) / requests
    r.metrics["Redis commands per publish"] = sum(delta.values()) / requests
    scripts = delta["evalsha"] + delta["eval"]
    if scripts:  # the time Redis spends running one script call, its commands included (the rest is I/O)
        r.metrics["Redis µs per script call"] = (usec["evalsha"] + usec["eval"]) / scripts
    r.notes["redis commands per publish, by command"] = {k: v / requests for k, v in delta.most_common()}
    r.notes["redis calls"] = dict(delta)
    r.notes["publish requests"] = published.requests
    r.notes["events published"] = published.events


async def open_clients(dep: Deployment, config: dict[str, Any]) -> Loadgen:
    lg = await Loadgen.start(dep, config)
    await lg.expect("warm")
    lg.send(cmd="open")
    ready = await lg.expect("ready", timeout=180)
    if ready["greeted"] != ready["clients"]:
        await lg.close()
        raise RuntimeError(f"{dep.row.label}: only {ready['greeted']} of {ready['clients']} clients were greeted")
    return lg


async def round_fanout(dep: Deployment, n: int, profile_dir: str | None) -> Round:
    p = FANOUT
    sessions = [f"fan-r{n}-s{i}" for i in range(p["sessions"])]
    lg = await open_clients(dep, {"sessions": sessions, "perSession": p["clients"] // p["sessions"]})
    r = Round()
    try:
        with profiled(dep, profile_dir, f"fanout-r{n}"):
            await asyncio.sleep(0.5)
            window = CpuWindow(dep.cpu_pids(lg.pid))
            calls = dep.redis_calls()
            t0 = now_ms()
            published = await publish_batches(
                dep.ports, sessions, p["events_per_session"], p["batch"], p["http_connections"]
            )
            t_published = now_ms()
            res = await results_of(lg, published, window, r, timeout=600)
            redis_cost(r, calls, dep.redis_calls(), published)
    finally:
        await lg.close()
    check_loadgen_results(r, res, published)
    elapsed = max((res["lastRecv"] - t0) / 1000, 1e-3)
    r.metrics["deliveries/s"] = res["distinct"] / elapsed
    cpu_metrics(r, window, res["distinct"])
    r.metrics["publish done s"] = (t_published - t0) / 1000
    r.metrics["last delivery s"] = elapsed
    return r


async def round_latency(dep: Deployment, n: int, profile_dir: str | None, over_ws: bool = False) -> Round:
    """Paced single-event publishes, over HTTP (one POST each) or over /ws/publish (one frame each)."""
    p = LATENCY
    name = "latency-ws" if over_ws else "latency"
    sessions = [f"{name}-r{n}-s{i}" for i in range(p["sessions"])]
    per_session = p["clients"] // p["sessions"]
    event_rate = p["deliveries_per_s"] / per_session
    lg = await open_clients(
        dep,
        {
            "sessions": sessions,
            "perSession": per_session,
            "latency": True,
            "warmupEvents": round(event_rate * p["warmup_s"]),
        },
    )
    r = Round()
    publish = publish_paced_ws if over_ws else publish_paced
    try:
        with profiled(dep, profile_dir, f"{name}-r{n}"):
            await asyncio.sleep(0.5)
            window = CpuWindow(dep.cpu_pids(lg.pid))
            calls = dep.redis_calls()
            with collections_held():
                published, pace = await publish(dep.ports, sessions, event_rate, p["warmup_s"] + p["seconds"])
            res = await results_of(lg, published, window, r, timeout=120)
            redis_cost(r, calls, dep.redis_calls(), published)
    finally:
        await lg.close()
    check_loadgen_results(r, res, published)
    lat = res["latency"]
    r.metrics["p50 ms"] = lat["p50"]
    r.metrics["p99 ms"] = lat["p99"]
    r.metrics["max ms"] = lat["max"]
    r.metrics["deliveries/s (paced)"] = pace["achieved_rate"] * per_session
    cpu_metrics(r, window, res["distinct"], publishes=published.events)
    r.notes["worst publish lag ms"] = pace["worst_lag_ms"]
    r.notes["min latency ms"] = lat["min"]
    if lat["min"] is not None and lat["min"] < -1:
        r.errors.append(f"a message arrived {-lat['min']:.1f} ms before it was sent: the two clocks disagree")
    r.notes["latency samples"] = lat["n"]
    return r


async def round_idle(dep: Deployment, n: int, p: dict[str, int], name: str = "idle") -> Round:
    """`p["clients"]` idle connections on a fresh server: memory per connection, and how fast they connect."""
    sessions = [f"{name}-r{n}-s{i}" for i in range(p["sessions"])]
    lg = await Loadgen.start(
        dep,
        {
            "sessions": sessions,
            "perSession": p["clients"] // p["sessions"],
            "warm": {"session": f"{name}-r{n}-warm", "clients": p["warm_clients"]},
        },
    )
    r = Round()
    try:
        await lg.expect("warm")
        # a publish on every node, so every server has run each code path once before the first RSS reading
        for port in dep.ports:
            warm = await Http.connect(port)
            await warm.publish(f"{name}-r{n}-warm", [{"type": EVENT_TYPE, "i": -1, "ts": now_ms()}])
            warm.close()
        await asyncio.sleep(1.0)
        before = dep.rss_kib()
        connecting = CpuWindow(dep.cpu_pids(lg.pid))
        lg.send(cmd="open")
        ready = await lg.expect("ready", timeout=300)
        connect_cpu = connecting.stop()
        if ready["greeted"] != ready["clients"]:
            r.errors.append(f"only {ready['greeted']} of {ready['clients']} clients were greeted")
        await asyncio.sleep(2.0)
        after = dep.rss_kib()
        counts = await dep.counts()
        per_node = [(await server.counts())["connections"] for server in dep.servers]
        # now one event per session: each of the idle clients must get it exactly once
        window = CpuWindow(dep.cpu_pids(lg.pid))
        published = await publish_batches(dep.ports, sessions, 1, 1, 4)
        res = await results_of(lg, published, window, r, timeout=120)
    finally:
        await lg.close()
    check_loadgen_results(r, res, published)
    r.metrics["KiB per connection"] = (after - before) / p["clients"]
    r.metrics["RSS MiB, all open"] = after / 1024
    r.metrics["handshakes/s"] = ready["greeted"] / max(ready["connectMs"] / 1000, 1e-3)
    r.metrics["server CPU µs per handshake"] = 1e6 * connecting.seconds["server"] / max(ready["greeted"], 1)
    r.notes["connect ms"] = ready["connectMs"]
    r.notes["connect cpu %"] = connect_cpu
    r.notes["counts"] = counts
    if connect_cpu.get("loadgen", 0) > 80:
        r.notes["warning"] = "the load generator used more than 80% of a core while connecting"
    expected = p["clients"] + p["warm_clients"]
    if counts["connections"] != expected:
        r.errors.append(f"server counts {counts['connections']} connections, {expected} are open")
    r.notes["connections per node"] = per_node
    if len(per_node) > 1 and min(per_node) < 0.45 * expected:  # clients spread over every node
        r.errors.append(f"connections per node {per_node}: the clients are not spread over the nodes")
    return r


async def settle_counts(dep: Deployment, want_connections: int, timeout: float = 10) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        counts = await dep.counts()
        done = counts["connections"] == want_connections and counts.get("connection_actors", want_connections) == (
            want_connections
        )
        if done or time.monotonic() > deadline:
            return counts
        await asyncio.sleep(0.2)


async def round_churn(dep: Deployment, n: int) -> Round:
    p = CHURN
    sessions = [f"churn-r{n}-s{i}" for i in range(p["sessions"])]
    stable = p["sessions"] * p["stable_per_session"]
    lg = await open_clients(
        dep,
        {
            "sessions": sessions,
            "perSession": p["stable_per_session"],
            "churn": {
                "concurrency": p["churners"],
                "minMs": p["life_ms"][0],
                "maxMs": p["life_ms"][1],
                "sessions": sessions,
            },
        },
    )
    r = Round()
    published = Published()
    phases = []
    try:
        window = CpuWindow(dep.cpu_pids(lg.pid))
        # Full histories first, so that what grows afterwards is not the history filling up.
        published.merge(await publish_batches(dep.ports, sessions, p["prefill"], 50, 4))
        before = await settle_counts(dep, stable)
        await asyncio.sleep(1.0)
        rss_before = dep.rss_kib()
        for phase in range(1, p["phases"] + 1):
            stop = asyncio.Event()
            publisher = asyncio.create_task(
                publish_paced(dep.ports, sessions, p["events_per_s"], None, connections=4, stop=stop)
            )
            lg.send(cmd="churn", count=p["per_phase"])
            try:
                churned = await lg.expect("churned", timeout=120)
            finally:
                stop.set()
                part, _ = await publisher
            published.merge(part)
            counts = await settle_counts(dep, stable)
            await asyncio.sleep(1.0)
            phases.append({"phase": phase, "rss_kib": dep.rss_kib(), "counts": counts, "churn": churned})
        r.cpu = window.stop()
        lg.send(cmd="finish", maxSeq=published.max_seq())
        res = await lg.expect("results", timeout=60)
        lg.send(cmd="close_all")
        await lg.expect("closed", timeout=60)
        final = await settle_counts(dep, 0)
    finally:
        await lg.close()
    check_loadgen_results(r, res, published)
    churn = res["churn"]
    churn_ms = sum(ph["churn"]["ms"] for ph in phases)
    r.metrics["connections/s"] = churn["greeted"] / (churn_ms / 1000)
    # A leak grows RSS in every phase; the allocator reaching a new high-water mark
    # (more in flight at one moment, on a busy machine) is a step in one phase.
    # So: the median of the phases' growths, after the warm-up.
    warm = p["warmup_phases"]
    rss = [ph["rss_kib"] for ph in phases]
    growths = [rss[i] - rss[i - 1] for i in range(warm, len(rss))]
    per_1000 = statistics.median(growths) / (p["per_phase"] / 1000)
    r.metrics["RSS growth KiB per 1000 conns"] = per_1000
    # The issue's own terms: with the same clients open as before the churn,
    # actors, sessions and RSS are back within 10% of where they were.
    after = phases[-1]["counts"]
    r.metrics["RSS after churn / before"] = rss[-1] / rss_before
    r.metrics["connections left after close"] = final["connections"]
    if "connection_actors" in final:
        r.metrics["connection actors left"] = final["connection_actors"]
    r.notes["phases"] = phases
    r.notes["final counts"] = final
    r.notes["churner messages"] = churn["received"]
    if churn["lost"]:
        r.errors.append(
            f"{churn['lost']} of the lost messages were missed by churning clients, between their greeting "
            "and the moment they left"
        )
    for ph in phases:
        c = ph["counts"]
        if c["connections"] != stable or c.get("connection_actors", stable) != stable:
            r.errors.append(f"after churn phase {ph['phase']}: {c} with {stable} clients open")
    if final["connections"] or final.get("connection_actors"):
        r.errors.append(f"after every client closed: {final}")
    for key, was in before.items():
        if abs(after.get(key, was) - was) > 0.1 * was:
            r.errors.append(f"{key}: {was} before the churn, {after.get(key)} after it")
    if rss[-1] > 1.1 * rss_before:
        r.errors.append(f"RSS: {rss_before} KiB before the churn, {rss[-1]} KiB after it (more than 10% up)")
    if churn["greeted"] < churn["opened"] * 0.99:
        r.errors.append(f"only {churn['greeted']} of {churn['opened']} churning connections were greeted")
    if per_1000 > CHURN_GROWTH_LIMIT_KIB:
        r.errors.append(
            f"RSS grew {per_1000:.0f} KiB per 1000 churned connections in the median phase after {warm} warm-up "
            f"(limit {CHURN_GROWTH_LIMIT_KIB}): RSS after each phase "
            + ", ".join(str(ph["rss_kib"]) for ph in phases)
            + " KiB"
        )
    return r


# -- profiling -------------------------------------------------------------------


@contextlib.contextmanager
def profiled(dep: Deployment, profile_dir: str | None, name: str) -> Iterator[None]:
    """py-spy records every actor-broker node meanwhile, when --profile asked for it."""
    spies = [start_py_spy(s, profile_dir, name) for s in dep.servers] if profile_dir and dep.is_broker else []
    try:
        yield
    finally:
        for spy in spies:
            stop_py_spy(spy)


def start_py_spy(server: Server, profile_dir: str, name: str) -> subprocess.Popen[bytes]:
    os.makedirs(profile_dir, exist_ok=True)
    return record_py_spy(server.pid, os.path.join(profile_dir, f"{server.tag}-{name}.txt"))


def record_py_spy(pid: int, out: str) -> subprocess.Popen[bytes]:
    """py-spy recording process `pid` into `out` (raw, collapsed stacks) until stop_py_spy."""
    py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(py_spy):
        raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
    return subprocess.Popen(
        [py_spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "200", "--output", out],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop_py_spy(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def summarize_profile(path: str, top: int = 15) -> str:
    """Top frames of a py-spy raw (collapsed stacks) file: by own time and by time below them."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    with open(path) as f:
        for line in f:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            count = int(count_text)
            samples += count
            frames = stack.split(";")
            for frame in set(frames):
                total[frame] += count
            own[frames[-1]] += count
    lines = [f"{path}: {samples} samples"]
    # the inclusive list leaves out the frames every sample runs under (main, the event loop)
    below = Counter({f: c for f, c in total.items() if c < 0.9 * samples})
    for title, counter in (("own time", own), ("inclusive time, below the event loop", below)):
        lines.append(f"  top {top} frames by {title}:")
        for frame, count in counter.most_common(top):
            lines.append(f"    {100 * count / max(samples, 1):5.1f}%  {frame}")
    return "\n".join(lines)


# -- the run ---------------------------------------------------------------------


@dataclass
class ScenarioResult:
    rounds: dict[str, list[Round]] = field(default_factory=dict)  # row name -> its rounds
    skipped: dict[str, str] = field(default_factory=dict)  # row name -> why it did not run


async def play(name: str, dep: Deployment, n: int, profile_dir: str | None) -> Round:
    if name == "fanout":
        return await round_fanout(dep, n, profile_dir)
    if name == "latency":
        return await round_latency(dep, n, profile_dir)
    if name == "latency-ws":
        return await round_latency(dep, n, profile_dir, over_ws=True)
    if name == "idle":
        return await round_idle(dep, n, IDLE)
    if name == "idle-19k":
        return await round_idle(dep, n, IDLE_19K, name="idle19k")
    return await round_churn(dep, n)


async def run_scenario(name: str, rows: list[str], rounds: int, logdir: str, profile_dir: str | None) -> ScenarioResult:
    result = ScenarioResult()
    env = SERVER_ENV.get(name, {})
    deps: dict[str, Deployment] = {}
    fresh_each_round = name.startswith("idle")  # RSS per connection wants a fresh process
    try:
        for row in rows:
            deps[row] = Deployment(ROWS[row], logdir, env)
            await deps[row].start()
            if name == "latency-ws":
                why = await ws_publish_served(deps[row].ports[0])
                if why is not None:
                    result.skipped[row] = why
        playing = [row for row in rows if row not in result.skipped]
        for row, why in result.skipped.items():
            print(f"  {name} {ROWS[row].label}: skipped, {why}", flush=True)
        for n in range(1, rounds + 1):
            for row in playing:  # A B C ... A B C ...
                dep = deps[row]
                if fresh_each_round and n > 1:
                    await dep.stop()
                    deps[row] = dep = Deployment(ROWS[row], logdir, env)
                    await dep.start()
                t = time.monotonic()
                log_at = dep.log_positions()
                r = await play(name, dep, n, profile_dir)
                dep.check_alive()
                logged = dep.logged_errors(log_at)
                if logged:
                    r.errors.append(f"the server logged {len(logged)} errors, the first: {logged[0][:300]}")
                result.rounds.setdefault(row, []).append(r)
                print(
                    f"  {name} round {n} {ROWS[row].label:>12}: {fmt_round(r)} ({time.monotonic() - t:.1f} s)",
                    flush=True,
                )
    finally:
        for dep in deps.values():
            await dep.stop()
    return result


def fmt_num(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}".replace(",", " ")
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def fmt_round(r: Round) -> str:
    parts = [f"{k} {fmt_num(v)}" for k, v in r.metrics.items()]
    parts += [f"cpu {k} {v:.0f}%" for k, v in r.cpu.items()]
    if r.lost or r.dup or r.reorder:
        parts.append(f"LOST {r.lost} DUP {r.dup} REORDERED {r.reorder}")
    parts += [f"ERROR {e}" for e in r.errors]
    return ", ".join(parts)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def medians(rounds: list[Round]) -> dict[str, float]:
    names = dict.fromkeys(k for r in rounds for k in r.metrics)
    return {k: v for k in names if (v := median([r.metrics[k] for r in rounds if k in r.metrics])) is not None}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def best_peer(metric: str, figures: dict[str, dict[str, float]]) -> tuple[str, float] | None:
    """The peer row with the best median of `metric` (None for measures without a better side)."""
    if metric in HIGHER_IS_BETTER:
        pick = max
    elif metric in LOWER_IS_BETTER:
        pick = min
    else:
        return None
    have = [(row, figures[row][metric]) for row in PEERS if row in figures and metric in figures[row]]
    return pick(have, key=lambda item: item[1]) if have else None


def print_markdown(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)) + " |")


def all_medians(all_results: dict[str, ScenarioResult]) -> dict[str, dict[str, dict[str, float]]]:
    """scenario -> row -> metric -> median over the rounds."""
    return {s: {row: medians(rs) for row, rs in res.rounds.items()} for s, res in all_results.items()}


def print_tables(all_results: dict[str, ScenarioResult]) -> None:
    figures = all_medians(all_results)
    header = ["scenario", "metric", "row", "median", "min-max", "÷ bare Tornado", "÷ best peer"]
    lines = []
    for scenario, res in all_results.items():
        fig = figures[scenario]
        metrics = list(dict.fromkeys(k for rs in res.rounds.values() for r in rs for k in r.metrics))
        first = True
        for metric in metrics:
            best = best_peer(metric, fig)
            base = fig.get(BASELINE_ROW, {}).get(metric)
            for row in res.rounds:
                if metric not in fig[row]:
                    continue
                values = [r.metrics[metric] for r in res.rounds[row] if metric in r.metrics]
                value = fig[row][metric]
                span = f"{fmt_num(min(values))}-{fmt_num(max(values))}" if len(values) > 1 else ""
                to_best = f"{fmt_ratio(ratio(value, best[1]))} ({ROWS[best[0]].label})" if best else "-"
                lines.append(
                    [
                        scenario if first else "",
                        metric,
                        ROWS[row].label,
                        fmt_num(value),
                        span,
                        fmt_ratio(ratio(value, base)),
                        to_best,
                    ]
                )
                first = False
    print_markdown(header, lines)
    print()
    print("Per row: messages lost / duplicated / out of order (summed over the rounds), and CPU as % of one core")
    print("over the measured window (medians; server = every node of the row; other = the rest of the machine).")
    header = ["scenario", "row", "rounds", "lost", "dup", "reordered", "errors", "server", "redis", "loadgen"]
    header += ["publisher", "other"]
    lines = []
    for scenario, res in all_results.items():
        for i, (row, rounds) in enumerate(res.rounds.items()):
            line = [scenario if i == 0 else "", ROWS[row].label, str(len(rounds))]
            line += [str(sum(getattr(r, k) for r in rounds)) for k in ("lost", "dup", "reorder")]
            line.append(str(sum(len(r.errors) for r in rounds)))
            for who in ("server", "redis", "loadgen", "publisher", "other"):
                line.append(fmt_num(median([r.cpu[who] for r in rounds if who in r.cpu])))
            lines.append(line)
        for row, why in res.skipped.items():
            lines.append([scenario, ROWS[row].label, "0", "-", "-", "-", f"skipped: {why}"[:70], *["-"] * 5])
    print_markdown(header, lines)


def verdict(value: float | None, limit: float, at_most: bool) -> str:
    if value is None:
        return "not measured"
    met = value <= limit if at_most else value >= limit
    return f"{value:.2f} (needs {'<=' if at_most else '>='} {limit:.2g}: {'met' if met else 'NOT met'})"


def print_criteria(all_results: dict[str, ScenarioResult]) -> None:
    """The issues' numeric criteria, from this run's medians. They inform; only integrity sets the exit code."""
    f = all_medians(all_results)

    def get(scenario: str, row: str, metric: str) -> float | None:
        return f.get(scenario, {}).get(row, {}).get(metric)

    print("Issue 12 (the Redis backend), ratios of this run's medians:")
    for row in ("redis", "redis2"):
        label = ROWS[row].label
        fan = ratio(get("fanout", row, "deliveries/s"), get("fanout", "broker", "deliveries/s"))
        p99 = ratio(get("latency", row, "p99 ms"), get("latency", "broker", "p99 ms"))
        if row == "redis":
            print(f"  fanout deliveries/s, {label} / in memory: {verdict(fan, 0.5, at_most=False)}")
            print(f"  latency p99, {label} / in memory: {verdict(p99, 2.0, at_most=True)}")
        elif fan is not None or p99 is not None:
            print(f"  (no criterion) {label} / in memory: fanout deliveries/s {fmt_ratio(fan)}, p99 {fmt_ratio(p99)}")
    for scenario in ("fanout", "latency", "latency-ws"):
        res = all_results.get(scenario)
        for row in ("redis", "redis2"):
            rounds = res.rounds.get(row, []) if res else []
            cost = [r.notes["redis commands per publish, by command"] for r in rounds if "redis calls" in r.notes]
            if not cost:
                continue
            per: Counter[str] = Counter()
            for c in cost:
                per.update(c)
            top = ", ".join(f"{k} {v / len(cost):.2f}" for k, v in per.most_common(6))
            events = rounds[0].notes["events published"] / max(rounds[0].notes["publish requests"], 1)
            print(
                f"  Redis per publish, {scenario}, {ROWS[row].label} ({events:g} events per publish): "
                f"{fmt_num(get(scenario, row, 'Redis EVALSHA per publish'))} EVALSHA (the round trip); "
                f"{fmt_num(get(scenario, row, 'Redis commands per publish'))} commands run in all ({top}, ...; "
                "INFO commandstats: inside the scripts and the nodes' background work included)"
            )
    print("Issue 14 (publishing as cheap as the fastest peer):")
    per_publish = "server CPU ms per publish"
    cpu = ratio(get("latency", "broker", per_publish), get("latency", "fastapi", per_publish))
    print(f"  latency, server CPU per publish, actor-broker / FastAPI: {verdict(cpu, 1.0, at_most=True)}")
    p99 = ratio(get("latency", "broker", "p99 ms"), get("latency", "baseline", "p99 ms"))
    print(f"  latency p99, actor-broker / bare Tornado: {verdict(p99, 1.0, at_most=True)}")
    ws_cpu = ratio(
        get("latency-ws", "broker", "server CPU ms per publish"), get("latency", "broker", "server CPU ms per publish")
    )
    ws_p99 = ratio(get("latency-ws", "broker", "p99 ms"), get("latency", "broker", "p99 ms"))
    print(f"  /ws/publish, server CPU per published event / the HTTP path's: {verdict(ws_cpu, 1 / 3, at_most=True)}")
    print(f"  /ws/publish, p99 / the HTTP path's: {verdict(ws_p99, 1.0, at_most=True)}")
    print(f"  idle, KiB per connection at 5 000: {verdict(get('idle', 'broker', 'KiB per connection'), 12, True)}")
    hs = ratio(get("idle-19k", "broker", "handshakes/s"), get("idle-19k", "baseline", "handshakes/s"))
    print(f"  idle-19k, handshakes/s, actor-broker / bare Tornado: {verdict(hs, 1.0, at_most=False)}")
    big = all_results["idle-19k"].rounds.get("broker", []) if "idle-19k" in all_results else []
    if big:
        alive = all(not r.errors and not r.lost for r in big)
        print(
            f"  idle-19k, actor-broker: every connection alive (greeted, counted, got its event) in every round: "
            f"{'yes' if alive else 'NO'}"
        )
    fan = ratio(
        get("fanout", "broker", "server CPU µs per delivery"), get("fanout", "baseline", "server CPU µs per delivery")
    )
    print(
        f"  fanout, server CPU per delivery: {fmt_num(get('fanout', 'broker', 'server CPU µs per delivery'))} µs, "
        f"{fmt_ratio(fan)} of bare Tornado's"
    )


def machine() -> str:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    node = subprocess.run([NODE, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    redis = subprocess.run([REDIS_SERVER, "--version"], capture_output=True, text=True, check=False).stdout.split()
    redis_version = next((w.split("=", 1)[1] for w in redis if w.startswith("v=")), "absent")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} CPUs ({model}), {mem:.0f} GiB RAM, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, Node {node}, Redis {redis_version}"
    )


def rows_of(scenario: str, asked: list[str] | None) -> list[str]:
    """The rows to run for a scenario: those asked for that it runs (in table order), or its default ones."""
    if not asked:
        return list(SCENARIO_ROWS[scenario])
    allowed = set(BROKER_ROWS) if scenario == "latency-ws" else set(ROWS)
    return [row for row in ROWS if row in asked and row in allowed]


def check_peers_installed(rows: set[str]) -> str | None:
    if "fastapi" in rows:
        try:
            import fastapi  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError:
            return "the FastAPI row needs the bench extra: .venv/bin/pip install -e '.[bench]' (make bench does it)"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenario", action="append", choices=SCENARIOS, help="run only this scenario (repeatable); default: all"
    )
    parser.add_argument(
        "--row",
        action="append",
        choices=list(ROWS),
        help="run only this row (repeatable; default: each scenario's own, see bench/README.md)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help="rounds per scenario (default: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_ROUNDS.items()) + ")",
    )
    parser.add_argument(
        "--broker-loop",
        default="asyncio",
        choices=("asyncio", "uvloop", "auto"),
        help="event_loop of every actor-broker node (default: asyncio, the default install's; "
        "the bench extra brings uvloop into the venv for uvicorn)",
    )
    parser.add_argument(
        "--profile",
        nargs="?",
        const=os.path.join(tempfile.gettempdir(), "actor-broker-profiles"),
        metavar="DIR",
        help="record actor-broker with py-spy during fanout and latency rounds (default DIR: %(const)s)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every round's raw results here")
    parser.add_argument(
        "--inject-loss",
        type=int,
        default=0,
        metavar="N",
        help="a self-check of the bench: bare Tornado skips every Nth write, and the run must fail",
    )
    args = parser.parse_args(argv)
    Options.broker_loop = args.broker_loop
    Options.inject_loss = args.inject_loss

    if not os.path.isdir(os.path.join(LOADGEN_DIR, "node_modules", "ws")):
        print(f"bench: the load generator needs `npm ci` in {LOADGEN_DIR} (make bench does it)", file=sys.stderr)
        return 2
    scenarios = args.scenario or list(SCENARIOS)
    plan = {name: rows_of(name, args.row) for name in scenarios}
    missing = check_peers_installed({row for rows in plan.values() for row in rows})
    if missing:
        print(f"bench: {missing}", file=sys.stderr)
        return 2
    nofile = raise_nofile()
    IDLE_19K["clients"] = min(IDLE_19K["clients"], (nofile - 500) // IDLE_19K["sessions"] * IDLE_19K["sessions"])
    print(f"machine: {machine()}")
    print(f"nofile limit: {nofile} (idle-19k opens {IDLE_19K['clients']} connections)")
    if "event_loop" in broker_setting_names():
        print(f"actor-broker event loop: {Options.broker_loop}")
    logdir = tempfile.mkdtemp(prefix="actor-broker-bench-")
    print(f"server logs: {logdir}", flush=True)
    all_results: dict[str, ScenarioResult] = {}
    failed = False
    started = time.monotonic()
    for name in scenarios:
        rows = plan[name]
        if not rows:
            print(f"{name}: none of the rows asked for runs it (its rows: {', '.join(SCENARIO_ROWS[name])})")
            continue
        rounds = args.rounds or DEFAULT_ROUNDS[name]
        labels = ", ".join(ROWS[row].label for row in rows)
        print(f"{name}: {rounds} round(s), interleaved: {labels}", flush=True)
        try:
            all_results[name] = asyncio.run(run_scenario(name, rows, rounds, logdir, args.profile))
        except Exception as exc:
            print(f"  {name} FAILED: {type(exc).__name__}: {exc}", flush=True)
            failed = True
    print()
    print(
        f"Medians over the rounds; ratios to bare Tornado and to the best peer (bare Tornado, FastAPI, Node ws) "
        f"of this run; run took {time.monotonic() - started:.0f} s."
    )
    print_tables(all_results)
    print()
    print_criteria(all_results)
    print()
    for scenario, res in all_results.items():
        for row, rounds in res.rounds.items():
            for i, r in enumerate(rounds, 1):
                if r.lost or r.dup or r.reorder or r.errors:
                    failed = True
                    print(
                        f"FAIL {scenario} round {i} {ROWS[row].label}: lost {r.lost}, duplicated {r.dup}, "
                        f"out of order {r.reorder}; {'; '.join(r.errors) or 'no other error'}"
                    )
                if r.cpu.get("loadgen", 0) > 80 or r.cpu.get("publisher", 0) > 80:
                    print(
                        f"WARNING {scenario} round {i} {ROWS[row].label}: the load generator or publisher used "
                        f"{r.cpu.get('loadgen', 0):.0f}% / {r.cpu.get('publisher', 0):.0f}% of a core; "
                        "it may be the bottleneck"
                    )
                if "warning" in r.notes:
                    print(f"WARNING {scenario} round {i} {ROWS[row].label}: {r.notes['warning']}")
    if args.profile:
        for entry in sorted(os.listdir(args.profile)) if os.path.isdir(args.profile) else []:
            print(summarize_profile(os.path.join(args.profile, entry)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    s: {"rounds": {row: [r.__dict__ for r in rs] for row, rs in res.rounds.items()}}
                    | {"skipped": res.skipped}
                    for s, res in all_results.items()
                },
                f,
                indent=1,
                default=str,
            )
    if failed:
        print("bench: FAILED (see above)")
        return 1
    print("bench: no message lost, duplicated or reordered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
