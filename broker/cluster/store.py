"""RedisStore: what nodes share about sessions, in Redis (docs/protocol.md section 7).

The one place that knows the Redis key layout. Every key of one session
carries the session id as a hash tag, so they hash to one slot:

    ab:{sid}:meta         hash    epoch, seq (last assigned), created_ms, last_event_ms, throttled,
                                  exp_ms (the keys' deadline, Redis time: publish.lua renews near it)
    ab:{sid}:stream       stream  one entry per message, id <seq>-0, fields m (message JSON), t (type),
                                  k (task_id of a task_progress, else "")
    ab:{sid}:dedup        hash    event_id -> seq, or "" while held / once discarded
    ab:{sid}:dedupz       zset    event_id scored by accept time (ms): the dedup window
    ab:{sid}:tasks        hash    task_id -> JSON throttle state, held event included
    ab:{sid}:undelivered  zset    seqs no connection on any node admitted (replay=missed)
    ab:{sid}:conns        hash    connection_id -> JSON {seen_ms (Redis time of its last refresh), node_id,
                                  user_id, events, ...}; stale (its node died) once not refreshed for
                                  Limits.connection_stale_ms
    ab:{sid}:listeners    hash    node_id -> Redis time (ms) it last said it hears the session's channel
                                  (ensure and touch with `listener`); a publish from the only node
                                  marked there (or from one where nobody is) is not PUBLISHed
    ab:{sid}:query        string  the running query's id (the one-query-at-a-time lock)
    ab:throttle:due       zset    "<sid>\\n<task_id>" scored by due time: the trailing-edge sweep
    ab:nodes              hash    node_id -> last heartbeat (Redis time, ms)

Channels: `ab:{sid}:events` (one payload per publish that a node other than
the caller hears, per flush call, or a deletion; broker/cluster/payload.py
parses it), `ab:broadcast`, `ab:canary:<node_id>`.

Every decision that must hold across nodes (dedup, throttle, seq, trim,
`undelivered`) is taken inside one Lua script per call (broker/cluster/lua/,
`common.lua` prepended to each session script), with Redis TIME as the clock,
so two nodes can never hand out one seq or interleave a batch, and node clock
skew changes nothing.

Round trips: a publish (a whole batch) is ONE EVALSHA; so are flush, read,
read_missed, create/ensure and delete. Only after the script cache was lost
(a Redis restart, SCRIPT FLUSH) does the first call of each script cost three
(EVALSHA answered NOSCRIPT, SCRIPT LOAD, EVALSHA again: redis-py's
AsyncScript, or `_on_line` for publish). redis-py may add a PING before a
command on a pooled connection idle for longer than `health_check_interval`.

Connections: publishes share one pipelined connection (broker/cluster/line.py):
they do not wait for each other's replies, and skip redis-py's per-command
pool checkout (bench/store_publish.py: 1.29x the client's CPU per call
through the command path in one run). Everything else uses redis-py's pool.

Failures: anything that means "Redis cannot answer now" (refused, reset,
timed out, loading, read-only replica, out of memory, busy) is raised as
`BackendUnavailable` after redis-py's own retry with exponential backoff. A
script that rejects its input is a bug in the caller or here and is raised as
redis-py's `ResponseError`, never as unavailability. A publish retried after
a timeout is safe: the events' ids make the second run answer the first's seqs.

Time for tests: `publish`, `flush`, `create`, `ensure` and `due` take an
optional `now_ms` that replaces Redis TIME inside the script (so throttle and
dedup-window rules can be tested with plain numbers). Production never passes it.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson
from redis import exceptions as rx
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript

from actors.ids import new_epoch
from actors.wire import SESSION_ID_RE
from broker.cluster.line import LineTimeout, PipelinedLine

__all__ = [
    "BackendUnavailable",
    "EventMeta",
    "Limits",
    "PublishResult",
    "RedisStore",
    "Slice",
    "StoredMessage",
]

_SESSION_KEYS = ("meta", "stream", "dedup", "dedupz", "tasks", "undelivered", "conns", "listeners")
#: Commands per pipeline in a node's background writes (its connection records, its touches).
#: redis-py packs a pipeline and parses its replies without a loop turn, about 15-30 µs a
#: command: one pipeline of a node's 1 000 connection records held every publish and delivery
#: behind it for tens of milliseconds each backend_check_interval, which was the Redis row's
#: latency p99 in `make bench` (24 ms against 4 ms with the check held off). A script call
#: with ten records costs more: 64 of them (1 000 records in 100 sessions) held the loop for
#: 7 ms, 16 for 1.5 ms, in the same total time (a one-off loop, not kept).
PIPELINE_CHUNK = 16
#: Connection records of one session per put_connection call (the script unpacks them in one HSET).
_RECORDS_PER_CALL = 256

_FINISHING = frozenset({"task_completed", "task_failed"})


class BackendUnavailable(Exception):  # noqa: N818 - the design's name; it is a condition, not a bug
    """Redis unreachable, timed out, refusing writes, or the connection cut mid-call.

    After a cut the outcome is unknown: the call may have run. Callers answer
    503 and the publisher retries with the same event ids.
    """


class PoolExhausted(BackendUnavailable):
    """Every pooled connection stayed busy for the pool's whole wait: this node is
    overloaded, Redis itself may be fine. The call is refused (503), but the node
    is not marked unreachable for it (that would refuse everything until the next
    check)."""


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One committed message, as the stream keeps it."""

    seq: int
    type: str
    task_id: str | None  # set for task_progress only (the outbox compacts by it)
    data: bytes  # the message JSON, as clients receive it


@dataclass(frozen=True, slots=True)
class Slice:
    """A consistent snapshot of a session's history: meta and stream read together."""

    epoch: str  # "" for a session that does not exist
    last_seq: int  # the session's newest seq (0: none yet)
    first_seq: int  # oldest seq still in the stream (last_seq + 1 when empty)
    messages: list[StoredMessage]  # in seq order


@dataclass(frozen=True, slots=True)
class PublishResult:
    """What one publish call did.

    `held` lists (task_id, due_ms) for tasks this call started holding: the
    node schedules `flush` at due_ms - now_ms from now (both Redis time).
    `throttled` and `received` are this call's shares of throttled_events and
    total_events_received (duplicates are not received again).
    """

    seqs: list[int | None]  # one per event, as the 202 body
    held: list[tuple[str, int]]
    throttled: int = 0
    received: int = 0
    now_ms: int = 0  # Redis time at the publish
    #: the call's payload (broker/cluster/payload.py): when `echo` asked for it, and always when it was not published
    echo: bytes | None = None
    #: the payload went out on the session's channel (False: no other node hears it, and only
    #: the caller's own connections can get it, from `echo`)
    published: bool = True


@dataclass(frozen=True, slots=True)
class EventMeta:
    """What the publish script needs of one validated event besides its JSON."""

    event_id: str
    type: str
    task_id: str | None = None
    progress: float | None = None  # task_progress only
    current_action: str | None = None  # task_progress only

    @classmethod
    def of(cls, event: dict[str, Any]) -> EventMeta:
        """The meta of a validated event dict (broker/validation.py's output)."""
        return cls(
            event["event_id"],
            event["type"],
            event.get("task_id"),
            event.get("progress"),
            event.get("current_action"),
        )


@dataclass(frozen=True, slots=True)
class Limits:
    """The settings one call applies (passed per call, so a reload applies at once)."""

    buffer_size: int
    dedup_window_ms: int
    min_delta: float
    max_interval_ms: int
    session_ttl_ms: int
    #: a connection record its node has not refreshed for this long is a dead node's: it admits
    #: nothing (replay=missed) and is not listed (0: never stale)
    connection_stale_ms: int = 0


def _load(name: str) -> str:
    return resources.files("broker.cluster").joinpath("lua", name).read_text(encoding="utf-8")


_UNAVAILABLE_RESPONSES = (rx.ReadOnlyError, rx.OutOfMemoryError, rx.ClusterDownError, rx.TryAgainError)
_UNAVAILABLE_PREFIXES = ("LOADING", "BUSY", "MISCONF", "MASTERDOWN", "NOREPLICAS", "READONLY", "OOM")


def _unavailable(error: Exception) -> bool:
    """Whether `error` means Redis cannot serve now (as opposed to a bad call)."""
    if isinstance(error, (rx.ConnectionError, rx.TimeoutError, OSError, *_UNAVAILABLE_RESPONSES)):
        return True
    return isinstance(error, rx.ResponseError) and str(error).startswith(_UNAVAILABLE_PREFIXES)


def _message(entry: list[Any]) -> StoredMessage:
    """A stream entry [b"<seq>-0", [b"m", msg, b"t", type, b"k", task]] as a StoredMessage."""
    entry_id, raw = entry
    fields = dict(zip(raw[::2], raw[1::2], strict=True))
    task = fields.get(b"k", b"")
    return StoredMessage(int(entry_id.split(b"-", 1)[0]), fields[b"t"].decode(), task.decode() or None, fields[b"m"])


def _slice(reply: list[Any]) -> Slice:
    epoch, last_seq, first_seq, entries = reply
    return Slice(epoch.decode(), int(last_seq), int(first_seq), [_message(e) for e in entries])


async def _ignore_failure(error: Exception) -> None:
    """Retry.call_with_retry's failure hook: the line has dropped the failed connection itself."""


def _check_session(session_id: str) -> None:
    if not isinstance(session_id, str) or not SESSION_ID_RE.match(session_id):
        raise ValueError(f"invalid session id {session_id!r}")


#: How many sessions' publish names (keys, channel) a store keeps made.
_NAMES_CACHED = 4096


@dataclass(frozen=True, slots=True)
class _PublishNames:
    keys: list[bytes]
    args: tuple[bytes, bytes]  # the events channel, the due member prefix


@functools.lru_cache(maxsize=16)
def _limits_arg(limits: Limits) -> bytes:
    """publish.lua's ARGV[3]: the limits as one space-separated argument (made once per Limits)."""
    values = (
        limits.buffer_size,
        limits.dedup_window_ms,
        repr(float(limits.min_delta)),
        limits.max_interval_ms,
        limits.session_ttl_ms,
        limits.connection_stale_ms,
    )
    return " ".join(str(value) for value in values).encode()


def _now_arg(now_ms: int | None) -> str:
    return "" if now_ms is None else str(int(now_ms))


class RedisStore:
    """Sessions' shared state in one Redis; every method is a coroutine on the node's loop.

    Build it with `from_url`; one per node, sharing redis-py's connection pool.
    """

    def __init__(self, client: Redis, *, prefix: str = "ab", call_timeout: float | None = None) -> None:
        self.client = client
        #: the longest one call may take before it counts as "Redis cannot answer" (None: redis-py's own timeouts)
        self.call_timeout = call_timeout
        self.prefix = prefix
        common = _load("common.lua")

        def session_script(name: str) -> AsyncScript:
            return client.register_script(common + "\n" + _load(name))

        self._publish = session_script("publish.lua")
        self._flush = session_script("flush.lua")
        self._read = session_script("read.lua")
        self._read_missed = session_script("read_missed.lua")
        self._create_script = session_script("create.lua")
        self._delete = session_script("delete.lua")
        self._connections = session_script("connections.lua")
        self._touch = session_script("touch.lua")
        self._put_connection = client.register_script(_load("put_connection.lua"))
        self._lock = client.register_script(_load("lock_query.lua"))
        self._unlock = client.register_script(_load("unlock_query.lua"))
        self._due = client.register_script(_load("due.lua"))
        self._heartbeat = client.register_script(_load("heartbeat.lua"))
        self._live_nodes = client.register_script(_load("live_nodes.lua"))
        self._due_key = f"{prefix}:throttle:due"
        #: the publish calls' own connection, pipelined (broker/cluster/line.py); every other call uses the pool
        self._line = PipelinedLine(client.connection_pool, deadline=call_timeout)
        self._names: dict[str, _PublishNames] = {}
        self._nodes_key = f"{prefix}:nodes"

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "ab",
        timeout: float = 1.0,
        retries: int = 1,
        max_connections: int = 64,
        health_check_interval: int = 30,
    ) -> RedisStore:
        """A store on redis-py's own pool: `timeout` for each connect, `retries` more
        tries with exponential backoff when a connection fails.

        A Redis that hangs (SIGSTOP, a network holding packets) is reported by the
        store's own deadline on each call (`call_timeout`: the pool's wait, then
        (retries + 1) x timeout), not by redis-py's `socket_timeout`: on Python 3.11
        that one wraps every command's send in `asyncio.wait_for`, a task of its own
        per command (bench/store_publish.py compares the set-ups). A call the deadline
        cuts is cancelled inside redis-py, which then drops that connection (no
        half-read reply is reused); on the publish line, the line's own deadline
        (`PipelinedLine.deadline`, the same length) drops the line.
        """
        retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), retries)
        pool_wait = max(2.0, 2 * timeout)
        # A burst (a reconnect storm of clients) waits for a pooled connection instead of failing at once.
        pool = BlockingConnectionPool.from_url(
            url,
            socket_timeout=None,
            socket_connect_timeout=timeout,
            retry=retry,
            max_connections=max_connections,
            health_check_interval=health_check_interval,
            timeout=pool_wait,
        )
        return cls(Redis(connection_pool=pool), prefix=prefix, call_timeout=pool_wait + (retries + 1) * timeout)

    # -- names -----------------------------------------------------------------

    def _keys(self, session_id: str) -> list[str]:
        _check_session(session_id)
        return [f"{self.prefix}:{{{session_id}}}:{name}" for name in _SESSION_KEYS]

    def _publish_names(self, session_id: str) -> _PublishNames:
        """publish.lua's keys and its channel and due-prefix arguments, made once per session (bounded cache)."""
        names = self._names.get(session_id)
        if names is None:
            keys = [key.encode() for key in self._keys(session_id)]
            keys += [self._due_key.encode(), self._query_key(session_id).encode()]
            names = _PublishNames(keys, (self.events_channel(session_id).encode(), (session_id + "\n").encode()))
            if len(self._names) >= _NAMES_CACHED:
                self._names.pop(next(iter(self._names)))  # the oldest made: a bounded cache, not an LRU
            self._names[session_id] = names
        return names

    def _query_key(self, session_id: str) -> str:
        return f"{self.prefix}:{{{session_id}}}:query"

    def events_channel(self, session_id: str) -> str:
        """The pub/sub channel of one session's committed messages: "ab:{sid}:events"."""
        return f"{self.prefix}:{{{session_id}}}:events"

    @property
    def broadcast_channel(self) -> str:
        """The channel every node subscribes for POST /api/broadcast."""
        return f"{self.prefix}:broadcast"

    def canary_channel(self, node_id: str) -> str:
        """The channel of one node's end-to-end check."""
        return f"{self.prefix}:canary:{node_id}"

    # -- plumbing --------------------------------------------------------------

    async def _run(self, what: str, call: Any, *, bounded: bool = False) -> Any:
        """Await one redis-py call, turning "Redis cannot answer" into BackendUnavailable.

        `bounded`: the call keeps its own deadline (the line's, on a connected line), so no
        timeout context is made around it.
        """
        try:
            if bounded or self.call_timeout is None:
                return await call
            async with asyncio.timeout(self.call_timeout):
                return await call
        except (TimeoutError, LineTimeout) as exc:  # the store's deadline (redis-py's own is rx.TimeoutError)
            raise BackendUnavailable(f"redis did not answer {what} within {self.call_timeout} s") from exc
        except Exception as exc:
            if isinstance(exc, rx.ConnectionError) and str(exc).startswith("No connection available"):
                # redis-py's BlockingConnectionPool wait ran out (its only signal for that is this message)
                raise PoolExhausted(f"redis pool exhausted during {what}: every connection stayed busy") from exc
            if _unavailable(exc):
                raise BackendUnavailable(f"redis unavailable during {what}: {type(exc).__name__}: {exc}") from exc
            raise

    async def _on_line(self, script: AsyncScript, keys: list[bytes], args: list[str | bytes]) -> Any:
        """EVALSHA of `script` on the pipelined line, with redis-py's retry; NOSCRIPT loads it and runs it again.

        The retry (the pool's: one more try after a backoff) repeats a call whose
        connection failed; a publish may run twice that way only with the same
        event ids, which answer the first run's seqs.
        """

        async def call() -> Any:
            try:
                return await self._line.execute("EVALSHA", script.sha, len(keys), *keys, *args)
            except rx.NoScriptError:  # a Redis restarted without persistence, or SCRIPT FLUSH
                async with asyncio.timeout(self.call_timeout):  # a pooled connection: no deadline of the line's
                    script.sha = await self.client.script_load(script.script)
                return await self._line.execute("EVALSHA", script.sha, len(keys), *keys, *args)

        retry = self.client.get_retry()
        if retry is None:
            return await call()
        return await retry.call_with_retry(call, _ignore_failure)

    async def close(self) -> None:
        """Close the line and the pool's connections."""
        await self._line.aclose()
        await self.client.aclose(close_connection_pool=True)

    async def ping(self) -> None:
        """One PING; raises BackendUnavailable if Redis does not answer."""
        await self._run("ping", self.client.ping())

    async def check_server(self) -> list[str]:
        """Warnings about the server's configuration (logged at start-up), [] when all is well."""
        warnings: list[str] = []
        info = await self._run("check_server", self.client.info("server"))
        version = str(info.get("redis_version", "0"))
        if tuple(int(part) for part in version.split(".")[:1]) < (7,):
            warnings.append(f"redis {version} is older than 7.0, which the redis backend needs")
        try:
            policy = await self._run("check_server", self.client.config_get("maxmemory-policy"))
        except rx.ResponseError as exc:  # CONFIG may be renamed or forbidden by an ACL
            warnings.append(f"cannot read maxmemory-policy ({exc}); it must be noeviction")
        else:
            value = policy.get(b"maxmemory-policy", policy.get("maxmemory-policy", b""))
            value = value.decode() if isinstance(value, bytes) else str(value)
            if value != "noeviction":
                warnings.append(f"maxmemory-policy is {value!r}: Redis may evict session history; use noeviction")
        return warnings

    # -- publishing --------------------------------------------------------------

    async def publish(
        self,
        session_id: str,
        events: list[bytes],
        meta: list[EventMeta],
        limits: Limits,
        *,
        now_ms: int | None = None,
        release_query: str | None = None,
        echo: bool = False,
        admitted_here: bool = False,
        origin: str | None = None,
    ) -> PublishResult:
        """Publish a batch to one session in ONE script call: dedup, throttle, seq, XADD, PUBLISH.

        `events` are the validated events' JSON objects (actors.messages.encode),
        `meta` what the script needs of each. Creates the session (new epoch) if
        it does not exist. Semantics exactly as the memory backend (module docstring).
        `release_query`: the id of the query lock this batch ends (its `complete` or
        `error`), released in the same call, so no node can start the next query before
        the end of this one is committed, nor be refused after it was.
        `echo`: the result carries the payload this call published (`PublishResult.echo`),
        for a node that delivers its own publishes from the reply (its pub/sub copy comes too).
        `admitted_here`: a connection on the calling node takes every type, so none of these
        events is `undelivered` (replay=missed), and the script need not read every node's
        connection records to know it.
        `origin`: the calling node's id. When no other live node is marked as hearing
        the session (`ensure` and `touch` with `listener`), the payload is not PUBLISHed:
        `published` is False and `echo` holds it, for the caller's own connections.
        None: always published.
        """
        if len(events) != len(meta):
            raise ValueError(f"{len(events)} events but {len(meta)} metas")
        fields = []
        for data, item in zip(events, meta, strict=True):
            if len(data) < 3 or data[:1] != b"{" or data[-1:] != b"}":
                raise ValueError(f"event {item.event_id!r} is not a non-empty JSON object")
            if item.type == "task_progress" and item.progress is None:
                raise ValueError(f"task_progress {item.event_id!r} has no progress")
            if (item.type == "task_progress" or item.type in _FINISHING) and not item.task_id:
                raise ValueError(f"{item.type} {item.event_id!r} has no task_id")
            action = "" if item.current_action is None else "=" + item.current_action
            progress = "" if item.progress is None else repr(item.progress)
            fields.append((item.event_id, item.type, item.task_id or "", progress, action))
        names = self._publish_names(session_id)
        # publish.lua's ARGV: a handful of packed values (redis-py encodes each argument in Python)
        args: list[str | bytes] = [_now_arg(now_ms), new_epoch(), _limits_arg(limits), *names.args]
        flags = (b"e" if echo else b"") + (b"a" if admitted_here else b"")
        args += [(release_query or "").encode(), flags, (origin or "").encode(), orjson.dumps(fields), *events]
        # on a connected line the line's own deadline bounds the call; connecting is bounded by the store's
        reply = await self._run("publish", self._on_line(self._publish, names.keys, args), bounded=self._line.connected)
        seqs, held, throttled, received, now, payload, published = reply
        return PublishResult(
            [seq or None for seq in seqs],
            [(held[i].decode(), int(held[i + 1])) for i in range(0, len(held), 2)],
            int(throttled),
            int(received),
            int(now),
            payload or None,
            published == 1,
        )

    async def flush(self, session_id: str, task_id: str, limits: Limits, *, now_ms: int | None = None) -> int | None:
        """The trailing edge: commit the task's held progress if it is due; its seq, else None.

        Idempotent: a second flush, or one after a delivery or a finish got there
        first, does nothing. Not due yet (max_interval grew): None, and the due
        set holds the new time, so the sweep delivers it.
        """
        keys = self._keys(session_id)
        args: list[str | int] = [
            _now_arg(now_ms),
            task_id,
            f"{session_id}\n{task_id}",
            limits.max_interval_ms,
            limits.buffer_size,
            limits.session_ttl_ms,
            self.events_channel(session_id),
            limits.connection_stale_ms,
        ]
        seq, _due = await self._run("flush", self._flush(keys=[*keys, self._due_key], args=args))
        return int(seq) or None

    async def due(self, now_ms: int | None = None, limit: int = 100) -> list[tuple[str, str]]:
        """(session_id, task_id) of held progress due by now (Redis time), earliest first: flush each."""
        members = await self._run("due", self._due(keys=[self._due_key], args=[_now_arg(now_ms), limit]))
        pairs: list[tuple[str, str]] = []
        for member in members:
            session_id, _, task_id = member.decode().partition("\n")
            pairs.append((session_id, task_id))
        return pairs

    # -- reading -----------------------------------------------------------------

    async def read(self, session_id: str, after_seq: int) -> Slice:
        """Meta and the stream after `after_seq`, in one snapshot; a missing session is
        Slice("", 0, 1, []) (a read never creates one). first_seq > after_seq + 1 is a gap."""
        if after_seq < 0:
            raise ValueError(f"after_seq must be >= 0, not {after_seq}")
        reply = await self._run("read", self._read(keys=self._keys(session_id), args=[after_seq]))
        return _slice(reply)

    async def read_missed(self, session_id: str, events: list[str] | None = None) -> Slice:
        """replay=missed: the messages no connection on any node was sent yet, that the
        filter echo `events` admits (None: all); they leave `undelivered` (they are sent now)."""
        arg = "" if events is None else orjson.dumps(events)
        reply = await self._run("read_missed", self._read_missed(keys=self._keys(session_id), args=[arg]))
        return _slice(reply)

    async def describe(self, session_id: str) -> dict[str, Any] | None:
        """The session's meta for GET /api/sessions/{id}, or None if it does not exist:
        epoch, last_seq, buffered (messages in the stream), created_ms, last_event_ms
        (None before the first event), throttled. One round trip (MULTI of HGETALL, XLEN)."""
        keys = self._keys(session_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.hgetall(keys[0])
        pipe.xlen(keys[1])
        meta, buffered = await self._run("describe", pipe.execute())
        if b"epoch" not in meta:
            return None
        last_event = meta.get(b"last_event_ms")
        return {
            "epoch": meta[b"epoch"].decode(),
            "last_seq": int(meta.get(b"seq", 0)),
            "buffered": int(buffered),
            "created_ms": int(meta.get(b"created_ms", 0)),
            "last_event_ms": int(last_event) if last_event is not None else None,
            "throttled": int(meta.get(b"throttled", 0)),
        }

    async def exists(self, session_id: str) -> bool:
        """Whether the session exists (has meta)."""
        return bool(await self._run("exists", self.client.exists(self._keys(session_id)[0])))

    # -- session lifecycle ---------------------------------------------------------

    async def _create(
        self, session_id: str, session_ttl_ms: int, now_ms: int | None, listener: str | None = None
    ) -> tuple[bool, str]:
        args: list[str | int] = [_now_arg(now_ms), new_epoch(), session_ttl_ms, listener or ""]
        created, epoch = await self._run("create", self._create_script(keys=self._keys(session_id), args=args))
        return bool(created), epoch.decode()

    async def create(self, session_id: str, session_ttl_ms: int, *, now_ms: int | None = None) -> bool:
        """Research start: create the session with a new epoch; False if it existed (409)."""
        created, _ = await self._create(session_id, session_ttl_ms, now_ms)
        return created

    async def ensure(
        self, session_id: str, session_ttl_ms: int, *, now_ms: int | None = None, listener: str | None = None
    ) -> str:
        """The session's epoch, creating the session if absent (a first connection does).

        `listener`: this node's id, once Redis confirmed its subscription to the
        session's channel and before it reads the stream: from then on a publish
        from another node is PUBLISHed (see `publish`'s `origin`).
        """
        _, epoch = await self._create(session_id, session_ttl_ms, now_ms, listener)
        return epoch

    async def delete(self, session_id: str) -> bool:
        """DELETE: every key of the session and its due entries go; "D <epoch>" is published
        so every node closes its clients. False if it did not exist."""
        keys = [*self._keys(session_id), self._due_key, self._query_key(session_id)]
        args = [self.events_channel(session_id), session_id + "\n"]
        return bool(await self._run("delete", self._delete(keys=keys, args=args)))

    async def touch(
        self, session_ids: list[str], session_ttl_ms: int, listener: str | None = None, stale_ms: int = 0
    ) -> list[str]:
        """Every key of these sessions lives session_ttl from now (one script call each, PIPELINE_CHUNK a pipeline).

        `listener`: restamp this node's mark as hearing each of them (see `ensure`);
        a mark not restamped for `stale_ms` (Limits.connection_stale_ms) is a dead
        node's. Returns the sessions whose mark was missing or stale before: other
        nodes may have published to them without PUBLISHing, so the node reads
        their streams ([] without `listener`).
        """
        lapsed: list[str] = []
        for sessions in batched(session_ids, PIPELINE_CHUNK):
            pipe = self.client.pipeline(transaction=False)
            for session_id in sessions:
                args: list[str | int] = [session_ttl_ms, listener or "", stale_ms]
                await self._touch(keys=self._keys(session_id), args=args, client=pipe)  # queues it
            marked = await self._run("touch", pipe.execute())
            if listener:
                lapsed += [sid for sid, fresh in zip(sessions, marked, strict=True) if not fresh]
        return lapsed

    # -- connections -------------------------------------------------------------

    async def put_connection(
        self, session_id: str, connection_id: str, info: dict[str, Any], session_ttl_ms: int
    ) -> None:
        """Register or update one connection (node_id, user_id, events filter echo, stats).

        `events` decides replay=missed for the whole cluster; `updated_ms` is
        added (this node's clock) when the caller did not set it. The script stamps
        the record with Redis time (`seen_ms`): the node refreshes it every check,
        and one it stops refreshing (it died) goes stale (Limits.connection_stale_ms).
        """
        await self.write_connections([(session_id, connection_id, info)], [], session_ttl_ms)

    async def drop_connection(self, session_id: str, connection_id: str) -> None:
        """Forget one connection."""
        await self.write_connections([], [(session_id, connection_id)], 0)

    async def write_connections(
        self, puts: list[tuple[str, str, dict[str, Any]]], drops: list[tuple[str, str]], session_ttl_ms: int
    ) -> None:
        """Register, refresh and forget many connections in a few round trips (pipelines, not transactions).

        A node refreshes every connection it holds each check, and a reconnect
        storm joins and leaves hundreds at once; a round trip each would hold
        the pool, and a node slower to refresh than 3 x backend_check_interval
        would look dead to the others. One pipeline of them all would hold the
        event loop instead (see PIPELINE_CHUNK): they go PIPELINE_CHUNK at a time.
        """
        by_session: dict[str, list[str | bytes | int]] = {}
        for session_id, connection_id, info in puts:
            record = {k: v for k, v in info.items() if k != "seen_ms"}  # the script stamps it, by Redis time
            record.setdefault("updated_ms", int(time.time() * 1000))
            if not isinstance(record.get("events"), list):
                raise ValueError("connection info needs 'events', the filter echo (a list of strings)")
            by_session.setdefault(session_id, []).extend((connection_id, orjson.dumps(record)))
        gone: dict[str, list[str]] = {}
        for session_id, connection_id in drops:
            gone.setdefault(session_id, []).append(connection_id)
        calls = [(sid, part) for sid, pairs in by_session.items() for part in batched(pairs, 2 * _RECORDS_PER_CALL)]
        for chunk in batched(calls, PIPELINE_CHUNK):
            pipe = self.client.pipeline(transaction=False)
            for session_id, pairs in chunk:
                keys = [self._keys(session_id)[6]]
                await self._put_connection(keys=keys, args=[session_ttl_ms, *pairs], client=pipe)  # queues it
            await self._run("write_connections", pipe.execute())
        for chunk in batched(list(gone.items()), PIPELINE_CHUNK):
            pipe = self.client.pipeline(transaction=False)
            for session_id, connection_ids in chunk:
                pipe.hdel(self._keys(session_id)[6], *connection_ids)
            await self._run("write_connections", pipe.execute())

    async def connections(self, session_id: str, stale_ms: int = 0) -> list[dict[str, Any]]:
        """The session's connections on every node, each with `connection_id` added; records
        not refreshed for `stale_ms` (a dead node's) are dropped, not listed (0: keep all)."""
        reply = await self._run("connections", self._connections(keys=self._keys(session_id), args=[stale_ms]))
        raw = dict(zip(reply[::2], reply[1::2], strict=True))
        result: list[dict[str, Any]] = []
        for connection_id, data in sorted(raw.items()):
            record = orjson.loads(data)
            record["connection_id"] = connection_id.decode()
            result.append(record)
        return result

    # -- queries -------------------------------------------------------------------

    async def lock_query(self, session_id: str, query_id: str, ttl_ms: int) -> bool:
        """Take the session's query lock for `ttl_ms`; False if another query holds it (busy)."""
        _check_session(session_id)
        keys = [self._query_key(session_id)]
        return bool(await self._run("lock_query", self._lock(keys=keys, args=[query_id, ttl_ms])))

    async def unlock_query(self, session_id: str, query_id: str) -> None:
        """Release the lock, only if `query_id` still holds it."""
        _check_session(session_id)
        await self._run("unlock_query", self._unlock(keys=[self._query_key(session_id)], args=[query_id]))

    # -- nodes and fan-out -------------------------------------------------------------

    async def heartbeat(self, node_id: str) -> None:
        """This node is alive (stamped with Redis time)."""
        await self._run("heartbeat", self._heartbeat(keys=[self._nodes_key], args=[node_id]))

    async def live_nodes(self, silent_after_ms: int) -> list[str]:
        """Nodes heard from within `silent_after_ms` (sorted); the silent ones are forgotten."""
        names = await self._run("live_nodes", self._live_nodes(keys=[self._nodes_key], args=[silent_after_ms]))
        return sorted(name.decode() for name in names)

    async def broadcast(self, payload: bytes) -> None:
        """PUBLISH on ab:broadcast (POST /api/broadcast reaches every node)."""
        await self._run("broadcast", self.client.publish(self.broadcast_channel, payload))

    async def canary(self, node_id: str, token: bytes) -> None:
        """PUBLISH a node's canary token on ab:canary:<node_id>."""
        await self._run("canary", self.client.publish(self.canary_channel(node_id), token))


def batched(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """`items` in runs of at most `size`, in order (itertools.batched is Python 3.12)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
