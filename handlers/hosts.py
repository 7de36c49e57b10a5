"""`allowed_hosts`: requests naming a host the broker does not serve get 421 (DNS rebinding).

A hostile page can point a name of its own at 127.0.0.1; the browser then
sends `Host: evil.example` to the local broker, and since that page's
`Origin` names the same host, it passes the same-origin rule. Refusing any
`Host` outside `allowed_hosts` closes that door (docs/protocol.md section 5, "Sockets", and section 6).

The check sits in the application's routing (`HostCheckedApplication.find_handler`),
so one check covers every route: the HTTP API, health and metrics, and the
WebSocket and Server-Sent Events handshakes, which are routed like any GET
before they upgrade. The list is read per request (a SIGHUP reload applies).

Matching follows what Django's `ALLOWED_HOSTS` users expect: the port is
ignored, case and a trailing dot too; `.example.com` matches `example.com`
and every subdomain; `*` matches any host. Empty (the default) checks
nothing. A request without a `Host` header is refused while a list is set.
"""

from __future__ import annotations

from typing import Any

import tornado.httputil
import tornado.web

from broker.core import Broker
from handlers.base import ApiHandler

__all__ = ["HostCheckedApplication", "MisdirectedHandler", "host_allowed", "request_hostname"]


def request_hostname(host: str | None) -> str | None:
    """The host name of a `Host` header: no port, lowercase, no trailing dot; None if unusable."""
    if not host:
        return None
    host = host.strip().lower()
    if host.startswith("["):  # [IPv6] or [IPv6]:port
        end = host.find("]")
        if end < 0:
            return None
        rest = host[end + 1 :]
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return None
        return host[1:end] or None
    name, colon, port = host.partition(":")
    if colon and not port.isdigit():
        return None
    name = name.removesuffix(".")
    return name or None


def _entry(pattern: str) -> str:
    """A configured entry in the form `request_hostname` gives (IPv6 without brackets)."""
    pattern = pattern.strip().lower()
    if pattern.startswith("[") and pattern.endswith("]"):
        return pattern[1:-1]
    return pattern.removesuffix(".") if pattern != "." else pattern


def host_allowed(host: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a request with this `Host` header may be served under `allowed` (empty: any)."""
    if not allowed:
        return True
    name = request_hostname(host)
    if name is None:
        return False
    for pattern in map(_entry, allowed):
        if pattern in ("*", name):
            return True
        if pattern.startswith(".") and (name == pattern[1:] or name.endswith(pattern)):
            return True
    return False


@tornado.web.stream_request_body  # answered before any body is read
class MisdirectedHandler(ApiHandler):
    """421 Misdirected Request, with the JSON error every refusal has."""

    def prepare(self) -> None:
        # Tornado closes the connection after this answer if a body was still
        # coming: a refused body is not worth reading.
        self.fail(421, "this server does not serve the host named in the Host header (see allowed_hosts)")

    def data_received(self, chunk: bytes) -> None:
        """Body bytes after the answer are dropped."""


class HostCheckedApplication(tornado.web.Application):
    """The broker's application: routes as given, behind the `allowed_hosts` check."""

    def __init__(self, handlers: Any, *, broker: Broker, **settings: Any) -> None:
        super().__init__(handlers, **settings)
        self.broker = broker

    def find_handler(
        self, request: tornado.httputil.HTTPServerRequest, **kwargs: Any
    ) -> tornado.web._HandlerDelegate:
        allowed = self.broker.settings.allowed_hosts
        if allowed and not host_allowed(request.headers.get("Host"), allowed):
            return self.get_handler_delegate(request, MisdirectedHandler, {"broker": self.broker})
        return super().find_handler(request, **kwargs)
