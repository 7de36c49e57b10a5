"""`POST /api/research/start` and `POST /api/broadcast`."""

from __future__ import annotations

import uuid
from typing import Any

from actors.wire import TYPE_PATTERN, TYPE_RE, session_id_problem
from broker.validation import (
    BadRequest,
    UnsupportedMediaType,
    ValidationFailed,
    nesting_problems,
    parse_body,
)
from handlers.body import StreamedBodyHandler


class JsonObjectHandler(StreamedBodyHandler):
    """Reads a single JSON object body; answers 400/401/403/413/415 itself."""

    def read_object(self) -> dict[str, Any] | None:
        body = self.accepted_body()
        if body is None:
            return None
        try:
            items = parse_body(body, self.request.headers.get("Content-Type"))
        except (BadRequest, UnsupportedMediaType) as exc:
            self.fail(exc.status, str(exc))
            return None
        if len(items) != 1 or not isinstance(items[0], dict) or body.lstrip()[:1] != b"{":
            self.fail(400, "the body must be one JSON object")
            return None
        return items[0]

    def reject(self, details: list[dict[str, Any]]) -> None:
        exc = ValidationFailed(details)
        self.fail(422, str(exc), details=exc.details)


class ResearchStartHandler(JsonObjectHandler):
    async def post(self) -> None:
        body = self.read_object()
        if body is None:
            return
        details = []
        query = body.get("query")
        if not isinstance(query, str) or not query.strip():
            details.append({"index": 0, "field": "query", "error": "query must be a non-empty string"})
        user_id = body.get("user_id")
        if user_id is not None and (not isinstance(user_id, str) or not 0 < len(user_id) <= 128):
            details.append({"index": 0, "field": "user_id", "error": "user_id must be a string of 1 to 128 characters"})
        session_id = body.get("session_id")
        if session_id is not None and (problem := session_id_problem(session_id)) is not None:
            details.append({"index": 0, "field": "session_id", "error": problem})
        if details or not isinstance(query, str):  # a query that is not a string is in `details`
            self.reject(details)
            return
        if session_id is None:
            session_id = "r-" + uuid.uuid4().hex[:16]
        elif not await self.broker.claim_session(session_id):
            self.fail(409, f"session {session_id!r} already exists")
            return
        refusal = self.broker.admit_sessions([session_id])
        if refusal is not None:
            self.fail(503, refusal)
            return
        await self.broker.start_research(session_id, query, user_id)
        scheme = "wss" if self.request.protocol == "https" else "ws"
        answer = {
            "session_id": session_id,
            "ws_url": f"{scheme}://{self.request.host}/ws/research/{session_id}",
            "status": "started",
        }
        token = self.broker.tokens.mint(user_id or "anonymous", [session_id])
        if token is not None:
            answer["token"] = token
        self.send_json(201, answer)


class BroadcastHandler(JsonObjectHandler):
    async def post(self) -> None:
        body = self.read_object()
        if body is None:
            return
        details = []
        mtype = body.get("type", "system_notification")
        if not isinstance(mtype, str) or not TYPE_RE.match(mtype):
            details.append({"index": 0, "field": "type", "error": f"type must match {TYPE_PATTERN}"})
        if mtype == "system_notification" and not isinstance(body.get("message"), str):
            details.append({"index": 0, "field": "message", "error": "message must be a string"})
        exclude = body.get("exclude", [])
        if not isinstance(exclude, list) or not all(isinstance(e, str) for e in exclude):
            details.append({"index": 0, "field": "exclude", "error": "exclude must be a list of session ids"})
        for reserved in ("seq", "epoch"):
            if reserved in body:
                details.append({"index": 0, "field": reserved, "error": f"{reserved} is reserved"})
        # Deeper than the writer takes would be a 500 when the message is written.
        details += [{"index": 0, "field": field, "error": error} for field, error in nesting_problems(body)]
        if details:
            self.reject(details)
            return
        message = {k: v for k, v in body.items() if k != "exclude"}
        message["type"] = mtype
        self.send_json(202, await self.broker.broadcast(message, frozenset(exclude)))
