"""The route table: every URL the daemon answers, and the handler behind it."""

from __future__ import annotations

import tornado.routing
import tornado.web

from broker.core import Broker
from broker.logs import log_request
from broker.metrics import broker_registry
from handlers.base import ApiHandler
from handlers.body import SmallBody
from handlers.fast_publish import PublishApplication
from handlers.health import HealthzHandler, ReadyzHandler
from handlers.metrics import MetricsHandler
from handlers.publish import PublishHandler, SmallPublishHandler
from handlers.research import BroadcastHandler, ResearchStartHandler
from handlers.sessions import SessionHandler
from handlers.sse import EventStreamHandler, ResearchEventStreamHandler
from handlers.static import StaticHandler, static_routes
from handlers.stats import StatsHandler
from handlers.ws import BrokerWebSocket, ResearchWebSocket
from handlers.ws_publish import PublishWebSocket

#: The server's limit on a request body read whole: GET and DELETE (which need
#: none) and the small publish bodies that `SmallBody` routes to a buffered
#: handler. Every other POST streams its body and raises the limit per request
#: to answer an oversize body with a 413 (handlers/body.py).
SERVER_MAX_BODY = 64 * 1024


@tornado.web.stream_request_body  # answered before any body is read
class NotFoundHandler(ApiHandler):
    def prepare(self) -> None:
        self.fail(404, f"no such endpoint: {self.request.path}")


def make_app(broker: Broker) -> tornado.web.Application:

    deps = {"broker": broker}
    session_events = r"/api/sessions/([^/]+)/events"
    # Tornado tries the rules in order, one regex each: publishing (the hot
    # path) comes first, then the WebSocket and SSE handshakes. No two paths overlap.
    # Every route is behind the allowed_hosts check (421), WebSocket and SSE handshakes too.
    # The plain publishes are answered before any of this (handlers/fast_publish.py); the rest,
    # refusals included, by the handlers below.
    return PublishApplication(
        [
            tornado.routing.Rule(SmallBody(session_events, broker, SERVER_MAX_BODY), SmallPublishHandler, deps),
            (session_events, PublishHandler, deps),
            tornado.routing.Rule(SmallBody(r"/api/events", broker, SERVER_MAX_BODY), SmallPublishHandler, deps),
            (r"/api/events", PublishHandler, deps),
            (r"/ws/publish", PublishWebSocket, deps),
            (r"/ws/research/([^/]+)", ResearchWebSocket, deps),
            (r"/ws", BrokerWebSocket, deps),
            (r"/sse/research/([^/]+)", ResearchEventStreamHandler, deps),
            (r"/sse", EventStreamHandler, deps),
            (r"/ws/health", StatsHandler, deps),
            (r"/healthz", HealthzHandler, deps),
            (r"/readyz", ReadyzHandler, deps),
            (r"/metrics", MetricsHandler, {**deps, "registry": broker_registry(broker)}),
            (r"/api/websocket/stats", StatsHandler, deps),
            (r"/api/research/start", ResearchStartHandler, deps),
            (r"/api/broadcast", BroadcastHandler, deps),
            (r"/api/sessions/([^/]+)", SessionHandler, deps),
            # The live page and the browser client (handlers/static.py).
            *((route, StaticHandler, {**deps, "file": file}) for route, file in static_routes()),
        ],
        broker=broker,
        server_max_body=SERVER_MAX_BODY,
        default_handler_class=NotFoundHandler,
        default_handler_args=deps,
        log_function=log_request,
        # Pings are sent by the connection actors (one timer per connection
        # for pings and keepalives), not by a Tornado task per connection.
        websocket_ping_interval=0,
    )
