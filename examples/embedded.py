"""Embedding: the broker, an orchestrator and a client in one process.

    python examples/embedded.py [--port 8051]

An application that runs its own agents can host actor-broker in its
process instead of POSTing to a daemon: `async with embedded_broker(...)`
(`broker.embed`) serves it on the running loop, with the daemon's wire
protocol. Its orchestrator then publishes straight into the broker:

* `await broker.publish_events(...)` on the loop (validated; returns the seqs);
* `broker.emit(...)` from any other thread (fire-and-forget; order kept per thread).

A `broker.client.follow` stream, connected over the wire like any remote
client, prints what it gets.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import orjson

from broker import events
from broker.client import follow
from broker.core import Broker
from broker.embed import embedded_broker
from broker.logs import configure_logging

SESSION = "embedded-demo"


def worker(broker: Broker, task_id: str) -> None:
    """A blocking job on a worker thread: reports progress with the thread-safe emit()."""
    broker.emit(events.task_started(SESSION, task_id, title="Crunch numbers"))
    for progress in (0, 25, 50, 75, 100):
        time.sleep(0.05)  # the "work"
        broker.emit(events.task_progress(SESSION, task_id, progress, current_action=f"batch {progress // 25 + 1} of 5"))
    broker.emit(events.task_completed(SESSION, task_id, result=42))


async def orchestrator(broker: Broker) -> None:
    """A toy run: plan, one task on a worker thread, report, done."""
    seqs = await broker.publish_events(
        events.session_started(SESSION, query="What is 6 x 7?"),
        events.plan_generated(SESSION, plan={"steps": [{"task_id": "t1", "title": "Crunch numbers"}]}),
    )
    print(f"orchestrator: published session_started and plan_generated as seq {seqs}")
    await asyncio.get_running_loop().run_in_executor(None, worker, broker, "t1")
    await broker.publish_events(
        events.report_generated(SESSION, report={"answer": 42}),
        events.session_completed(SESSION, status="completed"),
    )


#: Fields every message has; the client prints the rest.
ENVELOPE = {"type", "session_id", "seq", "epoch", "timestamp", "event_id", "correlation_id"}


async def client(url: str) -> int:
    """Follow the session until session_completed, as any remote client would; return how many events came."""
    received = 0
    async with follow(url, SESSION, endpoint="research") as stream:
        assert stream.greeting is not None
        print(f"client: {stream.greeting['type']}")
        async for message in stream:
            if "seq" not in message:  # a broadcast or a gap notice
                print(f"client: {message['type']}")
                continue
            received += 1
            payload = {k: v for k, v in message.items() if k not in ENVELOPE}
            print(f"client: seq={message['seq']:<2} {message['type']:<17} {orjson.dumps(payload).decode()}")
            if message["type"] == "session_completed":
                break
    return received


async def main(port: int) -> None:
    configure_logging("warning")  # the broker's own log lines, warnings only
    async with embedded_broker(host="127.0.0.1", port=port) as running:
        # A client connected over the wire like any other (a later one would get the history: replay=all).
        following = asyncio.create_task(client(running.url))
        await orchestrator(running.broker)
        received = await asyncio.wait_for(following, 10)
    print(f"done: the client received {received} events")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8051, help="port for the in-process broker (default 8051)")
    asyncio.run(main(parser.parse_args().port))
