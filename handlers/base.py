"""What every HTTP handler shares: JSON answers, request ids, publisher auth."""

from __future__ import annotations

import hmac
import ipaddress
import uuid
from typing import Any

import orjson
import structlog
import tornado.web

from broker.core import Broker

log = structlog.get_logger("actor_broker.http")


class ApiHandler(tornado.web.RequestHandler):
    """Base for the JSON API. Errors are `{"error": ...}` with the right status."""

    broker: Broker

    def initialize(self, broker: Broker) -> None:
        self.broker = broker

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")
        incoming = self.request.headers.get("X-Request-ID", "")
        self.request_id = incoming[:128] if incoming else "r-" + uuid.uuid4().hex[:16]
        self.set_header("X-Request-ID", self.request_id)

    def send_json(self, status: int, body: Any) -> None:
        self.set_status(status)
        self.finish(orjson.dumps(body))

    def fail(self, status: int, error: str, **extra: Any) -> None:
        self.send_json(status, {"error": error, **extra})

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Tornado's own errors (405, 500, ...) as JSON too, with the request id."""
        reason = self._reason
        if status_code >= 500 and "exc_info" in kwargs:
            log.error("request_failed", request_id=self.request_id, exc_info=kwargs["exc_info"])
            reason = "internal server error"
        self.finish(orjson.dumps({"error": reason, "request_id": self.request_id}))

    def require_publisher(self) -> bool:
        """State-changing endpoints: a Bearer key when keys are set, else loopback only.

        Returns False after answering 401/403.
        """
        keys = self.broker.settings.api_keys
        if keys:
            header = self.request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token:
                self.set_header("WWW-Authenticate", 'Bearer realm="actor-broker"')
                self.fail(401, "an API key is required: send 'Authorization: Bearer KEY'")
                return False
            if not any(hmac.compare_digest(token.encode(), key.encode()) for key in keys):
                self.fail(403, "this API key is not accepted")
                return False
            return True
        if not _is_loopback(self.request.remote_ip):
            self.fail(
                403,
                "publishing is open to loopback clients only while no api_keys are configured; "
                "set api_keys in the configuration to publish from other hosts",
            )
            return False
        return True


def _is_loopback(address: str | None) -> bool:
    if not address:
        return False
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
