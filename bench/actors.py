"""Actor runtime micro-benchmark: one actor telling N others M messages.

    python bench/actors.py            # the full table (about a minute)
    python bench/actors.py --quick    # smaller N, for a smoke run

Each of the N receivers gets every one of the sender's M rounds, so a run
makes N * M deliveries. Printed per row: deliveries/s, the process RSS with
the actors alive, and for the loop runtime the time to start and to stop
all N actors (linear in N if registering and unregistering are O(1)).

Every row runs in a fresh subprocess so RSS figures do not leak from one
row into the next, `--repeat` times (default 5); the row shows the run with
the median deliveries/s; the rows take turns.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_loop(n: int, m: int) -> dict[str, Any]:
    from tornado.ioloop import IOLoop

    from actors.runtime import LoopActor, LoopDispatcher, install_dispatcher

    done = threading.Event()
    remaining = [n]

    class Receiver(LoopActor):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def on_receive(self, message: Any) -> None:
            self.count += 1
            if self.count == m:
                remaining[0] -= 1
                if not remaining[0]:
                    done.set()

    class Sender(LoopActor):
        def __init__(self, refs: list[Any]) -> None:
            super().__init__()
            self.refs = refs
            self.round = 0

        def on_receive(self, message: Any) -> None:
            payload = ("tick", self.round)
            for ref in self.refs:
                ref.tell(payload)
            self.round += 1
            if self.round < m:
                self.actor_ref.tell("next")

    result: dict[str, Any] = {"runtime": "loop", "actors": n, "messages": m}

    async def main() -> None:
        install_dispatcher(LoopDispatcher(IOLoop.current()))
        gc.collect()
        t0 = time.perf_counter()
        refs = [Receiver.start() for _ in range(n)]
        sender = Sender.start(refs)
        while any(ref.actor_inbox.queue for ref in refs[-1:]):  # let on_start run
            await _yield()
        result["start_s"] = time.perf_counter() - t0
        gc.collect()
        result["rss_mb"] = rss_mb()
        t0 = time.perf_counter()
        sender.tell("go")
        while not done.is_set():
            await _yield()
        elapsed = time.perf_counter() - t0
        result["deliveries_per_s"] = n * m / elapsed
        t0 = time.perf_counter()
        futures = [ref.stop(block=False) for ref in refs]
        futures.append(sender.stop(block=False))
        for future in futures:
            await future
        result["stop_s"] = time.perf_counter() - t0

    IOLoop.current().run_sync(main)
    return result


async def _yield() -> None:
    import asyncio

    await asyncio.sleep(0)


def run_threads(n: int, m: int) -> dict[str, Any]:
    import pykka

    done = threading.Event()
    lock = threading.Lock()
    remaining = [n]

    class Receiver(pykka.ThreadingActor):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def on_receive(self, message: Any) -> None:
            self.count += 1
            if self.count == m:
                with lock:
                    remaining[0] -= 1
                    if not remaining[0]:
                        done.set()

    class Sender(pykka.ThreadingActor):
        def __init__(self, refs: list[Any]) -> None:
            super().__init__()
            self.refs = refs

        def on_receive(self, message: Any) -> None:
            for r in range(m):
                payload = ("tick", r)
                for ref in self.refs:
                    ref.tell(payload)

    refs = [Receiver.start() for _ in range(n)]
    sender = Sender.start(refs)
    gc.collect()
    result: dict[str, Any] = {"runtime": "threading", "actors": n, "messages": m, "rss_mb": rss_mb()}
    t0 = time.perf_counter()
    sender.tell("go")
    done.wait()
    result["deliveries_per_s"] = n * m / (time.perf_counter() - t0)
    pykka.ActorRegistry.stop_all()
    return result


def child(runtime: str, n: int, m: int) -> None:
    result = run_loop(n, m) if runtime == "loop" else run_threads(n, m)
    print(json.dumps(result))


def run_child(runtime: str, n: int, m: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", runtime, str(n), str(m)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def all_runs(rows: list[tuple[str, int, int]], repeat: int) -> list[list[dict[str, Any]]]:
    """Every row `repeat` times, the rows taking turns (all rows, then all rows again).

    On a shared machine, neighbours slow the CPU by a third or more for
    seconds at a time; taking turns spreads that over both runtimes, and
    runs of the same turn can be compared with each other.
    """
    runs: list[list[dict[str, Any]]] = [[] for _ in rows]
    for _ in range(repeat):
        for i, (runtime, n, m) in enumerate(rows):
            runs[i].append(run_child(runtime, n, m))
    return runs


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return sorted(runs, key=lambda run: run["deliveries_per_s"])[len(runs) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller runs, for a smoke test")
    parser.add_argument(
        "--repeat",
        type=int,
        default=5,
        help="runs per row, each in a fresh process; the row shows their median (default: %(default)s)",
    )
    parser.add_argument("--child", nargs=3, metavar=("RUNTIME", "N", "M"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    if args.quick:
        rows = [("loop", 1_000, 50), ("loop", 10_000, 5), ("threading", 1_000, 5)]
    else:
        rows = [("loop", 1_000, 2_000), ("loop", 10_000, 200), ("loop", 100_000, 20), ("threading", 1_000, 100)]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores")
    header = f"{'runtime':<10} {'actors':>8} {'deliveries/s':>14} {'RSS MB':>8} {'start s':>8} {'stop s':>8}"
    print(header)
    print("-" * len(header))
    runs = all_runs(rows, max(1, args.repeat))
    results = [median_run(r) for r in runs]
    for (_runtime, n, _m), r in zip(rows, results, strict=True):
        start = f"{r['start_s']:.2f}" if "start_s" in r else "-"
        stop = f"{r['stop_s']:.2f}" if "stop_s" in r else "-"
        print(f"{r['runtime']:<10} {n:>8,} {r['deliveries_per_s']:>14,.0f} {r['rss_mb']:>8.1f} {start:>8} {stop:>8}")
    loop1k = next((r for r in runs if r[0]["runtime"] == "loop" and r[0]["actors"] == 1_000), None)
    thr1k = next((r for r in runs if r[0]["runtime"] == "threading"), None)
    if loop1k and thr1k:
        # Each turn's loop run against the same turn's threading run: the two
        # ran seconds apart, under the same neighbours.
        ratios = sorted(a["deliveries_per_s"] / b["deliveries_per_s"] for a, b in zip(loop1k, thr1k, strict=True))
        print(
            f"loop / threading at 1 000 actors: {statistics.median(ratios):.0f}x "
            f"(median of {len(ratios)} turns; each turn: " + ", ".join(f"{x:.0f}x" for x in ratios) + ")"
        )


if __name__ == "__main__":
    main()
