"""The browser side: the live page (`/`, `/ui`) and the JS client (`/client/actor-broker.js`).

The files are package data under `broker/static/` and small, so each is read
once, when the application is made, and kept with its ETag by the route
table (the handler module holds no state); answers come from there: `Cache-Control:
no-cache` (a browser revalidates every use, so an upgraded daemon's client
reaches pages at once) and `304 Not Modified` when `If-None-Match` names the
current ETag. The JS client may be imported by pages on other origins that
`allowed_origins` admits (a module script is a CORS fetch), so its answer
carries the same CORS headers as the JSON API. The page gets a strict
Content-Security-Policy: it runs only its own scripts and connects only to
its own origin.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

import tornado.web

from broker.core import Broker
from handlers.base import RequestIdMixin
from handlers.origins import origin_allowed

#: (route, file under broker/static/) pairs.
STATIC_ROUTES = (
    (r"/", "ui/index.html"),
    (r"/ui/?", "ui/index.html"),
    (r"/ui/app\.js", "ui/app.js"),
    (r"/ui/app\.css", "ui/app.css"),
    (r"/client/actor-broker\.js", "actor-broker.js"),
)

#: For the HTML page only: no inline script or style, nothing from elsewhere.
PAGE_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


@dataclass(frozen=True, slots=True)
class StaticFile:
    """One file of `broker/static/`, as it is answered."""

    #: the file's bytes
    body: bytes
    #: the Content-Type header
    content_type: str
    #: a strong validator: the first 16 hex digits of the SHA-256 of `body`, quoted
    etag: str


def content_type(name: str) -> str:
    """The Content-Type of a shipped file, by its suffix."""
    if name.endswith(".js"):
        return "text/javascript; charset=utf-8"
    if name.endswith(".html"):
        return "text/html; charset=utf-8"
    if name.endswith(".css"):
        return "text/css; charset=utf-8"
    return "application/octet-stream"


def load_static(name: str) -> StaticFile:
    """`broker/static/<name>`, read now. Raises FileNotFoundError for a file not shipped."""
    body = (resources.files("broker") / "static" / name).read_bytes()
    etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
    return StaticFile(body, content_type(name), etag)


def static_routes() -> list[tuple[str, StaticFile]]:
    """(route, file) for the route table (broker/app.py): each file read once, when the app is made."""
    return [(route, load_static(name)) for route, name in STATIC_ROUTES]


def etag_matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110 13.1.2: a weak comparison against a list of entity tags, or `*`."""
    if if_none_match.strip() == "*":
        return True
    wanted = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == wanted for tag in if_none_match.split(","))


class StaticHandler(RequestIdMixin, tornado.web.RequestHandler):
    """GET / HEAD of one file of `broker/static/`, named by the route."""

    def initialize(self, broker: Broker, file: StaticFile) -> None:
        self.broker = broker
        self.file = file
        self.is_page = file.content_type.startswith("text/html")

    def set_default_headers(self) -> None:
        self.set_header("X-Request-ID", self._bind_request_id(bind_logs=False))

    def get(self) -> None:
        self._answer(include_body=True)

    def head(self) -> None:
        self._answer(include_body=False)

    def _answer(self, *, include_body: bool) -> None:
        file = self.file
        self.set_header("ETag", file.etag)
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Vary", "Origin")
        origin = self.request.headers.get("Origin")
        if origin and origin_allowed(origin, self.request.host, self.broker.settings.allowed_origins):
            self.set_header("Access-Control-Allow-Origin", origin)
        if self.is_page:
            self.set_header("Content-Security-Policy", PAGE_POLICY)
            self.set_header("Referrer-Policy", "no-referrer")
        if etag_matches(self.request.headers.get("If-None-Match", ""), file.etag):
            self.set_status(304)
            self.finish()
            return
        self.set_header("Content-Type", file.content_type)
        if include_body:
            self.finish(file.body)
        else:
            self.set_header("Content-Length", str(len(file.body)))
            self.finish()

    def compute_etag(self) -> str | None:
        """Ours is set explicitly; tornado's own (a hash per answer) is off."""
        return None
