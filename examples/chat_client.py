"""An agent chat client: ask one question, print the answer as it streams.

    python examples/chat_client.py [--url http://127.0.0.1:8050] [--session ID] "your question"

Follows the session with `broker.client.follow` (on
`/ws?session_id=...&user_id=...`), asks with `stream.query()`, prints each
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

from broker.client import ClientError, QueryError, follow


async def ask(url: str, session_id: str, user_id: str, question: str, timeout: float) -> int:
    try:
        async with asyncio.timeout(timeout):
            # replay=none: this script only wants the answer to its own question, not what
            # the session buffered earlier (a chat UI would use replay="missed").
            async with follow(url, session_id, user_id=user_id, replay="none") as stream:
                greeting = stream.greeting or {}
                print(f"{greeting.get('type')}: session {greeting.get('session_id')} as {greeting.get('user_id')}")
                answer = stream.query(question)
                async for chunk in answer:
                    if len(answer.chunks) == 1:  # query_start arrived just before the first chunk
                        start = answer.messages[0]
                        print(f"query_start (seq {start['seq']}, {answer.query_id}): {start['query']!r}\n")
                    print(chunk, end="", flush=True)
                return check(answer.messages[-1], answer.chunks)
    except QueryError as exc:  # an error message ended the answer, or busy
        print(f"\nerror ({exc.code}): {exc.error}", file=sys.stderr)
    except ClientError as exc:  # refused (a token, a bad parameter), or gave up connecting
        print(f"\n{exc}", file=sys.stderr)
    except TimeoutError:
        print(f"\nno complete within {timeout:g} s", file=sys.stderr)
    return 1


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
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the whole answer")
    args = parser.parse_args()
    session_id = args.session or "chat-" + uuid.uuid4().hex[:8]
    return asyncio.run(ask(args.url.rstrip("/"), session_id, args.user, args.question, args.timeout))


if __name__ == "__main__":
    sys.exit(main())
