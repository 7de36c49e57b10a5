"""Generated ids: a random prefix per process and a counter.

As unique as a uuid4 for every practical purpose (the prefix differs from
one process start to the next), at a fraction of the cost: publishing makes
two per event. Clients must treat ids as opaque strings.
"""

from __future__ import annotations

import itertools
import secrets

_PREFIX = secrets.token_hex(8)
_counter = itertools.count(1)


def new_request_id() -> str:
    """An id for an HTTP request that did not bring its own X-Request-ID."""
    return f"r-{_PREFIX}{next(_counter):012x}"


def new_epoch() -> str:
    """A fresh epoch for a session's history: random, so a restarted process never reuses one."""
    return "e-" + secrets.token_hex(8)


def new_event_id() -> str:
    """An id for an event (event_id, correlation_id): `ev-` and hex digits."""
    return f"ev-{_PREFIX}{next(_counter):012x}"
