"""WebSocket tokens: who may follow which session.

With `jwt_secret` (HS256) or `jwt_public_key` (RS256 / ES256) configured, a
WebSocket must present a JWT with `sub` (the user), `sessions` (a list of
session ids, or "*") and `exp`. Verification is PyJWT's; this module only
maps its outcomes onto the protocol's close codes: 4001 for absent,
malformed, badly signed or expired tokens, 4003 for a valid token that does
not cover this session or user.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jwt

from actors.wire import CloseCode
from broker.config import Settings


class TokenError(Exception):
    """Why a token is refused; `code` is the WebSocket close code."""

    def __init__(self, code: CloseCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Grant:
    user_id: str
    expires_at: float


class TokenVerifier:
    def __init__(self, settings: Settings) -> None:
        if settings.jwt_public_key:
            self.key: Any = settings.jwt_public_key
            self.algorithms = ["RS256", "ES256"]
        elif settings.jwt_secret:
            self.key = settings.jwt_secret
            self.algorithms = ["HS256"]
        else:
            self.key = None
            self.algorithms = []
        self._secret = settings.jwt_secret

    @property
    def required(self) -> bool:
        return self.key is not None

    def verify(self, token: str | None, session_id: str, user_id: str | None) -> Grant:
        """The grant a token gives for this session, or TokenError."""
        if not token:
            raise TokenError(CloseCode.UNAUTHORIZED, "a token is required")
        try:
            claims = jwt.decode(
                token, self.key, algorithms=self.algorithms, options={"require": ["exp", "sub", "sessions"]}
            )
        except jwt.ExpiredSignatureError as exc:
            raise TokenError(CloseCode.UNAUTHORIZED, "token expired") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise TokenError(CloseCode.UNAUTHORIZED, f"malformed token: no {exc.claim!r} claim") from exc
        except jwt.InvalidTokenError as exc:
            raise TokenError(CloseCode.UNAUTHORIZED, "invalid token") from exc
        sub, sessions, exp = claims["sub"], claims["sessions"], claims["exp"]
        if not isinstance(sub, str) or not sub:
            raise TokenError(CloseCode.UNAUTHORIZED, "malformed token: 'sub' must be a non-empty string")
        if sessions != "*" and not (isinstance(sessions, list) and all(isinstance(s, str) for s in sessions)):
            raise TokenError(CloseCode.UNAUTHORIZED, "malformed token: 'sessions' must be a list of ids or \"*\"")
        if not isinstance(exp, int | float):
            raise TokenError(CloseCode.UNAUTHORIZED, "malformed token: 'exp' must be a number")
        if sessions != "*" and session_id not in sessions:
            raise TokenError(CloseCode.FORBIDDEN, "token does not cover this session")
        if user_id is not None and user_id != sub:
            raise TokenError(CloseCode.FORBIDDEN, "token names another user")
        return Grant(sub, float(exp))

    def mint(self, user_id: str, sessions: list[str] | str, ttl: float = 3600.0) -> str | None:
        """A token for a new research session, when this broker holds a secret to sign with."""
        if not self._secret:
            return None
        claims = {"sub": user_id, "sessions": sessions, "exp": int(time.time() + ttl)}
        return jwt.encode(claims, self._secret, algorithm="HS256")


def unverified_subject(token: str | None) -> str | None:
    """The `sub` a token claims, unchecked: only for counting against per-user limits."""
    if not token:
        return None
    try:
        sub = jwt.decode(token, options={"verify_signature": False}).get("sub")
    except jwt.InvalidTokenError:
        return None
    return sub if isinstance(sub, str) else None


def looks_like_jwt(value: str) -> bool:
    parts = value.split(".")
    return len(parts) == 3 and all(parts)
