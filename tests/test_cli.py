"""The command line, as an operator runs it: `python -m broker ...` in a subprocess.

`stats` and `publish` talk to a real daemon started on a free port, so these
tests cover the whole path an operator's command takes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import broker.daemon
from broker.cli import build_parser, format_table, main
from broker.config import Settings

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "config" / "broker.toml"
COMMANDS = ["serve", "check-config", "stats", "publish"]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any broker setting, so the host's cannot leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "WEBSOCKET_"))}
    return {**env, **extra}


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        cwd=ROOT,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_one_error_line(result: subprocess.CompletedProcess[str], *named: str) -> str:
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("actor-broker: ")
    for name in named:
        assert name in lines[0]
    return lines[0]


# -- check-config and serve with a bad configuration ----------------------------------------


def test_check_config_accepts_the_shipped_file():
    result = run("check-config", "config/broker.toml")
    assert (result.returncode, result.stdout, result.stderr) == (0, "ok: config/broker.toml\n", "")


def test_check_config_names_the_bad_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('port = "eighty"\nbuffer_size = 10\n')
    line = assert_one_error_line(run("check-config", str(path)), "port", str(path))
    assert line == f'actor-broker: {path}: port: expected an integer from 0 to 65535, got "eighty"'
    assert run("check-config", str(path)).stdout == ""


def test_check_config_names_an_unknown_key(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text("bufer_size = 10\n")
    assert_one_error_line(run("check-config", str(path)), "bufer_size", "buffer_size")


def test_check_config_names_a_missing_file(tmp_path):
    path = tmp_path / "absent.toml"
    assert_one_error_line(run("check-config", str(path)), str(path))


def test_check_config_sees_the_environment_as_serve_does():
    result = run("check-config", "config/broker.toml", env=clean_env(BROKER_MAX_CONNECTIONS="0"))
    assert_one_error_line(result, "BROKER_MAX_CONNECTIONS")


def test_serve_with_a_bad_file_exits_2_at_once(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("shutdown_timeout = 0\n")
    assert_one_error_line(run("serve", "--config", str(path), timeout=30), "shutdown_timeout")


def test_serve_on_redis_without_a_url_exits_2():
    assert_one_error_line(run("serve", "--port", "0", env=clean_env(BROKER_BACKEND="redis"), timeout=30), "redis_url")


def test_serve_with_a_redis_url_of_another_scheme_exits_2():
    env = clean_env(BROKER_BACKEND="redis", BROKER_REDIS_URL="http://127.0.0.1:6379/0")
    assert_one_error_line(run("serve", "--port", "0", env=env, timeout=30), "BROKER_REDIS_URL", "redis://")


def test_serve_with_a_bad_broker_config_exits_2(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[presets]\nall = []\n")
    result = run("serve", env=clean_env(BROKER_CONFIG=str(path)), timeout=30)
    assert_one_error_line(result, "presets.all")


def test_serve_with_a_bad_flag_value_exits_2():
    assert_one_error_line(run("serve", "--port", "70000", timeout=30), "port")


def test_serve_with_a_bad_environment_variable_exits_2():
    assert_one_error_line(run("serve", env=clean_env(BROKER_BUFER_SIZE="5"), timeout=30), "BROKER_BUFER_SIZE")


# -- help -------------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = run(command, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith(f"usage: actor-broker {command}")


def test_top_level_help_lists_the_commands():
    result = run("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout


def test_no_command_prints_help_and_exits_2():
    result = run()
    assert result.returncode == 2
    assert "usage: actor-broker" in result.stdout


# -- in process: what serve hands the daemon, how publish reads its fields -------------------


@pytest.fixture
def served(monkeypatch):
    """Replace the daemon's entry point, recording what the CLI passes it."""
    calls: list[tuple[Settings, str | None]] = []

    def fake_serve(settings: Settings, config_path: str | None = None) -> int:
        calls.append((settings, config_path))
        return 0

    monkeypatch.setattr(broker.daemon, "serve", fake_serve)
    for var in [v for v in os.environ if v.startswith(("BROKER_", "WEBSOCKET_"))]:
        monkeypatch.delenv(var)
    return calls


def test_serve_passes_settings_and_config_path_to_the_daemon(served, tmp_path, monkeypatch):
    path = tmp_path / "broker.toml"
    path.write_text('port = 1111\nlog_level = "warning"\nbuffer_size = 9\n')
    monkeypatch.setenv("BROKER_PORT", "2222")
    assert main(["serve", "--config", str(path), "--log-level", "error"]) == 0
    settings, config_path = served[-1]
    assert (settings.port, settings.log_level, settings.buffer_size) == (2222, "error", 9)
    assert config_path == str(path)
    assert main(["serve", "--config", str(path), "--port", "3333", "--host", "::1"]) == 0
    assert (served[-1][0].port, served[-1][0].host) == (3333, "::1")


def test_serve_passes_broker_config_as_the_config_path(served, tmp_path, monkeypatch):
    path = tmp_path / "broker.toml"
    path.write_text("port = 1111\n")
    monkeypatch.setenv("BROKER_CONFIG", str(path))
    assert main(["serve"]) == 0
    assert served[-1] == (Settings(port=1111), str(path))


def test_serve_without_configuration_runs_the_defaults(served):
    assert main(["serve"]) == 0
    assert served == [(Settings(), None)]


def test_serve_does_not_start_the_daemon_on_a_bad_configuration(served, capsys):
    assert main(["serve", "--port", "-5"]) == 2
    assert served == []
    assert capsys.readouterr().err.startswith("actor-broker: command line: port: expected")


def test_publish_fields_are_json_when_they_parse():
    args = build_parser().parse_args(
        ["publish", "s1", "task_progress", "progress=40", "task_id=t1", 'quoted="40"', "ok=true", "list=[1, 2]",
         "eq=a=b", "empty="]
    )
    assert dict(args.fields) == {
        "progress": 40, "task_id": "t1", "quoted": "40", "ok": True, "list": [1, 2], "eq": "a=b", "empty": "",
    }


def test_publish_rejects_a_field_without_equals():
    result = run("publish", "s1", "task_started", "task_id")
    assert result.returncode == 2
    assert "expected key=value" in result.stderr


def test_format_table_aligns_two_columns():
    table = format_table({"status": "healthy", "active_connections": 3, "connected_sessions": ["a", "b"]})
    assert table.splitlines() == [
        "status              healthy",
        "active_connections  3",
        "connected_sessions  a, b",
    ]


# -- against a real daemon ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def start_daemon(
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
    started: list[subprocess.Popen[bytes]] | None = None,
    **env: str,
) -> str:
    """Start `python -m broker serve` on a free port; its base URL once /healthz answers.

    The process is appended to `started`, when given (to signal it).
    """
    port = free_port()
    log_path = tmp_path_factory.mktemp("daemon") / "daemon.log"
    log = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "broker", "serve", "--port", str(port)],
        cwd=ROOT,
        env=clean_env(**env),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    if started is not None:
        started.append(process)

    def stop() -> None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        log.close()

    request.addfinalizer(stop)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the daemon exited with {process.returncode}: {log_path.read_text(errors='replace')}")
        try:
            if get(url + "/healthz", timeout=0.5)[0] == 200:
                return url
        except OSError:
            pass
        time.sleep(0.05)  # noqa: sleep -- bounded poll for the port to open
    pytest.fail(f"the daemon did not answer /healthz within 30 s: {log_path.read_text(errors='replace')}")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, request) -> str:
    return start_daemon(tmp_path_factory, request)


@pytest.fixture(scope="module")
def keyed_daemon(tmp_path_factory, request) -> str:
    """A daemon that requires a publisher key; BROKER_API_KEY in its environment must not stop it."""
    return start_daemon(tmp_path_factory, request, BROKER_API_KEYS='["k1"]', BROKER_API_KEY="not-a-setting")


def test_stats_prints_a_table(daemon):
    result = run("stats", "--url", daemon)
    assert result.returncode == 0, result.stderr
    rows = dict(line.split(None, 1) for line in result.stdout.splitlines())
    assert rows["status"] == "healthy"
    assert rows["active_connections"].isdigit()
    assert "uptime_seconds" in rows


def test_publish_sends_one_event_and_prints_the_answer(daemon):
    result = run("publish", "cli-demo", "task_progress", "task_id=t1", "progress=40",
                 "current_action=reading sources", "--url", daemon)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["accepted"] == 1 and len(answer["seq"]) == 1
    status, body = get(f"{daemon}/api/sessions/cli-demo")
    assert status == 200, body
    stats = run("stats", "--url", daemon)
    rows = dict(line.split(None, 1) for line in stats.stdout.splitlines())
    assert int(rows["total_events_received"]) >= 1


def test_publish_answers_202(daemon):
    """The CLI prints the body; the status it relies on is the API's 202."""
    request = urllib.request.Request(
        f"{daemon}/api/sessions/cli-202/events",
        data=json.dumps({"type": "session_started"}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 202
    assert run("publish", "cli-202", "session_completed", "--url", daemon).returncode == 0


def test_publish_prints_the_error_body_and_exits_1(daemon):
    result = run("publish", "cli-demo", "task_progress", "task_id=t1", "--url", daemon)  # no progress
    assert result.returncode == 1
    assert "error" in json.loads(result.stdout)
    assert "answered 422" in result.stderr


def test_publish_sends_the_api_key(keyed_daemon):
    without = run("publish", "cli-keyed", "session_started", "--url", keyed_daemon)
    assert without.returncode == 1
    assert "answered 401" in without.stderr
    wrong = run("publish", "cli-keyed", "session_started", "--url", keyed_daemon, "--api-key", "k2")
    assert "answered 403" in wrong.stderr
    from_env = run("publish", "cli-keyed", "session_started", "--url", keyed_daemon, env=clean_env(BROKER_API_KEY="k1"))
    assert from_env.returncode == 0, from_env.stderr
    flag = run("publish", "cli-keyed", "session_completed", "--url", keyed_daemon, "--api-key", "k1")
    assert flag.returncode == 0, flag.stderr


def test_stats_and_publish_report_an_unreachable_daemon():
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["stats"], ["publish", "s1", "session_started"]):
        result = run(*args, "--url", url, "--timeout", "2")
        assert result.returncode == 1
        assert result.stderr.startswith(f"actor-broker: cannot reach {url}/")
        assert len(result.stderr.splitlines()) == 1


# -- publish --stdin: NDJSON over /ws/publish --------------------------------------------------


def publish_stdin(
    url: str, lines: list[str], *args: str, env: dict[str, str] | None = None
) -> tuple[int, list[Any], str]:
    """Run `publish --stdin` with these lines on stdin: (exit code, the answers printed, stderr)."""
    result = subprocess.run(
        [sys.executable, "-m", "broker", "publish", "--stdin", *args, "--url", url],
        cwd=ROOT,
        env=env or clean_env(),
        input="".join(line + "\n" for line in lines),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.returncode, [json.loads(line) for line in result.stdout.splitlines()], result.stderr


def test_publish_stdin_prints_one_answer_per_line_in_order(daemon):
    lines = [
        json.dumps({"type": "task_started", "task_id": "t1"}),  # the session from the command line
        "",  # blank: skipped, no answer
        json.dumps({"type": "task_started", "task_id": "t1", "session_id": "cli-stdin-other"}),
        "not json",
        json.dumps({"type": "task_progress", "task_id": "t1", "progress": 500}),
        json.dumps([{"type": "task_started", "task_id": "t9"}]),  # one event per line: an array is refused
        json.dumps({"type": "task_completed", "task_id": "t1"}),
    ]
    code, answers, stderr = publish_stdin(daemon, lines, "cli-stdin")
    assert code == 1, stderr  # some lines were refused
    assert [(a["ref"], a["type"], a.get("status"), a.get("seq")) for a in answers] == [
        (1, "accepted", None, [1]),
        (3, "accepted", None, [1]),
        (4, "error", 400, None),
        (5, "error", 422, None),
        (6, "error", 422, None),
        (7, "accepted", None, [2]),
    ]
    assert answers[3]["details"][0]["field"] == "progress"
    status, body = get(f"{daemon}/api/sessions/cli-stdin")
    assert status == 200 and json.loads(body)["last_seq"] == 2
    status, body = get(f"{daemon}/api/sessions/cli-stdin-other")
    assert status == 200 and json.loads(body)["last_seq"] == 1


def test_publish_stdin_of_many_lines_exits_0_with_every_seq_in_order(daemon):
    lines = [json.dumps({"type": "task_started", "task_id": f"t{i}"}) for i in range(1500)]
    code, answers, stderr = publish_stdin(daemon, lines, "cli-stdin-many")
    assert (code, stderr) == (0, "")
    assert [a["ref"] for a in answers] == list(range(1, 1501))
    assert [a["seq"] for a in answers] == [[i] for i in range(1, 1501)]


def test_publish_stdin_sends_the_api_key(keyed_daemon):
    line = [json.dumps({"type": "session_started", "session_id": "cli-stdin-keyed"})]
    code, answers, stderr = publish_stdin(keyed_daemon, line)
    assert code == 1 and answers == [{"error": "an API key is required: send 'Authorization: Bearer KEY'"}]
    assert stderr.strip().endswith("/ws/publish answered 401")
    code, _, stderr = publish_stdin(keyed_daemon, line, "--api-key", "k2")
    assert code == 1 and "answered 403" in stderr
    code, answers, stderr = publish_stdin(keyed_daemon, line, env=clean_env(BROKER_API_KEY="k1"))
    assert (code, [a["type"] for a in answers]) == (0, ["accepted"]), stderr


def test_publish_stdin_takes_no_type_and_publish_without_it_needs_one():
    for args in (["publish", "--stdin", "s1", "task_started"], ["publish", "--stdin", "s1", "a=1"], ["publish", "s1"]):
        result = run(*args)
        assert result.returncode == 2, (args, result)
        assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("actor-broker: publish")


def test_publish_stdin_reports_an_unreachable_daemon():
    url = f"http://127.0.0.1:{free_port()}"
    code, answers, stderr = publish_stdin(url, ['{"type": "session_started"}'], "s1", "--timeout", "2")
    assert (code, answers) == (1, [])
    assert stderr.startswith("actor-broker: cannot reach ws://127.0.0.1:") and len(stderr.splitlines()) == 1


def test_publish_stdin_hears_the_daemons_shutdown_after_its_answers(tmp_path_factory, request):
    """SIGTERM with a publisher connected: the answers it is owed, `server_shutdown`, close 1001; exit 1."""
    started: list[subprocess.Popen[bytes]] = []
    url = start_daemon(tmp_path_factory, request, started)
    cli = subprocess.Popen(
        [sys.executable, "-m", "broker", "publish", "--stdin", "cli-stdin-drain", "--url", url],
        cwd=ROOT,
        env=clean_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    request.addfinalizer(cli.kill)
    assert cli.stdin is not None and cli.stdout is not None
    for i in range(3):
        cli.stdin.write(json.dumps({"type": "task_started", "task_id": f"t{i}"}) + "\n")
    cli.stdin.flush()
    answers = [json.loads(cli.stdout.readline()) for _ in range(3)]  # each line answered while stdin stays open
    assert [a["seq"] for a in answers] == [[1], [2], [3]]
    started[0].send_signal(signal.SIGTERM)
    assert started[0].wait(timeout=30) == 0  # the drain waited for the publisher's close, then exited
    _, stderr = cli.communicate(timeout=30)
    assert cli.returncode == 1
    lines = stderr.splitlines()
    assert json.loads(lines[0].removeprefix("actor-broker: the daemon says: "))["type"] == "server_shutdown"
    assert lines[1] == (
        "actor-broker: the daemon closed the connection (1001 server shutdown) before the end of stdin; "
        "0 lines not answered"
    )
