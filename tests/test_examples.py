"""The examples in examples/ run, against a real daemon, and say what the README shows."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from actors.filters import parse_events_param
from broker.config import Settings
from broker.queries import DemoAgent
from broker.research import simulated_run

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
CLIENTS = {"desktop": "all", "mobile": "essential", "dashboard": "planning"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def daemon_url(tmp_path_factory):
    """`python -m broker serve` on a free port, up until /healthz answers; stopped afterwards."""
    port = free_port()
    log = (tmp_path_factory.mktemp("daemon") / "daemon.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "broker", "serve", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):  # up to 10 s
            if process.poll() is not None:
                pytest.fail(f"the daemon exited with {process.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=1) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                time.sleep(0.05)  # noqa: sleep - polling a separate process, bounded above
        else:
            pytest.fail("the daemon did not answer /healthz within 10 s")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def run_example(name: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )


def expected_counts() -> dict[str, Counter[str]]:
    """What each research client must receive: session_started plus the simulated run, through its filter.

    No progress event of the simulated run is throttled: each one names a new
    `current_action`, so every one is delivered.
    """
    types = ["session_started"] + [event["type"] for _, event in simulated_run("q")]
    presets = Settings().presets
    expected = {}
    for client, events in CLIENTS.items():
        event_filter = parse_events_param(events, presets)
        expected[client] = Counter(t for t in types if event_filter.admits(t))
    return expected


def test_the_three_research_clients_get_what_their_filters_admit(daemon_url):
    result = run_example("research_clients.py", "--url", daemon_url)
    assert result.returncode == 0, result.stderr

    expected = expected_counts()
    totals = {client: sum(counts.values()) for client, counts in expected.items()}
    assert totals == {"desktop": 43, "mobile": 5, "dashboard": 4}  # what the README shows
    assert f"counts: desktop={totals['desktop']} mobile={totals['mobile']} dashboard={totals['dashboard']}" in (
        result.stdout.splitlines()
    )
    # The table, per type: one row per type, one column per client.
    rows = dict(re.findall(r"^([a-z_]+) +(\d+ +\d+ +\d+)$", result.stdout, re.MULTILINE))
    for kind in {t for counts in expected.values() for t in counts}:
        assert [int(n) for n in rows[kind].split()] == [expected[c][kind] for c in CLIENTS], kind
    assert rows["connection_established"].split() == ["1", "1", "1"]
    for client in CLIENTS:
        assert re.search(rf"^{client} +seq=\d+ +session_completed", result.stdout, re.MULTILINE), client


def test_research_clients_fail_when_the_run_does_not_complete_in_time(daemon_url):
    result = run_example("research_clients.py", "--url", daemon_url, "--timeout", "0.5")
    assert result.returncode == 1
    assert "no session_completed within 0.5 s for: desktop, mobile, dashboard" in result.stderr


def test_the_chat_client_streams_and_verifies_the_answer(daemon_url):
    question = "What is an actor?"
    pieces = DemoAgent.answer(question)  # what the daemon's default query backend streams
    result = run_example("chat_client.py", "--url", daemon_url, question, timeout=30)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "".join(pieces) in lines  # printed inline as the chunks came
    assert f"complete (seq {len(pieces) + 2}): total_chunks={len(pieces)}, received {len(pieces)}" in lines
    full = "".join(pieces)
    assert lines[-1] == f"verified: full_response equals the {len(pieces)} chunks joined ({len(full)} chars)"


def test_the_embedded_example_runs_broker_orchestrator_and_client_in_one_process():
    result = run_example("embedded.py", "--port", str(free_port()), timeout=30)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "done: the client received 11 events"
    assert [int(n) for n in re.findall(r"^client: seq=(\d+)", result.stdout, re.MULTILINE)] == list(range(1, 12))
