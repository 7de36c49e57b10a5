"""FastAPI on uvicorn[standard], written the way the seed systems are built: a peer bench/run.py measures.

    python bench/peer_fastapi.py --port 8062

This is the server a user who skipped actor-broker would write: a
ConnectionManager with a dict of session id -> list of WebSockets; a publish
request assigns each event the session's next `seq` and awaits `send_text`
on every connection of the session, one after the other, before it answers.
It runs under uvicorn with the `[standard]` extras (uvloop, httptools,
websockets), as such a service is deployed. No history, filters,
throttling, queue limits or logs beyond uvicorn's warnings.

It speaks the part of actor-broker's protocol that bench/baseline.py speaks,
so the same load generator and publisher drive it:

* `POST /api/sessions/{id}/events`: one event object or a JSON array
  -> 202 `{"accepted": n, "seq": [...]}`
* `GET /ws/research/{id}`: greets with `connection_established` (carrying the
  session's `last_seq`), then only live messages; what clients send is ignored
* `GET /healthz`, and `GET /stats` (connections, sessions, RSS) for the driver
"""

from __future__ import annotations

import argparse
import json
import resource
from typing import Any

import uvicorn
from fastapi import Body, FastAPI, WebSocket, WebSocketDisconnect


class ConnectionManager:
    """The seeds' connection manager: who is connected to which session, and each session's last seq."""

    def __init__(self) -> None:
        self.active: dict[str, list[WebSocket]] = {}
        self.seqs: dict[str, int] = {}

    async def connect(self, session_id: str, websocket: WebSocket) -> None:
        await websocket.accept()
        # Listed before the greeting is sent, in the same step as reading last_seq:
        # an event published meanwhile is sent after the greeting, never missed.
        self.active.setdefault(session_id, []).append(websocket)
        last_seq = self.seqs.get(session_id, 0)
        greeting = {"type": "connection_established", "session_id": session_id, "last_seq": last_seq}
        await websocket.send_text(json.dumps(greeting))

    def disconnect(self, session_id: str, websocket: WebSocket) -> None:
        connections = self.active.get(session_id, [])
        if websocket in connections:
            connections.remove(websocket)

    def next_seq(self, session_id: str) -> int:
        seq = self.seqs.get(session_id, 0) + 1
        self.seqs[session_id] = seq
        return seq

    async def send_to_session(self, session_id: str, message: str) -> None:
        for websocket in list(self.active.get(session_id, [])):
            try:
                await websocket.send_text(message)
            except Exception:  # a closed connection: drop it, as the seeds do
                self.disconnect(session_id, websocket)


manager = ConnectionManager()
app = FastAPI()


@app.post("/api/sessions/{session_id}/events", status_code=202)
async def publish(session_id: str, body: dict[str, Any] | list[dict[str, Any]] = Body(...)) -> dict[str, Any]:  # noqa: B008
    events = body if isinstance(body, list) else [body]
    seqs = []
    for event in events:
        seq = manager.next_seq(session_id)
        event["session_id"] = session_id
        event["seq"] = seq
        await manager.send_to_session(session_id, json.dumps(event))
        seqs.append(seq)
    return {"accepted": len(events), "seq": seqs}


@app.websocket("/ws/research/{session_id}")
async def research_socket(websocket: WebSocket, session_id: str) -> None:
    await manager.connect(session_id, websocket)
    try:
        while True:
            await websocket.receive_text()
    except WebSocketDisconnect:
        manager.disconnect(session_id, websocket)


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@app.get("/stats")
async def stats() -> dict[str, int]:
    return {
        "active_connections": sum(len(c) for c in manager.active.values()),
        "active_sessions": len(manager.active),
        "rss_kib": rss_kib(),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8062)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # The driver keeps one HTTP connection for /stats between rounds: a long keep-alive.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False, timeout_keep_alive=3600)
