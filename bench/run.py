"""Fan-out benchmark: actor-broker against the simplest Tornado fan-out, in one run.

    make bench                                        # every scenario (a few minutes)
    python bench/run.py --scenario fanout --rounds 1  # one scenario, one round
    python bench/run.py --scenario fanout --profile   # + py-spy of actor-broker

Both servers (actor-broker, `python -m broker serve`, and bench/baseline.py)
are started fresh for every scenario on free ports, and driven by the same
load generator (bench/loadgen, Node + `ws`), interleaved A B A B over the
rounds. Prints one table of medians with ratios to the baseline, the CPU
share of the server, the load generator and this publisher, and exits 1 if
any message was lost, duplicated or reordered, a publish failed, a client was
refused or closed by the server, a server logged an error, or connections
outlived their clients.

See bench/README.md for what each scenario does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOADGEN_DIR = os.path.join(ROOT, "bench", "loadgen")
LOADGEN = os.path.join(LOADGEN_DIR, "loadgen.js")
BASELINE = os.path.join(ROOT, "bench", "baseline.py")
CLK_TCK = os.sysconf("SC_CLK_TCK")
NODE = os.environ.get("NODE", shutil.which("node") or "node")

TARGETS = ("broker", "baseline")
LABEL = {"broker": "actor-broker", "baseline": "baseline"}
EVENT_TYPE = "bench.tick"  # any valid type; not task_progress, which is throttled
SCENARIOS = ("fanout", "latency", "idle", "churn")
DEFAULT_ROUNDS = {"fanout": 3, "latency": 5, "idle": 3, "churn": 1}

# -- the shape of each scenario (the numbers) ---------------------------

FANOUT = {"sessions": 10, "clients": 1000, "events_per_session": 1000, "batch": 50, "http_connections": 4}
LATENCY = {"sessions": 100, "clients": 1000, "deliveries_per_s": 5000, "seconds": 5.0, "warmup_s": 1.0}
IDLE = {"sessions": 50, "clients": 5000, "warm_clients": 10}
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


# -- processes -------------------------------------------------------------------


def raise_nofile() -> None:
    """5 000 connections need 5 000 descriptors on each side; children inherit this."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


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
    """CPU used by some processes (and by this one) over a wall-clock window, as % of one core.

    `other` is what every other process on the machine used meanwhile: on a
    shared machine, a reason for numbers to move between runs.
    """

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.start = {name: cpu_seconds(pid) for name, pid in pids.items()}
        self.self_start = sum(os.times()[:2])
        self.machine_start = machine_busy_seconds()
        self.t0 = time.monotonic()

    def stop(self) -> dict[str, float]:
        """% of one core used by each, over the window; `seconds` holds the CPU seconds."""
        wall = max(time.monotonic() - self.t0, 1e-9)
        used = {name: cpu_seconds(pid) - self.start[name] for name, pid in self.pids.items()}
        used["publisher"] = sum(os.times()[:2]) - self.self_start
        used["other"] = max(0.0, machine_busy_seconds() - self.machine_start - sum(used.values()))
        self.seconds = used
        return {name: 100 * seconds / wall for name, seconds in used.items()}


class Server:
    """One server process on a free port: actor-broker or the baseline."""

    def __init__(self, kind: str, logdir: str, env: dict[str, str] | None = None) -> None:
        self.kind = kind
        self.env = env or {}
        self.port = free_port()
        self.log_path = os.path.join(logdir, f"{kind}-{self.port}.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.http: Http | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def ws_base(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/research/"

    @property
    def ws_query(self) -> str:
        # live messages only: clients are connected before anything is published
        return "?replay=none" if self.kind == "broker" else ""

    async def start(self) -> None:
        if self.kind == "broker":
            cmd = [sys.executable, "-m", "broker", "serve", "--port", str(self.port)]
        else:
            cmd = [sys.executable, BASELINE, "--port", str(self.port)]
        env = dict(os.environ)
        # The baseline logs nothing per request or connection; neither should the broker here.
        env.setdefault("BROKER_LOG_LEVEL", "warning")
        env.setdefault("BROKER_LOG_FORMAT", "json")
        env.update(self.env)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            self.check_alive()
            try:
                self.http = await Http.connect(self.port)
                status, _ = await self.http.request("GET", "/healthz")
                if status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind} did not answer /healthz within 30 s; see {self.log_path}")
            await asyncio.sleep(0.1)

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}; see {self.log_path}")

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

    async def counts(self) -> dict[str, int]:
        """Live connections and sessions as the server counts them (actors, for the broker)."""
        assert self.http is not None
        if self.kind == "baseline":
            _, body = await self.http.request("GET", "/stats")
            stats = json.loads(body)
            return {"connections": stats["active_connections"], "sessions": stats["active_sessions"]}
        _, body = await self.http.request("GET", "/api/websocket/stats")
        stats = json.loads(body)
        result = {"connections": stats["active_connections"], "sessions": stats["active_sessions"]}
        status, body = await self.http.request("GET", "/metrics")
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
    async def start(cls, server: Server, config: dict[str, Any]) -> Loadgen:
        config = {"base": server.ws_base, "query": server.ws_query, **config}
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


def now_ms() -> float:
    return time.time() * 1000


class Published:
    """The seqs the server assigned, per session: they must be 1..n with no holes."""

    def __init__(self) -> None:
        self.seqs: dict[str, list[int]] = {}
        self.events = 0
        self.failures: list[str] = []

    async def post(self, http: Http, session: str, events: list[dict[str, Any]]) -> None:
        """Publish, and keep a failure (an error answer) instead of raising: the run goes on."""
        try:
            self.add(session, await http.publish(session, events))
        except PublishError as exc:
            self.failures.append(str(exc))

    def add(self, session: str, seqs: list[int]) -> None:
        self.seqs.setdefault(session, []).extend(seqs)
        self.events += len(seqs)

    def max_seq(self) -> dict[str, int]:
        return {s: max(v) for s, v in self.seqs.items()}

    def merge(self, other: Published) -> None:
        for session, seqs in other.seqs.items():
            self.add(session, seqs)
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


async def publish_batches(port: int, sessions: list[str], per_session: int, batch: int, connections: int) -> Published:
    """Every session gets `per_session` events in batches of `batch`, over a few keep-alive connections.

    Each connection carries a fixed share of the sessions (so each session's
    batches go out in order) and posts as fast as the server answers.
    """
    published = Published()
    counter = [0]

    async def worker(mine: list[str]) -> None:
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
    await asyncio.gather(*(worker(share) for share in shares if share))
    return published


async def publish_paced(
    port: int,
    sessions: list[str],
    rate: float,
    seconds: float | None,
    connections: int = 16,
    stop: asyncio.Event | None = None,
) -> tuple[Published, dict[str, float]]:
    """One event per POST, `rate` a second, round-robin over the sessions, each stamped `ts` as it is sent.

    Runs for `seconds`, or until `stop` is set. Returns what was published and
    how well the pace held (achieved rate, worst lag).
    """
    published = Published()
    loop = asyncio.get_running_loop()
    pool: asyncio.Queue[Http] = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(await Http.connect(port))
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


# -- results ---------------------------------------------------------------------


@dataclass
class Round:
    """One round of one scenario against one server."""

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
    if res["errors"]:
        r.errors.append(f"{res['errors']} client errors, e.g. {res['errorSamples'][:3]}")
    if res["greeted"] != res["clients"]:
        r.errors.append(f"only {res['greeted']} of {res['clients']} clients were greeted")
    r.errors.extend(published.problems())
    if res.get("unpublishedSeqs"):
        r.notes["seqs the publisher was not told about"] = res["unpublishedSeqs"]
    r.notes["avg_message_bytes"] = res["bytes"] / max(res["received"], 1)


async def open_clients(server: Server, config: dict[str, Any]) -> Loadgen:
    lg = await Loadgen.start(server, config)
    await lg.expect("warm")
    lg.send(cmd="open")
    ready = await lg.expect("ready", timeout=180)
    if ready["greeted"] != ready["clients"]:
        await lg.close()
        raise RuntimeError(f"{server.kind}: only {ready['greeted']} of {ready['clients']} clients were greeted")
    return lg


async def round_fanout(server: Server, n: int, profile_dir: str | None) -> Round:
    p = FANOUT
    sessions = [f"fan-r{n}-s{i}" for i in range(p["sessions"])]
    lg = await open_clients(server, {"sessions": sessions, "perSession": p["clients"] // p["sessions"]})
    r = Round()
    try:
        with profiled(server, profile_dir, f"fanout-r{n}"):
            await asyncio.sleep(0.5)
            window = CpuWindow({"server": server.pid, "loadgen": lg.pid})
            t0 = now_ms()
            published = await publish_batches(
                server.port, sessions, p["events_per_session"], p["batch"], p["http_connections"]
            )
            t_published = now_ms()
            res = await results_of(lg, published, window, r, timeout=600)
    finally:
        await lg.close()
    check_loadgen_results(r, res, published)
    elapsed = max((res["lastRecv"] - t0) / 1000, 1e-3)
    r.metrics["deliveries/s"] = res["distinct"] / elapsed
    r.metrics["server CPU µs per delivery"] = 1e6 * window.seconds["server"] / max(res["distinct"], 1)
    r.metrics["publish done s"] = (t_published - t0) / 1000
    r.metrics["last delivery s"] = elapsed
    return r


async def round_latency(server: Server, n: int, profile_dir: str | None) -> Round:
    p = LATENCY
    sessions = [f"lat-r{n}-s{i}" for i in range(p["sessions"])]
    per_session = p["clients"] // p["sessions"]
    event_rate = p["deliveries_per_s"] / per_session
    lg = await open_clients(
        server,
        {
            "sessions": sessions,
            "perSession": per_session,
            "latency": True,
            "warmupEvents": round(event_rate * p["warmup_s"]),
        },
    )
    r = Round()
    try:
        with profiled(server, profile_dir, f"latency-r{n}"):
            await asyncio.sleep(0.5)
            window = CpuWindow({"server": server.pid, "loadgen": lg.pid})
            published, pace = await publish_paced(server.port, sessions, event_rate, p["warmup_s"] + p["seconds"])
            res = await results_of(lg, published, window, r, timeout=120)
    finally:
        await lg.close()
    check_loadgen_results(r, res, published)
    lat = res["latency"]
    r.metrics["p50 ms"] = lat["p50"]
    r.metrics["p99 ms"] = lat["p99"]
    r.metrics["max ms"] = lat["max"]
    r.metrics["deliveries/s (paced)"] = pace["achieved_rate"] * per_session
    r.metrics["server CPU µs per delivery"] = 1e6 * window.seconds["server"] / max(res["distinct"], 1)
    r.notes["worst publish lag ms"] = pace["worst_lag_ms"]
    r.notes["min latency ms"] = lat["min"]
    if lat["min"] is not None and lat["min"] < -1:
        r.errors.append(f"a message arrived {-lat['min']:.1f} ms before it was sent: the two clocks disagree")
    r.notes["latency samples"] = lat["n"]
    return r


async def round_idle(server: Server, n: int) -> Round:
    p = IDLE
    sessions = [f"idle-r{n}-s{i}" for i in range(p["sessions"])]
    lg = await Loadgen.start(
        server,
        {
            "sessions": sessions,
            "perSession": p["clients"] // p["sessions"],
            "warm": {"session": f"idle-r{n}-warm", "clients": p["warm_clients"]},
        },
    )
    r = Round()
    try:
        await lg.expect("warm")
        # a publish, so both servers have run every code path once before the first RSS reading
        warm = await Http.connect(server.port)
        await warm.publish(f"idle-r{n}-warm", [{"type": EVENT_TYPE, "i": -1, "ts": now_ms()}])
        warm.close()
        await asyncio.sleep(1.0)
        before = server.rss_kib()
        lg.send(cmd="open")
        ready = await lg.expect("ready", timeout=180)
        if ready["greeted"] != ready["clients"]:
            r.errors.append(f"only {ready['greeted']} of {ready['clients']} clients were greeted")
        await asyncio.sleep(2.0)
        after = server.rss_kib()
        counts = await server.counts()
        # now one event per session: each of the idle clients must get it exactly once
        window = CpuWindow({"server": server.pid, "loadgen": lg.pid})
        published = await publish_batches(server.port, sessions, 1, 1, 4)
        res = await results_of(lg, published, window, r, timeout=60)
    finally:
        await lg.close()
    check_loadgen_results(r, res, published)
    r.metrics["KiB per connection"] = (after - before) / p["clients"]
    r.metrics["RSS MiB, 5000 open"] = after / 1024
    r.notes["connect ms"] = ready["connectMs"]
    r.notes["counts"] = counts
    expected = p["clients"] + p["warm_clients"]
    if counts["connections"] != expected:
        r.errors.append(f"server counts {counts['connections']} connections, {expected} are open")
    return r


async def settle_counts(server: Server, want_connections: int, timeout: float = 10) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        counts = await server.counts()
        done = counts["connections"] == want_connections and counts.get("connection_actors", want_connections) == (
            want_connections
        )
        if done or time.monotonic() > deadline:
            return counts
        await asyncio.sleep(0.2)


async def round_churn(server: Server, n: int) -> Round:
    p = CHURN
    sessions = [f"churn-r{n}-s{i}" for i in range(p["sessions"])]
    stable = p["sessions"] * p["stable_per_session"]
    lg = await open_clients(
        server,
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
        window = CpuWindow({"server": server.pid, "loadgen": lg.pid})
        # Full histories first, so that what grows afterwards is not the history filling up.
        published.merge(await publish_batches(server.port, sessions, p["prefill"], 50, 4))
        before = await settle_counts(server, stable)
        await asyncio.sleep(1.0)
        rss_before = server.rss_kib()
        for phase in range(1, p["phases"] + 1):
            stop = asyncio.Event()
            publisher = asyncio.create_task(
                publish_paced(server.port, sessions, p["events_per_s"], None, connections=4, stop=stop)
            )
            lg.send(cmd="churn", count=p["per_phase"])
            try:
                churned = await lg.expect("churned", timeout=120)
            finally:
                stop.set()
                part, _ = await publisher
            published.merge(part)
            counts = await settle_counts(server, stable)
            await asyncio.sleep(1.0)
            phases.append({"phase": phase, "rss_kib": server.rss_kib(), "counts": counts, "churn": churned})
        r.cpu = window.stop()
        lg.send(cmd="finish", maxSeq=published.max_seq())
        res = await lg.expect("results", timeout=60)
        lg.send(cmd="close_all")
        await lg.expect("closed", timeout=60)
        final = await settle_counts(server, 0)
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
def profiled(server: Server, profile_dir: str | None, name: str) -> Iterator[None]:
    """py-spy records actor-broker meanwhile, when --profile asked for it."""
    spy = start_py_spy(server, profile_dir, name) if profile_dir else None
    try:
        yield
    finally:
        if spy is not None:
            stop_py_spy(spy)


def start_py_spy(server: Server, profile_dir: str, name: str) -> subprocess.Popen[bytes] | None:
    if server.kind != "broker":
        return None
    py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(py_spy):
        raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
    os.makedirs(profile_dir, exist_ok=True)
    out = os.path.join(profile_dir, f"{server.kind}-{name}.txt")
    return subprocess.Popen(
        [py_spy, "record", "--pid", str(server.pid), "--format", "raw", "--rate", "200", "--output", out],
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


async def run_scenario(name: str, rounds: int, logdir: str, profile_dir: str | None) -> dict[str, list[Round]]:
    results: dict[str, list[Round]] = {t: [] for t in TARGETS}
    env = SERVER_ENV.get(name, {})
    servers = {t: Server(t, logdir, env) for t in TARGETS}
    try:
        for server in servers.values():
            await server.start()
        for n in range(1, rounds + 1):
            for target in TARGETS:  # A B A B ...
                server = servers[target]
                if name == "idle" and n > 1:  # RSS per connection wants a fresh process
                    await server.stop()
                    servers[target] = server = Server(target, logdir, env)
                    await server.start()
                t = time.monotonic()
                log_at = server.log_position()
                if name == "fanout":
                    r = await round_fanout(server, n, profile_dir)
                elif name == "latency":
                    r = await round_latency(server, n, profile_dir)
                elif name == "idle":
                    r = await round_idle(server, n)
                else:
                    r = await round_churn(server, n)
                server.check_alive()
                logged = server.logged_errors(log_at)
                if logged:
                    r.errors.append(f"the server logged {len(logged)} errors, the first: {logged[0][:300]}")
                results[target].append(r)
                print(
                    f"  {name} round {n} {LABEL[target]:>12}: {fmt_round(r)} ({time.monotonic() - t:.1f} s)", flush=True
                )
    finally:
        for server in servers.values():
            await server.stop()
    return results


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


def print_table(all_results: dict[str, dict[str, list[Round]]]) -> None:
    header = [
        "scenario",
        "metric",
        "actor-broker",
        "baseline",
        "ratio AB/BL",
        "lost AB/BL",
        "dup AB/BL",
        "loadgen CPU% AB/BL",
        "server CPU% AB/BL",
        "publisher CPU% AB/BL",
        "other CPU% AB/BL",
    ]
    rows = []
    for scenario, results in all_results.items():
        ab, bl = results["broker"], results["baseline"]
        metrics = list(dict.fromkeys([k for r in ab + bl for k in r.metrics]))
        for i, metric in enumerate(metrics):
            a = median([r.metrics[metric] for r in ab if metric in r.metrics])
            b = median([r.metrics[metric] for r in bl if metric in r.metrics])
            ratio = f"{a / b:.2f}" if a is not None and b else "-"
            row = [scenario if i == 0 else "", metric, fmt_num(a), fmt_num(b), ratio]
            if i == 0:
                row.append(f"{sum(r.lost for r in ab)} / {sum(r.lost for r in bl)}")
                row.append(f"{sum(r.dup for r in ab)} / {sum(r.dup for r in bl)}")
                for who in ("loadgen", "server", "publisher", "other"):
                    ca = median([r.cpu[who] for r in ab if who in r.cpu])
                    cb = median([r.cpu[who] for r in bl if who in r.cpu])
                    row.append(f"{fmt_num(ca)} / {fmt_num(cb)}")
            else:
                row += [""] * 6
            rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)) + " |")


def machine() -> str:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    node = subprocess.run([NODE, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} CPUs ({model}), {mem:.0f} GiB RAM, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, Node {node}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenario", action="append", choices=SCENARIOS, help="run only this scenario (repeatable); default: all"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help="rounds per scenario (default: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_ROUNDS.items()) + ")",
    )
    parser.add_argument(
        "--profile",
        nargs="?",
        const=os.path.join(tempfile.gettempdir(), "actor-broker-profiles"),
        metavar="DIR",
        help="record actor-broker with py-spy during fanout and latency rounds (default DIR: %(const)s)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every round's raw results here")
    args = parser.parse_args(argv)

    if not os.path.isdir(os.path.join(LOADGEN_DIR, "node_modules", "ws")):
        print(f"bench: the load generator needs `npm ci` in {LOADGEN_DIR} (make bench does it)", file=sys.stderr)
        return 2
    raise_nofile()
    scenarios = args.scenario or list(SCENARIOS)
    print(f"machine: {machine()}")
    print(f"nofile limit: {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}")
    logdir = tempfile.mkdtemp(prefix="actor-broker-bench-")
    print(f"server logs: {logdir}", flush=True)
    all_results: dict[str, dict[str, list[Round]]] = {}
    failed = False
    started = time.monotonic()
    for name in scenarios:
        rounds = args.rounds or DEFAULT_ROUNDS[name]
        print(f"{name}: {rounds} round(s), actor-broker and baseline interleaved", flush=True)
        try:
            all_results[name] = asyncio.run(run_scenario(name, rounds, logdir, args.profile))
        except Exception as exc:
            print(f"  {name} FAILED: {type(exc).__name__}: {exc}", flush=True)
            failed = True
    print()
    print(f"Medians over the rounds; ratio = actor-broker / baseline; run took {time.monotonic() - started:.0f} s.")
    print_table(all_results)
    print()
    for scenario, results in all_results.items():
        for target, rounds in results.items():
            for i, r in enumerate(rounds, 1):
                if r.lost or r.dup or r.reorder or r.errors:
                    failed = True
                    print(
                        f"FAIL {scenario} round {i} {LABEL[target]}: lost {r.lost}, duplicated {r.dup}, "
                        f"out of order {r.reorder}; {'; '.join(r.errors) or 'no other error'}"
                    )
                if r.cpu.get("loadgen", 0) > 80 or r.cpu.get("publisher", 0) > 80:
                    print(
                        f"WARNING {scenario} round {i} {LABEL[target]}: the load generator or publisher used "
                        f"{r.cpu.get('loadgen', 0):.0f}% / {r.cpu.get('publisher', 0):.0f}% of a core; "
                        "it may be the bottleneck"
                    )
    if args.profile:
        for entry in sorted(os.listdir(args.profile)) if os.path.isdir(args.profile) else []:
            print(summarize_profile(os.path.join(args.profile, entry)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {s: {t: [r.__dict__ for r in rs] for t, rs in res.items()} for s, res in all_results.items()},
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
