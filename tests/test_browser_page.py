"""The live page (`/`) in headless Chromium against a daemon process.

What a user sees: a simulated research run in the three panes (desktop,
mobile and dashboard filters) with every progress bar at 100 % and the
report; the viewers view with each viewer's acknowledged seq; a chat answer
streaming into the chat box; the daemon restarted mid-run (memory backend:
a new epoch, shown as such); a broker that requires tokens refusing the page
with a sentence that says so, then accepting the token research start gives.
Screenshots of the end of a run go to the test's temporary directory.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.harness import Daemon, check_page, free_port, new_page

#: The simulated run (broker/research.py): start, plan, three tasks of 13
#: messages (started, 11 progress steps, completed), report, completion.
RUN_LENGTH = 43
LAPTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    process = Daemon(tmp_path_factory.mktemp("daemon"))
    yield process
    process.stop()


def until(page: Any, expression: str) -> None:
    """Wait for a condition in the page. As a function: the page's CSP forbids eval."""
    page.wait_for_function(f"() => ({expression})")


def pane(name: str) -> str:
    return f"[data-pane={name}]"


def seqs(page: Any, name: str) -> list[int]:
    items = page.locator(f"{pane(name)} .timeline li[data-seq]")
    return [int(s) for s in items.evaluate_all("els => els.map(e => e.dataset.seq)")]


def start_run(page: Any) -> str:
    page.click("#start")
    until(page, "document.querySelectorAll('.pane .state.connected').length === 3")
    return str(page.locator("#session-shown").text_content())


def test_a_research_run_streams_to_the_end_in_three_filtered_panes(
    browser: Any, daemon: Daemon, tmp_path: Path
) -> None:
    page = new_page(browser, viewport=LAPTOP)
    page.goto(daemon.url("/"))
    session_id = start_run(page)
    assert session_id.startswith("r-")
    # Every bar reaches 100 % and turns "done" on task_completed; the report shows.
    page.wait_for_function(
        """() => {
          const tasks = [...document.querySelectorAll('[data-pane=desktop] .task')];
          return tasks.length === 3 && tasks.every(t => t.dataset.progress === '100' && t.classList.contains('done'))
            && document.querySelector('[data-pane=desktop] .report h4') !== null;
        }""",
        timeout=30_000,
    )
    until(page, f"document.querySelector('{pane('desktop')} .last-seq').textContent === '{RUN_LENGTH}'")
    desktop = page.locator(pane("desktop"))
    assert desktop.locator(".report h4").text_content() == "Research: How do actor systems handle back-pressure?"
    assert desktop.locator(".plan li").all_text_contents() == [
        "Search for sources",
        "Read and extract findings",
        "Write the report",
    ]
    assert desktop.locator(".task .task-percent").all_text_contents() == ["100 %"] * 3
    assert desktop.locator(".task .bar").evaluate_all("els => els.map(e => e.getAttribute('aria-valuenow'))") == [
        "100"
    ] * 3
    # The seed's demo: the same run through three filters, each with the session's own seq.
    assert seqs(page, "desktop") == list(range(1, RUN_LENGTH + 1))
    until(page, f"document.querySelector('{pane('dashboard')} .last-seq').textContent === '{RUN_LENGTH}'")
    assert seqs(page, "mobile") == [1, 15, 28, 41, 43]  # essential: start, three completions, end
    assert seqs(page, "dashboard") == [1, 2, 42, 43]  # planning: start, plan, report, end
    assert page.locator(f"{pane('mobile')} .task.done").count() == 3
    assert page.locator(f"{pane('dashboard')} .task").count() == 0  # no task events through this filter
    assert page.locator(f"{pane('dashboard')} .report h4").count() == 1
    assert page.locator(f"{pane('desktop')} .filter-echo").text_content() == '["*"]'
    page.screenshot(path=tmp_path / "run-laptop.png", full_page=True)
    page.set_viewport_size(PHONE)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"the page scrolls sideways at phone width ({width} px)"
    page.screenshot(path=tmp_path / "run-phone.png", full_page=True)

    # Who saw up to where: a second page lists the three viewers, each acked at the end.
    viewers = new_page(browser, viewport=LAPTOP)
    viewers.goto(daemon.url("/#viewers"))
    card = f"[data-session='{session_id}']"
    viewers.wait_for_function(
        f"""() => {{
          const cells = [...document.querySelectorAll("{card} td.acked")];
          return cells.length === 3 && cells.every(c => c.textContent === '{RUN_LENGTH}');
        }}"""
    )
    users = viewers.locator(f"{card} tbody tr td:nth-child(2)").all_text_contents()
    assert sorted(users) == ["dashboard", "desktop", "mobile"]
    viewers.screenshot(path=tmp_path / "viewers.png", full_page=True)
    for p in (page, viewers):
        check_page(p)
        p.context.close()


def test_the_chat_box_streams_an_answer(browser: Any, daemon: Daemon) -> None:
    page = new_page(browser, viewport=PHONE)
    page.goto(daemon.url("/"))
    page.fill("#session-id", "chat-page")
    page.click("#watch")
    until(page, "document.querySelectorAll('.pane .state.connected').length === 3")
    page.fill("#chat-input", "Is the page <b>safe</b>?")
    page.click("#chat-send")
    answer = page.locator("#chat-log .answer.complete")
    answer.wait_for()
    text = str(answer.text_content())
    assert text.startswith('Here is what I found about "Is the page <b>safe</b>?".')  # shown as text, not HTML
    assert page.locator("#chat-log b").count() == 0
    assert "(This answer comes from actor-broker's built-in demo agent.)" in text
    assert text.endswith("9 chunks, seq 11")
    assert seqs(page, "desktop") == list(range(1, 12))  # query_start, nine chunks, complete
    until(page, f"document.querySelector('{pane('mobile')} .last-seq').textContent === '11'")
    assert page.locator(f"{pane('mobile')} .timeline li").evaluate_all("els => els.map(e => e.dataset.type)") == [
        "complete"
    ]
    check_page(page)
    page.context.close()


def test_a_daemon_restart_mid_run_shows_the_new_epoch(browser: Any, tmp_path: Path) -> None:
    port = free_port()
    first = Daemon(tmp_path / "first", port=port)
    second = None
    try:
        page = new_page(browser, viewport=LAPTOP)
        page.goto(first.url("/"))
        start_run(page)
        until(page, f"Number(document.querySelector('{pane('desktop')} .last-seq').textContent) >= 6")
        assert first.terminate() == 0  # graceful: every client gets server_shutdown, then 1001
        page.wait_for_selector(f"{pane('desktop')} .state.reconnecting")
        assert "the broker is restarting" in str(page.locator(f"{pane('desktop')} .notes").text_content())
        second = Daemon(tmp_path / "second", port=port)
        # In memory, the session's history died with the process: a new epoch.
        page.wait_for_selector(f"{pane('desktop')} .notes li.gap >> text=epoch changed")
        page.wait_for_selector(f"{pane('desktop')} .state.connected")
        notes = page.locator(f"{pane('desktop')} .notes li").all_text_contents()
        assert "gap: from seq 1 on (epoch changed) lost" in notes
        assert page.locator(f"{pane('desktop')} .timeline li.divider").count() == 1
        assert page.locator(f"{pane('desktop')} .task").count() == 0  # the old run's view is cleared
        page.screenshot(path=tmp_path / "restarted.png", full_page=True)
        # The new incarnation is followed as usual.
        session_id = str(page.locator("#session-shown").text_content())
        second.publish(session_id, [{"type": "session_started", "query": "again"}])
        until(page, f"document.querySelector('{pane('desktop')} .last-seq').textContent === '1'")
        check_page(page)
        page.context.close()
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_a_missing_token_is_explained_and_research_start_provides_one(browser: Any, tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, jwt_secret="page-test-secret-" + "x" * 20)
    try:
        page = new_page(browser, viewport=LAPTOP)
        page.goto(daemon.url("/?session=locked"))
        page.wait_for_selector("#notice.error")
        message = str(page.locator("#notice").text_content())
        assert "A token is required" in message and "4001" in message
        assert page.locator(".pane .state.failed").count() == 3
        # research start answers with a token, and the panes use it.
        session_id = start_run(page)
        assert len(page.locator("#token").input_value()) > 20
        until(page, f"Number(document.querySelector('{pane('desktop')} .last-seq').textContent) >= 2")
        users = {c["user_id"] for c in daemon.session(session_id)["connections"]}
        assert users == {"page"}  # the token's subject
        check_page(page)
        page.context.close()
    finally:
        daemon.stop()
