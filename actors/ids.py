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
_EPOCH_PREFIX = secrets.token_hex(4)
_epochs = itertools.count(secrets.randbits(32))


def new_request_id() -> str:
    """An id for an HTTP request that did not bring its own X-Request-ID."""
    return f"r-{_PREFIX}{next(_counter):012x}"


def new_epoch() -> str:
    """A fresh epoch for a session's history: never one a process made before, here or elsewhere.

    `e-` and 16 hex digits: 8 random per process start, then a counter (the
    Redis backend makes a candidate per publish call; a urandom read each was
    a system call per publish).
    """
    return f"e-{_EPOCH_PREFIX}{next(_epochs) & 0xFFFFFFFF:08x}"


def new_event_id() -> str:
    """An id for an event (event_id, correlation_id): `ev-` and hex digits."""
    return f"ev-{_PREFIX}{next(_counter):012x}"
