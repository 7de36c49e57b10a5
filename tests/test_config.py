"""Configuration loading (docs/protocol.md section 5): pure tests, no server.

They pin the contract operators rely on: file < environment < flags, every
problem is one line naming the key, config/broker.toml is the defaults, and
the README's settings table cannot drift from that file.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import tomllib
from pathlib import Path
from types import MappingProxyType

import pytest

from actors.filters import DEFAULT_PRESETS
from broker.config import (
    ENV_ALIASES,
    RESTART_REQUIRED,
    ConfigError,
    Settings,
    changed_keys,
    diff_for_reload,
    env_name,
    load_settings,
    resolve_config_path,
    settings_from_mapping,
)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "config" / "broker.toml"
README = ROOT / "README.md"
FIELDS = [f.name for f in dataclasses.fields(Settings)]


@pytest.fixture
def write(tmp_path):
    """Write a TOML file and return its path as a string."""
    counter = iter(range(1000))

    def _write(text: str) -> str:
        path = tmp_path / f"broker-{next(counter)}.toml"
        path.write_text(text)
        return str(path)

    return _write


def load_error(path: str | None = None, env: dict[str, str] | None = None, overrides=None) -> str:
    """The error line of a configuration that must not load; checks it is one line."""
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={} if env is None else env, overrides=overrides)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    return message


# -- the shipped file ------------------------------------------------------------


def test_shipped_file_loads_to_exactly_the_defaults():
    loaded = load_settings(str(SHIPPED), env={})
    assert loaded == Settings()
    for name in FIELDS:  # 3600 == 3600.0, so check the types too
        assert type(getattr(loaded, name)) is type(getattr(Settings(), name)), name


def test_shipped_file_has_every_setting_and_nothing_else():
    data = tomllib.loads(SHIPPED.read_text())
    assert sorted(data) == sorted(FIELDS)


def shipped_entries() -> list[tuple[str, str, str]]:
    """(key, value as written, one-line comment) for each setting in broker.toml, in order.

    A setting's comment is the `# ...` line right above it (or above `[presets]`).
    """
    entries: list[tuple[str, str, str]] = []
    comment = ""
    in_table = False
    for line in SHIPPED.read_text().splitlines():
        if line.startswith("# "):
            comment = line[2:]
        elif not line.strip():
            comment = ""
        elif match := re.fullmatch(r"\[(\w+)\]", line):
            entries.append((match[1], "", comment))
            in_table = True
        elif (match := re.fullmatch(r"(\w+) = (.+)", line)) and not in_table:
            entries.append((match[1], match[2], comment))
            comment = ""
    return entries


def test_every_setting_in_the_shipped_file_has_a_one_line_comment():
    entries = shipped_entries()
    assert [key for key, _, _ in entries] == FIELDS
    assert [key for key, _, comment in entries if not comment] == []


def readme_settings_rows() -> list[str]:
    """The README's settings table: the rows under the `| Key |` header."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Key |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def expected_readme_rows() -> list[str]:
    """The settings table the README must carry, rendered from broker.toml."""
    aliases = {key: var for var, key in ENV_ALIASES.items()}
    rows = []
    for key, value, comment in shipped_entries():
        default = ", ".join(f"`{name}`" for name in DEFAULT_PRESETS) if key == "presets" else f"`{value}`"
        env = f"`{env_name(key)}`" + (f" (or `{aliases[key]}`)" if key in aliases else "")
        description = comment.replace("|", "\\|")
        rows.append(f"| `{key}` | {default} | {env} | {description} |")
    return rows


def test_readme_settings_table_matches_the_shipped_file():
    rows = readme_settings_rows()
    keys = [re.match(r"\| `(\w+)`", row)[1] for row in rows]
    assert sorted(keys) == sorted(tomllib.loads(SHIPPED.read_text()))
    expected = expected_readme_rows()
    assert rows == expected, "README settings table is stale; it should be:\n" + "\n".join(expected)


# -- precedence --------------------------------------------------------------------


def test_no_file_no_environment_is_the_defaults():
    assert load_settings(env={}) == Settings()


def test_file_then_environment_then_overrides(write):
    path = write('port = 1111\nhost = "10.0.0.1"\nbuffer_size = 7\n')
    assert load_settings(path, env={}).port == 1111
    env = {"BROKER_PORT": "2222", "BROKER_HOST": "10.0.0.2"}
    from_env = load_settings(path, env=env)
    assert (from_env.port, from_env.host, from_env.buffer_size) == (2222, "10.0.0.2", 7)
    flags = load_settings(path, env=env, overrides={"port": 3333, "host": None, "log_level": "debug"})
    assert (flags.port, flags.host, flags.buffer_size, flags.log_level) == (3333, "10.0.0.2", 7, "debug")


def test_config_flag_beats_broker_config(write):
    flag = write("port = 1111\n")
    from_env = write("port = 2222\n")
    assert load_settings(flag, env={"BROKER_CONFIG": from_env}).port == 1111
    assert load_settings(None, env={"BROKER_CONFIG": from_env}).port == 2222
    assert resolve_config_path(flag, {"BROKER_CONFIG": from_env}) == flag
    assert resolve_config_path(None, {"BROKER_CONFIG": from_env}) == from_env
    assert resolve_config_path(None, {"BROKER_CONFIG": ""}) is None
    assert resolve_config_path(None, {}) is None


def test_a_bad_broker_config_file_is_not_read_when_config_is_given(write):
    good = write("port = 1111\n")
    assert load_settings(good, env={"BROKER_CONFIG": "/nonexistent/broker.toml"}).port == 1111
    assert "/nonexistent/broker.toml" in load_error(None, {"BROKER_CONFIG": "/nonexistent/broker.toml"})


def test_websocket_names_sit_between_file_and_broker_names(write):
    path = write('host = "10.0.0.1"\nport = 1111\nallowed_origins = ["https://file.example"]\n')
    env = {
        "WEBSOCKET_HOST": "10.0.0.3",
        "WEBSOCKET_PORT": "3333",
        "WEBSOCKET_CORS_ORIGINS": '["https://a.example", "https://b.example"]',
    }
    settings = load_settings(path, env=env)
    assert settings.host == "10.0.0.3"
    assert settings.port == 3333
    assert settings.allowed_origins == ("https://a.example", "https://b.example")
    both = load_settings(path, env={**env, "BROKER_PORT": "4444", "BROKER_ALLOWED_ORIGINS": '["https://c.example"]'})
    assert (both.host, both.port, both.allowed_origins) == ("10.0.0.3", 4444, ("https://c.example",))


def test_json_lists_in_the_environment():
    settings = load_settings(env={"BROKER_API_KEYS": '["k1", "k2"]', "BROKER_ALLOWED_ORIGINS": "[]"})
    assert settings.api_keys == ("k1", "k2")
    assert settings.allowed_origins == ()


def test_numbers_in_the_environment_follow_the_key_type():
    settings = load_settings(env={"BROKER_SESSION_TTL": "90", "BROKER_MIN_DELTA": "2.5", "BROKER_BUFFER_SIZE": "7"})
    assert settings.session_ttl == 90.0 and isinstance(settings.session_ttl, float)
    assert settings.min_delta == 2.5
    assert settings.buffer_size == 7 and isinstance(settings.buffer_size, int)


def env_text(value: object) -> str:
    """How an operator writes `value` in the environment."""
    if isinstance(value, str):
        return value
    if isinstance(value, tuple):
        return json.dumps(list(value))
    if isinstance(value, MappingProxyType):
        return json.dumps({name: sorted(types) for name, types in value.items()})
    return str(value)


@pytest.mark.parametrize("key", FIELDS)
def test_every_key_can_be_set_from_the_environment(key):
    default = getattr(Settings(), key)
    assert load_settings(env={env_name(key): env_text(default)}) == Settings()


def test_other_variables_are_not_settings():
    env = {"BROKER_CONFIG": "", "BROKER_API_KEY": "k1", "PATH": "/bin", "BROKERAGE": "x", "WEBSOCKET_OTHER": "y"}
    assert load_settings(env=env) == Settings()


def test_floats_accept_integers_and_keep_float_type(write):
    settings = load_settings(write("session_ttl = 60\nshutdown_timeout = 5\n"), env={})
    assert settings.session_ttl == 60.0 and isinstance(settings.session_ttl, float)
    assert isinstance(settings.shutdown_timeout, float)


def test_settings_from_mapping():
    settings = settings_from_mapping({"port": 0, "api_keys": ["k"]}, "test")
    assert (settings.port, settings.api_keys) == (0, ("k",))
    with pytest.raises(ConfigError, match=r"^test: buffer_size: expected an integer >= 1, got 0$"):
        settings_from_mapping({"buffer_size": 0}, "test")


# -- presets ---------------------------------------------------------------------------


def test_presets_merge_over_the_built_in_ones(write):
    path = write('[presets]\nmine = ["task_progress", "task_completed"]\nessential = ["error"]\n')
    presets = load_settings(path, env={}).presets
    assert presets["mine"] == frozenset({"task_progress", "task_completed"})
    assert presets["essential"] == frozenset({"error"})
    assert presets["planning"] == DEFAULT_PRESETS["planning"]
    assert isinstance(presets, MappingProxyType)


def test_presets_from_the_environment_replace_the_file_table(write):
    path = write('[presets]\nmine = ["a"]\n')
    presets = load_settings(path, env={"BROKER_PRESETS": '{"other": ["b"]}'}).presets
    assert set(presets) == {*DEFAULT_PRESETS, "other"}


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ('all = ["a"]', "presets.all"),
        ('"*" = ["a"]', "presets.*"),
        ('"Bad Name" = ["a"]', "presets"),
        ('mine = ["Task"]', "presets.mine"),
        ('mine = "task_progress"', "presets.mine"),
        ("mine = [1]", "presets.mine"),
    ],
)
def test_bad_presets_name_the_key(write, table, named):
    message = load_error(write(f"[presets]\n{table}\n"))
    assert f": {named}: expected" in message


def test_presets_must_be_a_table(write):
    assert "presets: expected a table" in load_error(write('presets = ["a"]\n'))


# -- errors --------------------------------------------------------------------------

BAD_VALUES = [
    # (key, TOML value, expected wording)
    ("port", "70000", "an integer from 0 to 65535"),
    ("port", "-1", "an integer from 0 to 65535"),
    ("port", '"8050"', "an integer from 0 to 65535"),
    ("port", "true", "an integer"),
    ("port", "8050.0", "an integer"),
    ("buffer_size", "0", "an integer >= 1"),
    ("session_ttl", "0", "a number > 0"),
    ("session_ttl", "inf", "a number > 0"),
    ("dedup_window", "-1", "a number >= 0"),
    ("min_delta", "-0.5", "a number >= 0"),
    ("min_delta", "nan", "a number >= 0"),
    ("max_interval_ms", "-1", "an integer >= 0"),
    ("max_interval_ms", "1.5", "an integer >= 0"),
    ("keepalive_interval", "-1", "a number >= 0"),
    ("ws_ping_interval", '"20"', "a number >= 0"),
    ("ws_ping_timeout", "0", "a number > 0"),
    ("max_message_size", "0", "an integer >= 1"),
    ("max_queue_bytes", "0", "an integer >= 1"),
    ("max_body_size", "0", "an integer >= 1"),
    ("max_client_errors", "0", "an integer >= 1"),
    ("max_client_rate", "0", "an integer >= 1"),
    ("max_connections", "0", "an integer >= 1"),
    ("max_connections_per_session", "0", "an integer >= 1"),
    ("shutdown_timeout", "0", "a number > 0"),
    ("host", "1", "a string"),
    ("allowed_origins", '"https://a.example"', "a list of strings"),
    ("allowed_origins", "[1]", "a list of strings"),
    ("api_keys", '["k1", ""]', "a list of non-empty strings"),
    ("jwt_secret", "true", "a string"),
    ("log_level", '"verbose"', 'one of "debug", "info", "warning", "error"'),
    ("log_level", '"INFO"', 'one of "debug"'),
    ("log_format", '"text"', 'one of "json", "console", "auto"'),
    ("backend", '"postgres"', 'one of "memory", "redis"'),
    ("query_backend", '"magic"', 'one of "demo", "http"'),
    ("query_upstream_url", '"ftp://x"', "an http:// or https:// URL"),
    ("research_upstream_url", '"localhost:9000"', "an http:// or https:// URL"),
    ("redis_url", '"http://cache:6379"', "a redis://, rediss:// or unix:// URL"),
    ("event_loop", '"tokio"', 'one of "auto", "asyncio", "uvloop"'),
    ("event_loop", "1", "one of"),
    ("host", "1979-05-27", "a string"),
]


@pytest.mark.parametrize(("key", "value", "wording"), BAD_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_a_bad_value_in_the_file_names_the_key_and_what_was_expected(write, key, value, wording):
    path = write(f"{key} = {value}\n")
    message = load_error(path)
    assert message.startswith(f"{path}: {key}: expected ")
    assert wording in message


@pytest.mark.parametrize(
    ("var", "text", "wording"),
    [
        ("BROKER_PORT", "eighty", "an integer from 0 to 65535"),
        ("BROKER_PORT", "80.5", "an integer from 0 to 65535"),
        ("BROKER_PORT", "", "an integer"),
        ("BROKER_BUFFER_SIZE", "0", "an integer >= 1"),
        ("BROKER_SESSION_TTL", "soon", "a number > 0"),
        ("BROKER_ALLOWED_ORIGINS", "https://a.example", 'as JSON, e.g. ["a", "b"]'),
        ("BROKER_ALLOWED_ORIGINS", '{"a": 1}', "a list of strings"),
        ("BROKER_PRESETS", "[]", "a table"),
        ("BROKER_LOG_LEVEL", "loud", 'one of "debug"'),
        ("BROKER_EVENT_LOOP", "libuv", 'one of "auto", "asyncio", "uvloop"'),
        ("WEBSOCKET_PORT", "99999", "an integer from 0 to 65535"),
        ("WEBSOCKET_CORS_ORIGINS", "https://a.example", "a list of strings as JSON"),
    ],
)
def test_a_bad_value_in_the_environment_names_the_variable(var, text, wording):
    message = load_error(env={var: text})
    assert message.startswith(f"{var}: expected ")
    assert wording in message


def test_a_bad_override_names_the_key():
    assert load_error(overrides={"port": 70000}).startswith("command line: port: expected an integer from 0 to 65535")
    assert "command line: unknown key" in load_error(overrides={"prot": 1})


def test_an_unknown_file_key_is_an_error_with_a_suggestion(write):
    path = write("prot = 8050\n")
    assert load_error(path) == f'{path}: unknown key "prot" (did you mean "port"?)'


def test_a_nested_table_is_an_unknown_key(write):
    path = write("[server]\nport = 1\n")
    assert load_error(path).startswith(f'{path}: unknown key "server"')


@pytest.mark.parametrize("var", ["BROKER_PROT", "BROKER_port", "BROKER_", "BROKER_CONFIG_PATH"])
def test_an_unknown_broker_variable_is_an_error_naming_it(var):
    message = load_error(env={var: "1"})
    assert message.startswith(f"environment: unknown variable {var}:")


def test_an_unknown_variable_gets_a_suggestion():
    assert "(did you mean BROKER_PORT?)" in load_error(env={"BROKER_PROT": "1"})


def test_a_missing_file_names_the_file(tmp_path):
    path = str(tmp_path / "absent.toml")
    assert load_error(path) == f"{path}: cannot read the configuration file (No such file or directory)"


def test_a_directory_names_the_file(tmp_path):
    assert load_error(str(tmp_path)).startswith(f"{tmp_path}: cannot read the configuration file")


def test_invalid_toml_names_the_file(write):
    path = write("port = \nhost = 'x'\n")
    assert load_error(path).startswith(f"{path}: expected a valid TOML file: ")


def test_a_file_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('host = "caf\xe9"\n'.encode("latin-1"))
    assert load_error(str(path)).startswith(f"{path}: expected a valid TOML file")


def test_http_query_backend_needs_an_upstream(write):
    assert "query_upstream_url" in load_error(write('query_backend = "http"\n'))
    settings = load_settings(write('query_backend = "http"\nquery_upstream_url = "http://agent:9000/q"\n'), env={})
    assert settings.query_upstream_url == "http://agent:9000/q"


def test_redis_backend_needs_a_redis_url(write):
    error = load_error(write('backend = "redis"\n'), env={})
    assert error.startswith("configuration: redis_url:") and "required when backend is" in error
    settings = load_settings(write('backend = "redis"\nredis_url = "redis://cache:6379/0"\n'), env={})
    assert (settings.backend, settings.redis_url, settings.node_id) == ("redis", "redis://cache:6379/0", "")
    assert settings.backend_check_interval == 5.0


@pytest.mark.parametrize("url", ["http://cache:6379", "cache:6379", "redis://"])
def test_a_redis_url_of_another_scheme_stops_start_up(write, url):
    assert "redis_url: expected a redis://" in load_error(write(f'backend = "redis"\nredis_url = "{url}"\n'), env={})


def test_secrets_are_not_echoed(write):
    assert "s3cr3t" not in load_error(env={"BROKER_API_KEYS": "s3cr3t"})
    assert "s3cr3t" not in load_error(write('api_keys = "s3cr3t"\n'))
    assert "s3cr3t" not in load_error(write('redis_url = "http://:s3cr3t@cache"\n'))


@pytest.mark.parametrize(("key", "value"), [("port", 0), ("port", 65535), ("keepalive_interval", 0),
                                            ("dedup_window", 0), ("min_delta", 0), ("max_interval_ms", 0),
                                            ("ws_ping_interval", 0), ("buffer_size", 1)])
def test_range_edges_that_are_allowed(key, value):
    assert getattr(settings_from_mapping({key: value}), key) == value


# -- reload ------------------------------------------------------------------------------


def test_reload_applies_live_keys_and_keeps_restart_keys():
    old = Settings()
    new = old.replace(port=9999, host="0.0.0.0", buffer_size=5, log_level="debug", api_keys=("k",))
    applied, pending = diff_for_reload(old, new)
    assert (applied.port, applied.host) == (old.port, old.host)
    assert (applied.buffer_size, applied.log_level, applied.api_keys) == (5, "debug", ("k",))
    assert pending == ["host", "port"]


def test_reload_with_no_restart_key_changes_reports_nothing():
    old = Settings()
    new = old.replace(session_ttl=10.0)
    assert diff_for_reload(old, new) == (new, [])
    assert diff_for_reload(old, old) == (old, [])


def test_reload_keeps_backend_and_redis_url():
    old = Settings()
    new = old.replace(backend="redis", redis_url="redis://cache")
    applied, pending = diff_for_reload(old, new)
    assert applied == old
    assert pending == ["backend", "redis_url"]
    assert {"host", "port", "backend", "redis_url", "node_id", "event_loop"} == RESTART_REQUIRED


def test_reload_keeps_the_event_loop():
    """The loop runs the process: a changed event_loop waits for the restart, like the port."""
    old = Settings()
    applied, pending = diff_for_reload(old, old.replace(event_loop="asyncio"))
    assert applied.event_loop == "auto"
    assert pending == ["event_loop"]


@pytest.mark.parametrize("choice", ["auto", "asyncio"])
def test_event_loop_from_the_file_and_the_environment(write, choice):
    assert load_settings(write(f'event_loop = "{choice}"\n'), env={}).event_loop == choice
    assert load_settings(env={"BROKER_EVENT_LOOP": choice}).event_loop == choice


def test_event_loop_uvloop_needs_uvloop_installed(write):
    """With "uvloop": it loads where the package is installed; elsewhere start-up stops (exit 2) saying how."""
    path = write('event_loop = "uvloop"\n')
    if importlib.util.find_spec("uvloop") is not None:
        assert load_settings(path, env={}).event_loop == "uvloop"
        return
    message = load_error(path)
    assert message.startswith("configuration: event_loop: expected ")
    assert "pip install 'actor-broker[uvloop]'" in message
    assert load_error(env={"BROKER_EVENT_LOOP": "uvloop"}) == message


def test_changed_keys_in_declaration_order():
    new = Settings().replace(shutdown_timeout=1.0, host="::1", presets=MappingProxyType({}))
    assert changed_keys(Settings(), new) == ["host", "shutdown_timeout", "presets"]
