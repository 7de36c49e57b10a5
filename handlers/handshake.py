"""The parameters of a follow handshake, shared by the WebSocket and SSE endpoints.

`/ws`, `/ws/research/{id}`, `/sse` and `/sse/research/{id}` take the same
parameters (docs/protocol.md sections 3.2 and 8) and must refuse a bad one
with the same words: the checks and their texts live here once. Each
transport renders a refusal its own way (a WebSocket close 1008, an HTTP 400
with `{"error": ..., "code": 1008}`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from actors.filters import FilterError, parse_events_param
from actors.wire import session_id_problem
from broker.tokens import TokenError, TokenVerifier, unverified_subject

__all__ = [
    "HANDSHAKE_ARGUMENTS",
    "HandshakeArguments",
    "HandshakeError",
    "claimed_user",
    "grant_token",
    "parse_handshake",
    "parse_last_seq",
]

REPLAY_MODES = frozenset({"all", "missed", "none"})
#: The query parameters a handshake reads (the token is each transport's own business).
HANDSHAKE_ARGUMENTS = ("session_id", "user_id", "events", "replay", "last_seq", "epoch")


class HandshakeError(ValueError):
    """A bad handshake parameter; its text is the refusal's reason (close 1008 / HTTP 400)."""


class HandshakeArguments:
    """Mixin for handshake handlers: query and path arguments decoded as UTF-8, a bad one remembered.

    Tornado's own answer to an argument that is not UTF-8 would be a 400 at
    the handshake or, for arguments first read later, a dropped socket; here
    it is refused like any bad parameter. A handler using this keeps
    `_undecodable` (None at first) in its own state (a WebSocket handler in
    its slots).
    """

    #: the first handshake argument that was not UTF-8 (see decode_argument)
    _undecodable: str | None

    def decode_argument(self, value: bytes, name: str | None = None) -> str:
        """Query and path arguments as text. One that is not UTF-8 is refused by the handshake
        with 1008, like any bad parameter. A token that is not UTF-8 reads as empty: a malformed
        token (4001 where tokens are required).
        """
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            if self._undecodable is None and name != "token":
                self._undecodable = name or "session_id"  # the only path argument is the session
            return ""


def parse_handshake(
    arguments: Mapping[str, str | None],
    session_id: str | None,
    *,
    presets: Mapping[str, Any],
    default_replay: str,
    undecodable: str | None = None,
) -> dict[str, Any]:
    """Check a handshake's parameters; the keyword arguments of `Broker.open_connection` they make.

    `arguments` maps each of HANDSHAKE_ARGUMENTS to its (last) query value or
    None; `session_id` is the raw session id (from the query or the path);
    `undecodable` names an argument that was not UTF-8. Raises HandshakeError
    with the text a client sees.
    """
    if undecodable is not None:
        raise HandshakeError(f"{undecodable} is not valid UTF-8")
    if not session_id:
        raise HandshakeError("session_id is required")
    problem = session_id_problem(session_id)
    if problem is not None:
        raise HandshakeError(problem)
    user_id = arguments.get("user_id") or None  # empty means absent
    if user_id is not None and len(user_id) > 128:
        raise HandshakeError("user_id must be at most 128 characters")
    try:
        event_filter = parse_events_param(arguments.get("events"), presets)
    except FilterError as exc:
        raise HandshakeError(str(exc)) from exc
    replay = arguments.get("replay") or default_replay
    if replay not in REPLAY_MODES:
        raise HandshakeError("replay must be all, missed or none")
    raw_last_seq = arguments.get("last_seq")
    last_seq = None if raw_last_seq is None else parse_last_seq(raw_last_seq, "last_seq")
    epoch = arguments.get("epoch") or None
    return {
        "session_id": session_id,
        "user_id": user_id,
        "event_filter": event_filter,
        "replay": replay,
        "last_seq": last_seq,
        "epoch": epoch,
    }


def parse_last_seq(raw: str, name: str) -> int:
    """A seq a client sends back: only digits, at most 64 of them."""
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 64:
        raise HandshakeError(f"{name} must be a non-negative integer")
    return int(raw)


def claimed_user(user_id: str | None, token: str | None, tokens: TokenVerifier) -> str | None:
    """The user a handshake claims, for the per-user limit (checked before the token is).

    The `user_id` parameter, or else, when tokens are required, the token's
    unverified `sub`.
    """
    if user_id:
        return user_id
    if tokens.required:
        return unverified_subject(token)
    return None


def grant_token(tokens: TokenVerifier, token: str | None, params: dict[str, Any]) -> None:
    """Where tokens are required: verify `token` for the handshake's session and user.

    Adds what `Broker.open_connection` needs to `params`: the token's user,
    its expiry and the check of a refresh token. Raises TokenError (4001 /
    4003) for a token that does not do.
    """
    if not tokens.required:
        return
    grant = tokens.verify(token, params["session_id"], params["user_id"])
    params["user_id"] = grant.user_id
    params["expires_at"] = grant.expires_at
    params["refresh"] = _refresher(tokens, params["session_id"], grant.user_id)


def _refresher(tokens: TokenVerifier, session_id: str, user_id: str) -> Callable[[str], float]:
    """The connection actor's check of a refresh token: same session, same user."""

    def refresh(token: str) -> float:
        try:
            return tokens.verify(token, session_id, user_id).expires_at
        except TokenError as exc:
            raise ValueError(exc.reason) from exc

    return refresh
