"""What one idle WebSocket connection holds in the daemon, by allocation site and by type.

    .venv/bin/python bench/footprint.py                         # 2 000 idle clients over 20 sessions
    .venv/bin/python bench/footprint.py --connections 5000 --top 30
    .venv/bin/python bench/footprint.py --event-loop uvloop     # the daemon under uvloop
    .venv/bin/python bench/footprint.py --json footprint.json   # also keep the raw tables

The daemon (broker.daemon.Daemon, with its listener, GC set-up and default
settings) runs in a child process; this process opens the clients
(`/ws?session_id=fp-<i>&replay=none`) with Tornado's WebSocket client and
tells the child over a pipe when to measure. Before the first reading one
client per session is connected and each session has had a publish, so
what the sessions themselves hold is not counted; after the last reading
one event goes to every session and every client must get it (the
connections measured were alive).

Two children, one after the other, each on a fresh daemon:

1. **RSS**: VmRSS with the clients open minus VmRSS before, per connection,
   with nothing else in the child that allocates (the bench's `idle`
   scenario measures the same at 5 000 connections against bare Tornado).
2. **Python heap**: tracemalloc starts just before the clients connect, so
   what it holds at the second reading is what the connections allocated
   and kept; grouped by the innermost frame (the allocation site) with the
   nearest frame of this project's code (`via`, who asked for it). Then a
   census by type: every object the garbage collector tracks plus what
   those refer to directly (untracked dicts, strings, bytes), counted
   before and after, with `sys.getsizeof`; builtin containers are named by
   the type of an object that refers to them (`dict <- HTTPServerRequest`),
   which says whose they are.

The RSS figure is above the heap figure by the allocator's slack and by
what C code keeps outside Python's allocator; the heap figure is the one
that names what to cut.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import resource
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Iterable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

#: Frames of these directories are "ours" (the `via` column).
OWN_PACKAGES = tuple(os.path.join(ROOT, p) + os.sep for p in ("actors", "broker", "handlers"))
#: Builtin types named by who holds them in the census.
CONTAINERS = frozenset({
    "dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float", "cell",
    "method", "function", "builtin_function_or_method", "collections.deque", "weakref.ReferenceType",
    "memoryview",
})  # fmt: skip
#: Referrers that say nothing about ownership (they hold everything).
ANONYMOUS = CONTAINERS | {"frame", "coroutine", "module", "type"}


# -- the child: a daemon that measures itself -------------------------------------------------


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def type_name(kind: type) -> str:
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


def census(exclude: Iterable[object] = ()) -> dict[str, list[int]]:
    """name -> [objects, bytes] over the tracked objects and what they refer to directly.

    Frozen objects (the daemon freezes survivors) are invisible to
    gc.get_objects(), so the census unfreezes first and freezes again after.
    """
    gc.collect()
    frozen = gc.get_freeze_count()
    gc.unfreeze()
    tracked = gc.get_objects()
    every: dict[int, object] = {}
    owner: dict[int, str] = {}
    anonymous: list[object] = []
    skip = {id(tracked), id(every), id(owner), id(anonymous), *(id(x) for x in exclude)}
    for obj in tracked:
        every[id(obj)] = obj
    for obj in tracked:
        holder = type_name(type(obj))
        if holder in ANONYMOUS:
            anonymous.append(obj)
            continue
        for ref in gc.get_referents(obj):
            key = id(ref)
            if key not in every:
                every[key] = ref
            owner.setdefault(key, holder)
    # What anonymous containers hold belongs to whoever holds them (a dict of lists in
    # HTTPHeaders: the lists are HTTPHeaders' too); a few rounds reach down nested containers.
    for _ in range(4):
        for obj in anonymous:
            holder_name = owner.get(id(obj))
            for ref in gc.get_referents(obj):
                key = id(ref)
                if key not in every:
                    every[key] = ref
                if holder_name is not None:
                    owner.setdefault(key, holder_name)
        anonymous[:] = [o for k, o in every.items() if k in owner and type(o) in (dict, list, tuple, set, frozenset)]
    counts: dict[str, list[int]] = {}
    for key, obj in every.items():
        if key in skip or obj is every:
            continue
        name = type_name(type(obj))
        if name in CONTAINERS:
            name = f"{name} <- {owner.get(key, '?')}"
        entry = counts.setdefault(name, [0, 0])
        entry[0] += 1
        with contextlib.suppress(TypeError):  # objects whose __sizeof__ is broken count zero
            entry[1] += sys.getsizeof(obj)
    del tracked, every
    if frozen:
        gc.freeze()
    return counts


def short_path(path: str) -> str:
    if path.startswith(ROOT + os.sep):
        return os.path.relpath(path, ROOT)
    marker = "site-packages" + os.sep
    if marker in path:
        return path.split(marker, 1)[1]
    stdlib = sysconfig.get_paths()["stdlib"]
    if path.startswith(stdlib + os.sep):
        return "stdlib/" + os.path.relpath(path, stdlib)
    return path


def heap_sites(snapshot: tracemalloc.Snapshot) -> list[dict[str, Any]]:
    """Live traced memory grouped by (innermost frame, who asked for it).

    `via` is the nearest frame in actors/, broker/ or handlers/ (the daemon's
    runner, under every callback, does not count), else the nearest caller in
    another file.
    """
    runner = os.path.join(ROOT, "broker", "daemon.py")
    ignored = (tracemalloc.__file__, __file__)
    sites: dict[tuple[str, str], list[int]] = {}
    for stat in snapshot.statistics("traceback"):
        frames = list(stat.traceback)  # oldest first
        inner = frames[-1]
        if inner.filename in ignored:
            continue
        site = f"{short_path(inner.filename)}:{inner.lineno}"
        callers = frames[-2::-1]
        own = [f for f in callers if f.filename.startswith(OWN_PACKAGES) and f.filename != runner]
        other = [f for f in callers if f.filename != inner.filename]
        chosen = own[0] if own else other[0] if other else None
        via = "" if chosen is None else f"{short_path(chosen.filename)}:{chosen.lineno}"
        entry = sites.setdefault((site, via), [0, 0])
        entry[0] += stat.size
        entry[1] += stat.count
    return [{"site": s, "via": v, "bytes": b, "blocks": n} for (s, v), (b, n) in sites.items()]


class Child:
    """The daemon, and the measurements the parent asks for over stdin (answers on `reply_fd`)."""

    def __init__(self, reply_fd: int, trace_depth: int, log_level: str) -> None:
        self.reply = os.fdopen(reply_fd, "w", buffering=1)
        self.trace_depth = trace_depth
        self.log_level = log_level
        self.rss_before = 0
        #: the census and the snapshot wait on disk, where the next census does not count them
        self.workdir = tempfile.mkdtemp(prefix="footprint-child-")

    def answer(self, **fields: Any) -> None:
        self.reply.write(json.dumps(fields) + "\n")

    async def run(self) -> None:
        from broker.config import Settings
        from broker.daemon import Daemon
        from broker.logs import configure_logging

        configure_logging(self.log_level, "json", stream=sys.stderr)
        settings = Settings(host="127.0.0.1", port=0, log_level=self.log_level, log_format="json")
        if self.trace_depth:
            # Traced, the daemon runs many times slower and a measurement blocks its loop for
            # seconds: liveness probes would time out. The heartbeat's timer stays (keepalives).
            settings = settings.replace(ws_ping_interval=0.0)
        daemon = Daemon(settings, environ={})
        serving = asyncio.ensure_future(daemon.run())
        deadline = time.monotonic() + 30
        while daemon.port is None or daemon.broker is None or not daemon.broker.ready:
            if serving.done() or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not start: {serving}")
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        self.answer(port=daemon.port, loop=f"{type(loop).__module__}.{type(loop).__qualname__}")
        commands: asyncio.Queue[str] = asyncio.Queue()

        def read_commands() -> None:
            for line in sys.stdin:
                loop.call_soon_threadsafe(commands.put_nowait, line.strip())
            loop.call_soon_threadsafe(commands.put_nowait, "quit")

        threading.Thread(target=read_commands, daemon=True).start()
        while True:
            command = await commands.get()
            if command == "quit":
                break
            getattr(self, command.replace("-", "_"))()
        daemon.request_stop()
        await serving

    # -- commands

    def before(self) -> None:
        """Untraced run: the RSS before the clients connect."""
        gc.collect()
        self.rss_before = rss_kib()
        self.answer(done="before")

    def after(self) -> None:
        gc.collect()
        self.answer(done="after", rss_kib=rss_kib() - self.rss_before)

    def trace_before(self) -> None:
        """Traced run: the census, then tracing starts."""
        self._keep("before.json", census())
        tracemalloc.start(self.trace_depth)
        self.answer(done="trace-before")

    def trace_after(self) -> None:
        """Traced run: the snapshot, then the census (the tables are made later, off the clock)."""
        gc.collect()
        snapshot = tracemalloc.take_snapshot()
        tracemalloc.stop()
        snapshot.dump(os.path.join(self.workdir, "after.snapshot"))
        del snapshot
        self._keep("after.json", census())
        self.answer(done="trace-after")

    def report(self) -> None:
        snapshot_path = os.path.join(self.workdir, "after.snapshot")
        sites = heap_sites(tracemalloc.Snapshot.load(snapshot_path))
        os.unlink(snapshot_path)
        before, after = self._take("before.json"), self._take("after.json")
        types = []
        for name in set(after) | set(before):
            count = after.get(name, [0, 0])[0] - before.get(name, [0, 0])[0]
            size = after.get(name, [0, 0])[1] - before.get(name, [0, 0])[1]
            if count or size:
                types.append({"type": name, "objects": count, "bytes": size})
        os.rmdir(self.workdir)
        self.answer(done="report", sites=sites, types=types)

    def _keep(self, name: str, data: dict[str, list[int]]) -> None:
        with open(os.path.join(self.workdir, name), "w") as out:
            json.dump(data, out)

    def _take(self, name: str) -> dict[str, list[int]]:
        path = os.path.join(self.workdir, name)
        with open(path) as saved:
            data: dict[str, list[int]] = json.load(saved)
        os.unlink(path)
        return data


def child_main(argv: list[str]) -> None:
    reply_fd, depth, event_loop, log_level = int(argv[0]), int(argv[1]), argv[2], argv[3]
    from broker.daemon import run_on_event_loop

    run_on_event_loop(Child(reply_fd, depth, log_level).run(), event_loop)


# -- the parent: clients and the report ----------------------------------------------------------


class Measured:
    """One child process and the channel to it."""

    def __init__(self, args: argparse.Namespace, logdir: str, name: str, *, traced: bool) -> None:
        read_fd, write_fd = os.pipe()
        child_args = [str(args.depth if traced else 0), args.event_loop, args.log_level]
        self.log_path = os.path.join(logdir, f"{name}.log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "--child", str(write_fd), *child_args],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(write_fd,),
                cwd=ROOT,
                env={k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "WEBSOCKET_"))},
            )
        os.close(write_fd)
        self.replies = os.fdopen(read_fd)
        hello = self.receive()
        self.port: int = hello["port"]
        self.loop: str = hello["loop"]

    def receive(self) -> dict[str, Any]:
        line = self.replies.readline()
        if not line:
            raise RuntimeError(f"the measured daemon exited ({self.proc.poll()}); see {self.log_path}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        return await asyncio.get_running_loop().run_in_executor(None, self.receive)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def open_clients(port: int, sessions: list[str], count: int, parallel: int = 50) -> list[Any]:
    """`count` clients spread over `sessions`, each greeted."""
    from tornado.websocket import websocket_connect

    limit = asyncio.Semaphore(parallel)

    async def one(i: int) -> Any:
        async with limit:
            conn = await asyncio.wait_for(
                websocket_connect(f"ws://127.0.0.1:{port}/ws?session_id={sessions[i % len(sessions)]}&replay=none"),
                30,
            )
            greeting = json.loads(await asyncio.wait_for(conn.read_message(), 30))
            if greeting.get("type") != "connected":
                raise RuntimeError(f"client {i}: greeted with {greeting}")
            return conn

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def publish_to_each(port: int, sessions: list[str], n: int) -> None:
    from tornado.httpclient import AsyncHTTPClient

    client = AsyncHTTPClient()
    for session in sessions:
        body = json.dumps([{"type": "footprint.tick", "i": n}])
        response = await client.fetch(
            f"http://127.0.0.1:{port}/api/sessions/{session}/events", method="POST", body=body,
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        if response.code != 202:
            raise RuntimeError(f"publish to {session}: {response.code}")


async def expect_tick(clients: list[Any], n: int) -> None:
    """Every client gets tick `n` (and nothing but keepalives in between)."""

    async def one(conn: Any) -> None:
        while True:
            raw = await asyncio.wait_for(conn.read_message(), 30)
            if raw is None:
                raise RuntimeError("a measured connection was closed by the server")
            message = json.loads(raw)
            if message.get("type") == "footprint.tick" and message.get("data", message).get("i", n) == n:
                return

    await asyncio.gather(*(one(c) for c in clients))


async def measure(args: argparse.Namespace, child: Measured, traced: bool) -> dict[str, Any]:
    sessions = [f"fp-{i}" for i in range(args.sessions)]
    warm = await open_clients(child.port, sessions, len(sessions))
    await publish_to_each(child.port, sessions, 0)
    await expect_tick(warm, 0)
    await asyncio.sleep(1.0)  # the publish's follow-ups (flush callbacks, timers) settle
    await child.ask("trace-before" if traced else "before")
    clients = await open_clients(child.port, sessions, args.connections)
    await asyncio.sleep(args.settle)
    result = await child.ask("trace-after" if traced else "after")
    await publish_to_each(child.port, sessions, 1)
    try:
        await expect_tick(warm + clients, 1)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}; the daemon's log: {child.log_path} (--log-level info says why)") from None
    for conn in warm + clients:
        conn.close()
    return await child.ask("report") if traced else result


def report(args: argparse.Namespace, loop: str, rss: float | None, traced: dict[str, Any] | None) -> str:
    import tornado

    n = args.connections
    lines = [
        f"footprint: {n} idle WebSocket connections over {args.sessions} sessions (/ws?session_id=...&replay=none); "
        f"Python {sys.version.split()[0]}, tornado {tornado.version}, loop {loop}",
    ]
    if rss is not None:
        lines.append(f"RSS (untraced daemon): {rss:.1f} KiB per connection")
    if traced is None:
        return "\n".join(lines)
    sites = sorted(traced["sites"], key=lambda s: -s["bytes"])
    heap = sum(s["bytes"] for s in sites)
    blocks = sum(s["blocks"] for s in sites)
    lines.append(f"Python heap (tracemalloc): {heap / n / 1024:.2f} KiB and {blocks / n:.1f} blocks per connection")
    lines.append("")
    lines.append(
        f"Top {args.top} allocation sites (innermost frame; via: the nearest frame in actors/, broker/, handlers/)"
    )
    lines.append(f"{'bytes/conn':>10} {'blocks':>7}  site")
    for s in sites[: args.top]:
        via = f"  [via {s['via']}]" if s["via"] else ""
        lines.append(f"{s['bytes'] / n:10.0f} {s['blocks'] / n:7.2f}  {s['site']}{via}")
    types = sorted(traced["types"], key=lambda t: -t["bytes"])
    total = sum(t["bytes"] for t in types)
    lines.append("")
    lines.append(
        f"Top {args.top} types (gc census, sys.getsizeof; '<- X': held by an X): "
        f"{total / n / 1024:.2f} KiB per connection in all"
    )
    lines.append(f"{'bytes/conn':>10} {'objs':>7}  type")
    for t in types[: args.top]:
        lines.append(f"{t['bytes'] / n:10.0f} {t['objects'] / n:7.2f}  {t['type']}")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    logdir = tempfile.mkdtemp(prefix="footprint-")
    rss: float | None = None
    traced: dict[str, Any] | None = None
    loop = "?"
    if not args.no_rss:
        child = Measured(args, logdir, "rss", traced=False)
        try:
            loop = child.loop
            rss = (await measure(args, child, traced=False))["rss_kib"] / args.connections
        finally:
            child.close()
    if not args.no_trace:
        child = Measured(args, logdir, "traced", traced=True)
        try:
            loop = child.loop
            traced = await measure(args, child, traced=True)
        finally:
            child.close()
    print(report(args, loop, rss, traced))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {"connections": args.connections, "loop": loop, "rss_kib_per_connection": rss, **(traced or {})}, out
            )
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--connections", type=int, default=2000, help="idle clients measured (default 2000)")
    parser.add_argument("--sessions", type=int, default=20, help="sessions they spread over (default 20)")
    parser.add_argument("--top", type=int, default=25, help="rows per table (default 25)")
    parser.add_argument("--depth", type=int, default=30, help="tracemalloc frames kept per allocation (default 30)")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds between the last greeting and the reading")
    parser.add_argument(
        "--event-loop", default="asyncio", choices=("auto", "asyncio", "uvloop"), help="the daemon's loop"
    )
    parser.add_argument(
        "--log-level", default="warning", choices=("debug", "info", "warning", "error"),
        help="the daemon's log level (its log files are named if a run fails)",
    )  # fmt: skip
    parser.add_argument("--no-rss", action="store_true", help="skip the untraced RSS run")
    parser.add_argument("--no-trace", action="store_true", help="skip the traced run (RSS only)")
    parser.add_argument("--json", metavar="PATH", help="also write the raw tables here")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
