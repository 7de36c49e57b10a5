"""What one `gc_thaw_interval` thaw costs: the full collection's pause per open connection.

    .venv/bin/python bench/thaw.py                # 1 000 and 5 000 idle connections
    .venv/bin/python bench/thaw.py --clients 20000

The broker runs in this process (broker.embed) with the daemon's GC set-up
(start-up objects frozen, GcPauses freezing survivors); the Node load
generator (bench/loadgen) opens the idle clients. With them open, the thaw
(unfreeze everything, collect it at once) is timed three times, and the
median is printed with the number of objects it walked.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.run import Loadgen, raise_nofile
from broker.config import Settings
from broker.embed import embedded_broker
from broker.gc_tuning import GcPauses, freeze_startup
from broker.logs import configure_logging


@dataclass
class _Target:
    """What Loadgen.start needs to know about a server."""

    port: int

    @property
    def ws_bases(self) -> list[str]:
        return [f"ws://127.0.0.1:{self.port}/ws/research/"]

    ws_query = "?replay=none"


async def measure(clients: int) -> tuple[float, int]:
    """(median thaw pause in seconds, objects frozen after it) with `clients` idle connections open."""
    settings = Settings(max_connections=clients + 10, max_connections_per_session=clients)
    async with embedded_broker(settings, host="127.0.0.1", port=0) as running:
        pauses = GcPauses(freeze_survivors=True).install()
        freeze_startup()
        sessions = [f"thaw-{i}" for i in range(50)]
        lg = await Loadgen.start(_Target(running.port), {"sessions": sessions, "perSession": clients // 50})
        try:
            await lg.expect("warm")
            lg.send(cmd="open")
            ready = await lg.expect("ready", timeout=300)
            assert ready["greeted"] == ready["clients"], ready
            times = []
            for _ in range(3):
                started = time.perf_counter()
                GcPauses.thaw()
                times.append(time.perf_counter() - started)
            frozen = gc.get_freeze_count()
        finally:
            await lg.close()
            pauses.uninstall()
            gc.unfreeze()
    return statistics.median(times), frozen


async def main(counts: list[int]) -> None:
    configure_logging("error")  # the thaw's own gc_pause warnings would interleave with the table
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores")
    print(f"{'connections':>12} {'thaw pause':>11} {'per connection':>15} {'objects walked':>15}")
    for clients in counts:
        pause, frozen = await measure(clients)
        print(f"{clients:>12,} {pause * 1000:>8.1f} ms {pause / clients * 1e6:>12.1f} µs {frozen:>15,}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, action="append", help="idle connections (repeatable)")
    args = parser.parse_args()
    raise_nofile()
    asyncio.run(main(args.clients or [1_000, 5_000]))
