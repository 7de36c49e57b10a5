"""Which browser origins may use the API and open WebSockets.

Default (no `allowed_origins`): the page's own origin and any localhost /
127.0.0.1 origin, so a local UI on another port works out of the box and a
random web page does not. A configured list replaces that default; the own
origin stays allowed; `["*"]` allows all.
"""

from __future__ import annotations

from urllib.parse import urlsplit

_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})


def origin_allowed(origin: str | None, request_host: str, allowed: tuple[str, ...]) -> bool:
    if not origin:
        return True  # not a browser: origins protect browsers only
    parts = urlsplit(origin.lower())
    if parts.netloc == request_host.lower():
        return True
    if allowed:
        return "*" in allowed or origin.rstrip("/").lower() in {a.rstrip("/").lower() for a in allowed}
    return parts.hostname in _LOCAL_HOSTS
