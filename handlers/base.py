"""What every HTTP handler shares: JSON answers, request ids, publisher auth."""

from __future__ import annotations

import functools
import hmac
import ipaddress
import re
from types import TracebackType
from typing import Any

import orjson
import structlog
import tornado.web

from actors.ids import new_request_id
from broker.cluster.store import BackendUnavailable
from broker.core import Broker
from handlers.origins import origin_allowed

log = structlog.get_logger("actor_broker.http")

#: An incoming X-Request-ID is echoed (and logged) only if it looks like an id;
#: anything else (control characters, 200 bytes of text) gets a fresh one.
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")


class RequestIdMixin:
    """Every HTTP response, WebSocket handshakes included, carries X-Request-ID."""

    request: Any

    def _bind_request_id(self, *, bind_logs: bool = True) -> str:
        """The request's id, made once and bound to every log line of this request.

        Runs from `set_default_headers`, i.e. when tornado builds the handler,
        before it starts the task that runs `prepare` and the verb method: the
        binding is inherited by that task, so subclasses that override
        `prepare` without calling up (PublishHandler) are covered too. Tornado
        calls `set_default_headers` again for an error response; the id stays.
        """
        request_id: str | None = getattr(self, "request_id", None)
        if request_id is None:
            incoming = self.request.headers.get("X-Request-ID", "")
            request_id = incoming if _REQUEST_ID_RE.fullmatch(incoming) else new_request_id()
            self.request_id = request_id
            if bind_logs:
                structlog.contextvars.bind_contextvars(request_id=request_id)
        return request_id


class ApiHandler(RequestIdMixin, tornado.web.RequestHandler):
    """Base for the JSON API. Errors are `{"error": ...}` with the right status."""

    broker: Broker

    def initialize(self, broker: Broker) -> None:
        self.broker = broker
        self._allow_origin()

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("X-Request-ID", self._bind_request_id())
        if getattr(self, "broker", None) is not None:  # tornado calls this once before initialize()
            self._allow_origin()

    def _allow_origin(self) -> bool:
        """CORS: the same `allowed_origins` rule as WebSocket handshakes.

        An allowed browser origin is echoed back; any other gets no CORS
        headers, so the browser keeps the answer from the page.
        """
        origin = self.request.headers.get("Origin")
        self.set_header("Vary", "Origin")
        if origin is None or not origin_allowed(origin, self.request.host, self.broker.settings.allowed_origins):
            return False
        self.set_header("Access-Control-Allow-Origin", origin)
        self.set_header("Access-Control-Expose-Headers", "X-Request-ID")
        return True

    def options(self, *args: Any) -> None:
        """A CORS preflight: 204 for an allowed origin, 403 for any other."""
        if not self.request.headers.get("Origin") or not self._allow_origin():
            self.fail(403, "this origin may not use the API (see allowed_origins)")
            return
        self.set_header("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS")
        self.set_header("Access-Control-Allow-Headers", "Authorization, Content-Type, X-Request-ID")
        self.set_header("Access-Control-Max-Age", "600")
        self.set_status(204)
        self.finish()

    def on_finish(self) -> None:
        """The request is answered: its id must not stick to later lines of this task."""
        structlog.contextvars.unbind_contextvars("request_id")

    def send_json(self, status: int, body: Any) -> None:
        self.set_status(status)
        self.finish(orjson.dumps(body))

    def fail(self, status: int, error: str, **extra: Any) -> None:
        self.send_json(status, {"error": error, **extra})

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Tornado's own errors (405, 500, ...) as JSON too, with the request id.

        An uncaught exception's details stay in the log (`log_exception`, once);
        the client gets a generic reason and the id to quote.
        """
        reason = self._reason
        exc_info = kwargs.get("exc_info")
        if exc_info is not None and isinstance(exc_info[1], BackendUnavailable):
            self.set_status(503)  # docs/protocol.md section 7: the publisher retries with the same ids
            self.finish(orjson.dumps({"error": "backend unavailable"}))
            return
        if status_code >= 500 and exc_info is not None and not isinstance(exc_info[1], tornado.web.HTTPError):
            reason = "internal server error"
        self.finish(orjson.dumps({"error": reason, "request_id": self.request_id}))

    def log_exception(
        self,
        typ: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Log an uncaught exception once, as a structured event with the request id.

        Replaces tornado's "Uncaught exception" record (which would repeat the
        traceback in a second format); HTTPErrors are expected answers and keep
        tornado's one-line warning.
        """
        if isinstance(value, tornado.web.HTTPError):
            super().log_exception(typ, value, tb)
            return
        if isinstance(value, BackendUnavailable):  # an answer (503), not a bug: one line, no traceback
            log.warning("backend_unavailable", method=self.request.method, path=self.request.path, error=str(value))
            return
        log.error(
            "request_failed",
            method=self.request.method,
            path=self.request.path,
            request_id=self.request_id,
            exc_info=(typ, value, tb),
        )

    def require_publisher(self) -> bool:
        """State-changing endpoints: a Bearer key when keys are set, else loopback only.

        Returns False after answering 401/403.
        """
        refusal = self.publisher_refusal()
        if refusal is None:
            return True
        self.refuse(*refusal)
        return False

    def publisher_refusal(self) -> tuple[int, str] | None:
        """Why this request may not change state: (401 or 403, error text), or None if it may."""
        return publisher_refusal(
            self.broker.settings.api_keys, self.request.headers.get("Authorization", ""), self.request.remote_ip
        )

    def refuse(self, status: int, error: str) -> None:
        """Answer a refusal from `publisher_refusal` (or a 413), with the challenge a 401 needs."""
        if status == 401:
            self.set_header("WWW-Authenticate", 'Bearer realm="actor-broker"')
        self.fail(status, error)


def publisher_refusal(keys: tuple[str, ...], authorization: str, remote_ip: str | None) -> tuple[int, str] | None:
    """The publisher rule of every state-changing request: (401 or 403, error text), or None if it may.

    A Bearer key when `api_keys` are configured, else loopback only. A function,
    not only a method, because a publish WebSocket (handlers/ws_publish.py) is
    authorised by the same rule but is no ApiHandler.
    """
    if keys:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return 401, "an API key is required: send 'Authorization: Bearer KEY'"
        if not any(hmac.compare_digest(token.encode(), key.encode()) for key in keys):
            return 403, "this API key is not accepted"
        return None
    if not _is_loopback(remote_ip):
        return (
            403,
            "publishing is open to loopback clients only while no api_keys are configured; "
            "set api_keys in the configuration to publish from other hosts",
        )
    return None


@functools.lru_cache(maxsize=1024)
def _is_loopback(address: str | None) -> bool:
    """Cached: parsing the address is measurable on the publish path, and publishers are few."""
    if not address:
        return False
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
