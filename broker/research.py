"""Research runs started with `POST /api/research/start`.

With `research_upstream_url` set, the start is forwarded there (the real
research service then publishes into the session). Without it, a
`SimulatedResearch` actor plays a whole run (plan, three tasks with
progress, report, completion) at a readable pace, so a newcomer sees the
full flow with nothing else running. It paces itself with its actor clock,
so tests drive it with the manual clock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
import structlog
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from actors.runtime import LoopActor
from broker.validation import normalize_events

if TYPE_CHECKING:
    from collections.abc import Callable

log = structlog.get_logger("actor_broker.research")

TASKS = (
    ("t1", "Search for sources"),
    ("t2", "Read and extract findings"),
    ("t3", "Write the report"),
)


def simulated_run(query: str) -> list[tuple[float, dict[str, Any]]]:
    """The steps of a simulated run: (seconds after the previous step, event)."""
    steps: list[tuple[float, dict[str, Any]]] = [
        (
            0.6,
            {
                "type": "plan_generated",
                "plan": {"query": query, "steps": [{"task_id": t, "title": title} for t, title in TASKS]},
            },
        )
    ]
    for task_id, title in TASKS:
        steps.append((0.4, {"type": "task_started", "task_id": task_id, "title": title}))
        for progress in range(0, 101, 10):
            action = f"{title.lower()}: step {progress // 10 + 1} of 11"
            steps.append(
                (0.25, {"type": "task_progress", "task_id": task_id, "progress": progress, "current_action": action})
            )
        steps.append((0.2, {"type": "task_completed", "task_id": task_id, "result": f"{title} done"}))
    steps.append(
        (
            0.5,
            {
                "type": "report_generated",
                "report": {
                    "title": f"Research: {query[:120]}",
                    "summary": "A simulated report from actor-broker's built-in research run.",
                    "sections": [title for _, title in TASKS],
                },
            },
        )
    )
    steps.append((0.3, {"type": "session_completed", "status": "completed"}))
    return steps


class _Step:
    __slots__ = ()


_STEP = _Step()


class SimulatedResearch(LoopActor):
    """Publishes a simulated run into one session, then stops."""

    def __init__(self, publish: Callable[[list[dict[str, Any]]], bool], session_id: str, query: str) -> None:
        super().__init__()
        #: publishes into the session in call order; False once the session is gone
        self.publish = publish
        self.session_id = session_id
        self.steps = simulated_run(query)
        self.next = 0

    def on_start(self) -> None:
        self.tell_later(self.steps[0][0], _STEP)

    def on_receive(self, message: Any) -> None:
        if message is not _STEP:
            return
        _, event = self.steps[self.next]
        events = normalize_events([event], session_id=self.session_id, now=self.clock.time())
        if not self.publish(events):
            self.stop()  # the session was deleted: the run ends with it
            return
        self.next += 1
        if self.next < len(self.steps):
            self.tell_later(self.steps[self.next][0], _STEP)
        else:
            self.stop()


async def forward_to_upstream(url: str, session_id: str, query: str, user_id: str | None) -> str | None:
    """POST the start to the research service; return an error text, or None if it took it."""
    try:
        await AsyncHTTPClient().fetch(
            HTTPRequest(
                url,
                method="POST",
                headers={"Content-Type": "application/json"},
                body=orjson.dumps({"session_id": session_id, "query": query, "user_id": user_id}),
                connect_timeout=5,
                request_timeout=15,
            )
        )
    except Exception as exc:  # noqa: BLE001 - reported to the session's clients as an error event
        log.warning("research_upstream_failed", session_id=session_id, error=str(exc))
        return f"the research service did not take the start: {exc}"
    return None
