"""`GET` and `DELETE /api/sessions/{id}`."""

from __future__ import annotations

from handlers.base import ApiHandler


class SessionHandler(ApiHandler):
    async def get(self, session_id: str) -> None:
        info = await self.broker.describe_session(session_id)
        if info is None:
            self.fail(404, f"no session {session_id!r}")
            return
        self.send_json(200, info)

    async def delete(self, session_id: str) -> None:
        if not self.require_publisher():
            return
        if not await self.broker.delete_session(session_id):
            self.fail(404, f"no session {session_id!r}")
            return
        self.send_json(200, {"session_id": session_id, "deleted": True})
