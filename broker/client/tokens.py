"""When a token runs out: its `exp` claim, read without verifying (the broker verifies).

The client only needs the expiry to refresh in time (docs/protocol.md
section 3.6), so it decodes the JWT's payload itself instead of taking on a
JWT library; the signature is the broker's business.
"""

from __future__ import annotations

import base64
import binascii

import orjson

__all__ = ["refresh_delay", "token_expiry"]


def token_expiry(token: str) -> float | None:
    """The `exp` of a JWT in seconds since the epoch, or None if it has none (or is not a JWT)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = orjson.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return float(exp)


def refresh_delay(exp: float, now: float, *, ahead: float = 30.0) -> float:
    """Seconds from `now` until a token expiring at `exp` should be replaced.

    `ahead` seconds before it expires, or half-way through what is left when
    that is shorter, so a short-lived token is still refreshed in time.
    """
    left = exp - now
    return max(0.0, left - min(ahead, left / 2))
