"""An agent chat client: ask one question, print the answer as it streams.

    python examples/chat_client.py [--url http://127.0.0.1:8050] [--session ID] "your question"

Connects to `/ws?session_id=...&user_id=...`, sends a `query`, prints each
`chunk` inline as it arrives, and at `complete` checks that `full_response`
is exactly the chunks joined in order and that `total_chunks` counts them.
With `make run` the answer comes from the built-in demo agent. Exit code 1
on an `error`, a mismatch, or no `complete` within the timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from urllib.parse import urlencode

import orjson
from tornado.websocket import websocket_connect


async def ask(url: str, session_id: str, user_id: str, question: str, timeout: float) -> int:
    ws_base = "ws" + url.removeprefix("http")  # http -> ws, https -> wss
    # replay=none: this script only wants the answer to its own question, not what
    # the session buffered earlier (a chat UI would keep the default, replay=missed).
    query = urlencode({"session_id": session_id, "user_id": user_id, "replay": "none"})
    connection = await websocket_connect(f"{ws_base}/ws?{query}", connect_timeout=10)
    try:
        hello = orjson.loads(await asyncio.wait_for(connection.read_message(), timeout))
        print(f"{hello['type']}: session {hello['session_id']} as {hello['user_id']}")
        await connection.write_message(orjson.dumps({"type": "query", "query": question}).decode())
        chunks: list[str] = []
        query_id = None  # from our query_start; chunk, complete and error carry it too
        while True:
            raw = await asyncio.wait_for(connection.read_message(), timeout)
            if raw is None:
                print("\nthe server closed the connection", file=sys.stderr)
                return 1
            message = orjson.loads(raw)
            kind = message["type"]
            if kind == "error" and message.get("query_id") in (None, query_id):
                print(f"\nerror ({message.get('code')}): {message['error']}", file=sys.stderr)
                return 1
            if kind == "query_start" and query_id is None:
                query_id = message["query_id"]
                print(f"query_start (seq {message['seq']}, {query_id}): {message['query']!r}\n")
            elif query_id is None or message.get("query_id") != query_id:
                continue  # keepalive, or someone else's traffic in this session
            elif kind == "chunk":
                chunks.append(message["content"])
                print(message["content"], end="", flush=True)
            elif kind == "complete":
                return check(message, chunks)
    except TimeoutError:
        print(f"\nno complete within {timeout:g} s", file=sys.stderr)
        return 1
    finally:
        connection.close()


def check(complete: dict, chunks: list[str]) -> int:
    print(f"\n\ncomplete (seq {complete['seq']}): total_chunks={complete['total_chunks']}, received {len(chunks)}")
    if complete["full_response"] != "".join(chunks) or complete["total_chunks"] != len(chunks):
        print("MISMATCH: full_response is not the chunks joined", file=sys.stderr)
        return 1
    print(f"verified: full_response equals the {len(chunks)} chunks joined ({len(complete['full_response'])} chars)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("question", help="what to ask the agent")
    parser.add_argument("--url", default="http://127.0.0.1:8050", help="the broker's base URL")
    parser.add_argument("--session", default=None, help="session id (default: a new one)")
    parser.add_argument("--user", default="example-user", help="user id")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each message")
    args = parser.parse_args()
    session_id = args.session or "chat-" + uuid.uuid4().hex[:8]
    return asyncio.run(ask(args.url.rstrip("/"), session_id, args.user, args.question, args.timeout))


if __name__ == "__main__":
    sys.exit(main())
