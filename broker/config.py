"""Settings: one frozen object, defaults that run with no configuration at all.

Every key of docs/protocol.md section 5 is here with its default, so code reads
`settings.buffer_size` and never a dict; tests build variants with `replace()`.

`load_settings` layers a TOML file, the environment and command-line flags, in
that order of precedence. Everything is checked before a `Settings` exists, and
a problem is one `ConfigError` whose text is a single line naming the key (or
the file) and what was expected: an operator reading a failed start-up in a
journal must know what to fix without reading the source.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from actors.filters import DEFAULT_PRESETS
from actors.wire import TYPE_RE

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_SETTINGS",
    "ENV_ALIASES",
    "LOG_LEVELS",
    "RESTART_REQUIRED",
    "ConfigError",
    "Settings",
    "changed_keys",
    "diff_for_reload",
    "env_name",
    "load_settings",
    "resolve_config_path",
    "settings_from_mapping",
]


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8050
    #: messages of history kept per session (replay, recovery by last_seq)
    buffer_size: int = 100
    #: seconds a session lives after its last connection left and last event arrived
    session_ttl: float = 3600.0
    #: seconds an event_id is remembered for idempotent publishing
    dedup_window: float = 300.0
    #: task_progress throttling: smallest change delivered at once, and trailing-edge interval
    min_delta: float = 5.0
    max_interval_ms: int = 1000
    keepalive_interval: float = 25.0
    ws_ping_interval: float = 20.0
    ws_ping_timeout: float = 10.0
    max_message_size: int = 64 * 1024
    max_queue_bytes: int = 1024 * 1024
    max_body_size: int = 1024 * 1024
    max_client_errors: int = 10
    max_client_rate: int = 50
    max_connections: int = 50_000
    max_connections_per_session: int = 1000
    max_connections_per_user: int = 100
    max_sessions: int = 100_000
    #: unanswered frames one /ws/publish connection may have before the server stops reading it
    max_publish_inflight: int = 1000
    allowed_origins: tuple[str, ...] = ()
    api_keys: tuple[str, ...] = ()
    jwt_secret: str = ""
    jwt_public_key: str = ""
    query_backend: str = "demo"
    query_upstream_url: str = ""
    research_upstream_url: str = ""
    backend: str = "memory"
    redis_url: str = ""
    #: names this daemon in a cluster's stats, logs and metrics ("": host name and process id)
    node_id: str = ""
    #: seconds between a node's checks of Redis (heartbeat, canary, stats sync)
    backend_check_interval: float = 5.0
    log_level: str = "info"
    log_format: str = "auto"
    shutdown_timeout: float = 30.0
    gc_thaw_interval: float = 600.0
    #: the daemon's event loop: "uvloop" when importable ("auto"), or the one named
    event_loop: str = "auto"
    #: sockets (docs/protocol.md section 5, "Sockets"): seconds for a request's headers,
    #: seconds an HTTP connection may sit idle, descriptors kept out of the budget, Host names served
    header_timeout: float = 10.0
    idle_timeout: float = 120.0
    fd_reserve: int = 64
    allowed_hosts: tuple[str, ...] = ()
    presets: Mapping[str, frozenset[str]] = dataclasses.field(
        default_factory=lambda: MappingProxyType(dict(DEFAULT_PRESETS))
    )

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


DEFAULT_SETTINGS = Settings()

#: The environment variable naming the configuration file (`--config` wins over it).
CONFIG_ENV = "BROKER_CONFIG"

#: `BROKER_` variables that are not settings, so they must not be reported as
#: unknown keys: the config path, and the publisher key the `publish` command sends.
_NOT_SETTINGS = frozenset({CONFIG_ENV, "BROKER_API_KEY"})

#: Older deployment names, honoured below the `BROKER_` ones (docs/protocol.md section 5).
ENV_ALIASES: Mapping[str, str] = MappingProxyType({
    "WEBSOCKET_HOST": "host",
    "WEBSOCKET_PORT": "port",
    "WEBSOCKET_CORS_ORIGINS": "allowed_origins",
})

#: Keys a SIGHUP reload cannot apply: they are bound when the process starts
#: (the listening socket, the message backend and its connection, the event loop).
RESTART_REQUIRED = frozenset({"host", "port", "backend", "redis_url", "node_id", "event_loop"})

LOG_LEVELS = ("debug", "info", "warning", "error")

_RESERVED_PRESET_NAMES = frozenset({"all", "*"})


class ConfigError(Exception):
    """A configuration that must not start the daemon.

    `str(exc)` is one line naming the key (or the file) and what was expected;
    the CLI prints it as is and exits 2.
    """


@dataclasses.dataclass(frozen=True, slots=True)
class _Spec:
    """How one key is checked: its kind, its allowed range or values."""

    kind: str  # "str", "int", "float", "strings" (list of str) or "presets"
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # `> low` rather than `>= low`
    choices: tuple[str, ...] = ()
    schemes: tuple[str, ...] = ()  # a URL with one of these schemes, or ""
    secret: bool = False  # never echo the value in an error
    items: re.Pattern[str] | None = None  # "strings": what each item must match (fullmatch)
    items_expected: str = ""  # ... said for the error line

    def expected(self) -> str:
        """What a valid value looks like, phrased for the error line."""
        if self.choices:
            return "one of " + ", ".join(f'"{c}"' for c in self.choices)
        if self.schemes:
            names = [f"{scheme}://" for scheme in self.schemes]
            listed = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
            article = "an" if listed[0] in "aeiouh" else "a"
            return f'{article} {listed} URL (or "" for none)'
        if self.kind == "strings" and self.items_expected:
            return self.items_expected
        if self.kind == "strings":
            return "a list of non-empty strings" if self.secret else "a list of strings"
        if self.kind == "presets":
            return "a table of preset name -> list of event types"
        if self.kind == "str":
            return "a string"
        noun = "an integer" if self.kind == "int" else "a number"
        if self.low is not None and self.high is not None:
            return f"{noun} from {_number(self.low)} to {_number(self.high)}"
        if self.low is not None:
            return f"{noun} {'>' if self.low_open else '>='} {_number(self.low)}"
        return noun


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


#: An `allowed_hosts` entry: `*`, a name (a leading dot: and its subdomains), an IPv4 or IPv6 address.
_HOST_ENTRY = re.compile(
    r"\*|\.?[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?|\[[0-9a-f:.]+\]|[0-9a-f]*:[0-9a-f]*:[0-9a-f:.]*", re.IGNORECASE
)

_INT_POSITIVE = _Spec("int", low=1)
_FLOAT_NON_NEGATIVE = _Spec("float", low=0)
_FLOAT_POSITIVE = _Spec("float", low=0, low_open=True)
_HTTP_URL = _Spec("str", schemes=("http", "https"))

_SPECS: Mapping[str, _Spec] = MappingProxyType({
    "host": _Spec("str"),
    "port": _Spec("int", low=0, high=65535),  # 0: any free port
    "buffer_size": _INT_POSITIVE,
    "session_ttl": _FLOAT_POSITIVE,
    "dedup_window": _FLOAT_NON_NEGATIVE,
    "min_delta": _FLOAT_NON_NEGATIVE,
    "max_interval_ms": _Spec("int", low=0),
    "keepalive_interval": _FLOAT_NON_NEGATIVE,  # 0 disables
    "ws_ping_interval": _FLOAT_NON_NEGATIVE,
    "ws_ping_timeout": _FLOAT_POSITIVE,
    "max_message_size": _INT_POSITIVE,
    "max_queue_bytes": _INT_POSITIVE,
    "max_body_size": _INT_POSITIVE,
    "max_client_errors": _INT_POSITIVE,
    "max_client_rate": _INT_POSITIVE,
    "max_connections": _INT_POSITIVE,
    "max_connections_per_session": _INT_POSITIVE,
    "max_connections_per_user": _INT_POSITIVE,
    "max_sessions": _INT_POSITIVE,
    "max_publish_inflight": _INT_POSITIVE,
    "allowed_origins": _Spec("strings"),
    "api_keys": _Spec("strings", secret=True),
    "jwt_secret": _Spec("str", secret=True),
    "jwt_public_key": _Spec("str"),
    "query_backend": _Spec("str", choices=("demo", "http")),
    "query_upstream_url": _HTTP_URL,
    "research_upstream_url": _HTTP_URL,
    "backend": _Spec("str", choices=("memory", "redis")),
    "redis_url": _Spec("str", schemes=("redis", "rediss", "unix"), secret=True),  # may hold a password
    "node_id": _Spec("str"),
    "backend_check_interval": _FLOAT_POSITIVE,
    "log_level": _Spec("str", choices=LOG_LEVELS),
    "log_format": _Spec("str", choices=("json", "console", "auto")),
    "shutdown_timeout": _FLOAT_POSITIVE,
    "gc_thaw_interval": _FLOAT_NON_NEGATIVE,  # 0 disables
    "event_loop": _Spec("str", choices=("auto", "asyncio", "uvloop")),
    "header_timeout": _FLOAT_POSITIVE,
    "idle_timeout": _FLOAT_POSITIVE,
    "fd_reserve": _Spec("int", low=0),  # 0: no reserve, long-lived connections may take every descriptor
    "allowed_hosts": _Spec(
        "strings",
        items=_HOST_ENTRY,
        items_expected='a list of host names without port or scheme ("broker.example.com", ".example.com", "*")',
    ),
    "presets": _Spec("presets"),
})

# A key added to Settings without a rule here would be loaded unchecked: fail at import instead.
assert set(_SPECS) == {f.name for f in dataclasses.fields(Settings)}, "every Settings field needs a _Spec"


def env_name(key: str) -> str:
    """The environment variable for `key` (`buffer_size` -> `BROKER_BUFFER_SIZE`)."""
    return "BROKER_" + key.upper()


def _kind_of(value: Any) -> str:
    """A value's type in the words of a TOML/JSON user, for error lines."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "a table"
    return "a " + type(value).__name__  # TOML dates and times


def _show(value: Any, spec: _Spec) -> str:
    """The offending value, short and on one line; only its kind for secrets."""
    if spec.secret:
        return _kind_of(value)
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:56] + "..." + text[-1]


def _fail(where: str, spec: _Spec, value: Any, detail: str = "") -> ConfigError:
    return ConfigError(f"{where}: expected {spec.expected()}, got {_show(value, spec)}{detail}")


def _check_value(key: str, value: Any, where: str) -> Any:
    """`value` (as TOML or JSON gives it) for `key`, converted to the Settings field's type.

    `where` names the key for the error line, e.g. `broker.toml: port` or `BROKER_PORT`.
    """
    spec = _SPECS[key]
    if spec.kind == "presets":
        return _check_presets(value, where, spec)
    if spec.kind == "strings":
        return _check_strings(value, where, spec)
    if spec.kind == "str":
        if not isinstance(value, str):
            raise _fail(where, spec, value)
        if spec.choices and value not in spec.choices:
            raise _fail(where, spec, value)
        if spec.schemes and value and not _url_ok(value, spec.schemes):
            raise _fail(where, spec, value)
        return value
    # Numbers. bool is an int to Python but never a number here; an int key takes no float.
    wrong_type = isinstance(value, bool) or not isinstance(value, int | float)
    if wrong_type or (spec.kind == "int" and isinstance(value, float)):
        raise _fail(where, spec, value)
    if isinstance(value, float) and not math.isfinite(value):
        raise _fail(where, spec, value)
    too_low = spec.low is not None and (value <= spec.low if spec.low_open else value < spec.low)
    too_high = spec.high is not None and value > spec.high
    if too_low or too_high:
        raise _fail(where, spec, value)
    return float(value) if spec.kind == "float" else value


def _check_strings(value: Any, where: str, spec: _Spec) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(item, str) for item in value):
        raise _fail(where, spec, value)
    if spec.secret and not all(value):
        raise ConfigError(f"{where}: expected {spec.expected()}, got an empty string")
    if spec.items is not None:
        pattern = spec.items
        for item in value:
            if not pattern.fullmatch(item):
                raise ConfigError(f"{where}: expected {spec.expected()}, got {_show(item, spec)}")
    return tuple(value)


def _url_ok(value: str, schemes: tuple[str, ...]) -> bool:
    """A URL the backend client can use: a known scheme, and a host unless it is a socket path."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    if parts.scheme not in schemes:
        return False
    return bool(parts.path) if parts.scheme == "unix" else bool(parts.netloc)


def _check_presets(value: Any, where: str, spec: _Spec) -> dict[str, frozenset[str]]:
    """Preset name -> its event types. Names follow the event-type grammar, so a
    preset can always be written in an `events` filter; `all` and `*` are built in."""
    if not isinstance(value, Mapping):
        raise _fail(where, spec, value)
    presets: dict[str, frozenset[str]] = {}
    for name, members in value.items():
        if name in _RESERVED_PRESET_NAMES:
            raise ConfigError(f'{where}.{name}: expected a preset name other than "all" and "*" (they are built in)')
        if not isinstance(name, str) or not TYPE_RE.match(name):
            raise ConfigError(
                f"{where}: expected preset names of lowercase letters, digits, _ and ., "
                f"starting with a letter, got {_show(name, spec)}"
            )
        if not isinstance(members, list) or not all(isinstance(m, str) and TYPE_RE.match(m) for m in members):
            raise ConfigError(
                f"{where}.{name}: expected a list of event types (lowercase letters, digits, _ and ., "
                f"starting with a letter), got {_show(members, spec)}"
            )
        presets[name] = frozenset(members)
    return presets


def _unknown(where: str, name: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f' (did you mean "{close[0]}"?)' if close else " (the keys are listed in config/broker.toml)"
    return ConfigError(f'{where}: unknown key "{name}"{hint}')


def _check_mapping(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Every key of `data` checked and converted; unknown keys are errors, not ignored,
    so a typo cannot silently leave a default in force."""
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in _SPECS:
            raise _unknown(source, str(key), list(_SPECS))
        values[key] = _check_value(key, value, f"{source}: {key}")
    return values


def _parse_env(key: str, text: str, var: str) -> Any:
    """An environment string as the value for `key`: numbers per the key's type,
    lists and tables as JSON, strings as they are."""
    spec = _SPECS[key]
    if spec.kind == "str":
        return _check_value(key, text, var)
    if spec.kind in {"strings", "presets"}:
        try:
            parsed = json.loads(text)
        except ValueError:
            shown = _kind_of(text) if spec.secret else _show(text, spec)
            example = '["a", "b"]' if spec.kind == "strings" else '{"name": ["event_type"]}'
            raise ConfigError(f"{var}: expected {spec.expected()} as JSON, e.g. {example}, got {shown}") from None
        return _check_value(key, parsed, var)
    try:
        number: int | float = int(text) if spec.kind == "int" else float(text)
    except ValueError:
        raise ConfigError(f"{var}: expected {spec.expected()}, got {_show(text, spec)}") from None
    return _check_value(key, number, var)


def _from_environment(env: Mapping[str, str]) -> dict[str, Any]:
    """The settings the environment gives: the `WEBSOCKET_*` aliases first, so the
    `BROKER_*` names win over them. Any other `BROKER_*` variable is an error."""
    values: dict[str, Any] = {}
    for var, key in ENV_ALIASES.items():
        if var in env:
            values[key] = _parse_env(key, env[var], var)
    known = [env_name(key) for key in _SPECS]
    for var in sorted(env):
        if not var.startswith("BROKER_") or var in _NOT_SETTINGS:
            continue
        key = var.removeprefix("BROKER_").lower()
        if key not in _SPECS or var != env_name(key):
            close = difflib.get_close_matches(var, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"environment: unknown variable {var}: expected a setting name after BROKER_{hint}")
        values[key] = _parse_env(key, env[var], var)
    return values


def _read_file(path: str) -> dict[str, Any]:
    """The file's keys, checked. Missing, unreadable or invalid TOML is an error naming the file."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        message = " ".join(str(exc).split())
        raise ConfigError(f"{path}: expected a valid TOML file: {message}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: expected a valid TOML file: it is not UTF-8") from None
    return _check_mapping(data, path)


def _build(values: Mapping[str, Any]) -> Settings:
    """Checked values -> Settings, with the checks that involve two keys."""
    fields = dict(values)
    if "presets" in fields:  # configured presets add to the built-in ones, or replace one by name
        fields["presets"] = MappingProxyType({**DEFAULT_PRESETS, **fields["presets"]})
    settings = Settings(**fields)
    if settings.query_backend == "http" and not settings.query_upstream_url:
        raise ConfigError(
            "configuration: query_upstream_url: expected an http:// or https:// URL, "
            'required when query_backend is "http"'
        )
    if settings.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise ConfigError(
            'configuration: event_loop: expected "auto" or "asyncio" where uvloop is not installed '
            '(pip install \'actor-broker[uvloop]\' for "uvloop"), got "uvloop"'
        )
    if settings.backend == "redis" and not settings.redis_url:
        raise ConfigError(
            'configuration: redis_url: expected a redis://, rediss:// or unix:// URL, required when backend is "redis"'
        )
    return settings


def resolve_config_path(path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None) -> str | None:
    """The configuration file to read: `path` (from `--config`) if given, else
    `BROKER_CONFIG` if set and not empty, else None (no file: defaults)."""
    if path is not None:
        return os.fspath(path)
    environ = os.environ if env is None else env
    return environ.get(CONFIG_ENV) or None


def settings_from_mapping(data: Mapping[str, Any], source: str = "configuration") -> Settings:
    """Settings from one flat mapping as TOML would give it (defaults for absent keys).

    `source` prefixes error lines (a file name, `command line`, ...).
    """
    return _build(_check_mapping(data, source))


def load_settings(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """The settings the daemon runs with: defaults < file < environment < overrides.

    `path` None reads `BROKER_CONFIG` from `env` (and no file if unset); `env`
    None means `os.environ`. `overrides` are command-line values by key, None
    meaning "not given". Raises ConfigError (one line) on any problem.
    """
    environ = os.environ if env is None else env
    values: dict[str, Any] = {}
    config_path = resolve_config_path(path, environ)
    if config_path is not None:
        values.update(_read_file(config_path))
    values.update(_from_environment(environ))
    if overrides:
        given = {key: value for key, value in overrides.items() if value is not None}
        values.update(_check_mapping(given, "command line"))
    return _build(values)


def changed_keys(old: Settings, new: Settings) -> list[str]:
    """The keys whose value differs, in declaration order (for reload logs)."""
    return [f.name for f in dataclasses.fields(Settings) if getattr(old, f.name) != getattr(new, f.name)]


def diff_for_reload(old: Settings, new: Settings) -> tuple[Settings, list[str]]:
    """What a SIGHUP reload applies: `new`, except that the RESTART_REQUIRED keys
    keep their `old` value (a bound socket or backend cannot change live).

    Returns those settings and the names of the keys that changed but need a
    restart, so the daemon can log them.
    """
    pending = [key for key in changed_keys(old, new) if key in RESTART_REQUIRED]
    applied = new.replace(**{key: getattr(old, key) for key in RESTART_REQUIRED})
    return applied, pending
