"""The Python client: follow a session, publish into it, ask its agent.

On the project's own dependencies (Tornado's WebSocket and HTTP clients,
orjson), for scripts, services and tests that talk to a broker over the wire::

    from broker.client import Publisher, follow

    async with follow("http://127.0.0.1:8050", "s1") as stream:
        async for message in stream:      # every session message once, in seq order
            ...

    async with Publisher("http://127.0.0.1:8050") as publisher:
        await publisher.publish("s1", {"type": "task_started", "task_id": "t1"})

docs/clients.md describes every option and what the client does on each
kind of drop.
"""

from broker.client.backoff import Backoff
from broker.client.errors import (
    ClientError,
    ConnectionLostError,
    GaveUpError,
    PublishError,
    QueryBusyError,
    QueryError,
    RejectedError,
    RequestError,
)
from broker.client.publisher import Publisher
from broker.client.query import Answer
from broker.client.stream import Disconnect, Gap, Stream, follow
from broker.client.ws_publisher import WebSocketPublisher

__all__ = [
    "Answer",
    "Backoff",
    "ClientError",
    "ConnectionLostError",
    "Disconnect",
    "Gap",
    "GaveUpError",
    "PublishError",
    "Publisher",
    "QueryBusyError",
    "QueryError",
    "RejectedError",
    "RequestError",
    "Stream",
    "WebSocketPublisher",
    "follow",
]
