"""The simplest Tornado fan-out: the baseline actor-broker is measured against.

    python bench/baseline.py --port 8060

A dict of session -> set of WebSocket handlers. A publish assigns each event
the session's next `seq`, encodes it once and calls `write_message` on every
handler of the session, in the request handler, on the one IOLoop thread.
No actors, no history, no filters, no throttling, no queue limits, no logs.

It speaks just enough of actor-broker's wire protocol for bench/run.py to
drive both servers with the same load generator:

* `POST /api/sessions/{id}/events`: one event object or a JSON array
  -> 202 `{"accepted": n, "seq": [...]}`
* `GET /ws/research/{id}`: greets with `connection_established` (carrying the
  session's `last_seq`), then only live messages; what clients send is ignored
* `GET /healthz`, and `GET /stats` (connections, sessions, RSS) for the driver

`--drop-every N` makes it skip every Nth write (a self-check: bench/run.py
--inject-loss must then fail); without it the publish path is untouched.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource

import tornado.web
import tornado.websocket


class Session:
    __slots__ = ("handlers", "seq")

    def __init__(self) -> None:
        self.seq = 0
        self.handlers: set[FanoutSocket] = set()


SESSIONS: dict[str, Session] = {}


def session(session_id: str) -> Session:
    s = SESSIONS.get(session_id)
    if s is None:
        s = SESSIONS[session_id] = Session()
    return s


def _retrieve(future: asyncio.Future[None]) -> None:
    """A failed write (the client dropped its TCP connection) is no error here: on_close follows."""
    if not future.cancelled():
        future.exception()


class PublishHandler(tornado.web.RequestHandler):
    def post(self, session_id: str) -> None:
        body = json.loads(self.request.body)
        events = body if isinstance(body, list) else [body]
        s = session(session_id)
        seqs = []
        for event in events:
            s.seq += 1
            event["session_id"] = session_id
            event["seq"] = s.seq
            data = json.dumps(event)
            for handler in s.handlers:
                try:  # noqa: SIM105  (cheaper than contextlib.suppress on the hot path)
                    # A write to a stream that closes meanwhile fails its future later:
                    # retrieved here, or asyncio logs "Task exception was never retrieved".
                    handler.write_message(data).add_done_callback(_retrieve)
                except tornado.websocket.WebSocketClosedError:
                    pass  # on_close removes it
            seqs.append(s.seq)
        self.set_status(202)
        self.finish({"accepted": len(events), "seq": seqs})


class LossyPublishHandler(PublishHandler):
    """PublishHandler that skips every `drop_every`th write: the bench must notice and fail."""

    drop_every = 0
    writes = 0

    def post(self, session_id: str) -> None:
        body = json.loads(self.request.body)
        events = body if isinstance(body, list) else [body]
        s = session(session_id)
        seqs = []
        for event in events:
            s.seq += 1
            event["session_id"] = session_id
            event["seq"] = s.seq
            data = json.dumps(event)
            for handler in s.handlers:
                LossyPublishHandler.writes += 1
                if LossyPublishHandler.writes % self.drop_every:
                    handler.write_message(data).add_done_callback(_retrieve)
            seqs.append(s.seq)
        self.set_status(202)
        self.finish({"accepted": len(events), "seq": seqs})


class FanoutSocket(tornado.websocket.WebSocketHandler):
    def check_origin(self, origin: str) -> bool:
        return True

    def open(self, session_id: str) -> None:
        self.session = session(session_id)
        self.session.handlers.add(self)
        self.write_message(
            json.dumps({"type": "connection_established", "session_id": session_id, "last_seq": self.session.seq})
        )

    def on_message(self, message: str | bytes) -> None:
        pass

    def on_close(self) -> None:
        self.session.handlers.discard(self)


class HealthHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.finish({"status": "ok"})


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class StatsHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.finish(
            {
                "active_connections": sum(len(s.handlers) for s in SESSIONS.values()),
                "active_sessions": len(SESSIONS),
                "rss_kib": rss_kib(),
            }
        )


def make_app(drop_every: int = 0) -> tornado.web.Application:
    LossyPublishHandler.drop_every = drop_every
    return tornado.web.Application(
        [
            (r"/healthz", HealthHandler),
            (r"/stats", StatsHandler),
            (r"/api/sessions/([^/]+)/events", LossyPublishHandler if drop_every else PublishHandler),
            (r"/ws/research/([^/]+)", FanoutSocket),
        ]
    )


async def main(host: str, port: int, drop_every: int) -> None:
    make_app(drop_every).listen(port, host)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8060)
    parser.add_argument("--drop-every", type=int, default=0, help="skip every Nth write (a self-check of the bench)")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(main(args.host, args.port, args.drop_every))
