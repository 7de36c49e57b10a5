"""Subscriber: the node's one Redis pub/sub connection, kept alive and proven alive (docs/cluster.md).

A node hears what other nodes commit through Redis pub/sub: the channel of
every session it holds connections for (`ab:{sid}:events`), the broadcast
channel (`ab:broadcast`) and its own canary channel (`ab:canary:<node_id>`).
Pub/sub is fire and forget: a message sent while the subscription is down is
gone, and nothing tells the subscriber. That is how other brokers' nodes go
deaf (centrifugal/centrifugo#1189, python-socketio#1581: the listener never
resubscribed after Redis dropped it, and nothing was logged). So this class
owns three things:

* **Confirmed subscriptions.** redis-py's `subscribe()` only sends the
  command; `subscribe()` here returns once Redis's `subscribe` reply for
  the channel came back on the connection, so anything published after it
  returns is delivered (the node subscribes first, then reads the stream,
  and merges by seq: a subscription that was not yet in place would lose
  whatever was published in between).
* **Reconnect, resubscribe, catch up.** One task reads the connection
  (the connection's own `read_response(timeout=...)`, in a loop that catches everything). Any loss
  (a dropped connection, `CLIENT KILL TYPE pubsub`, a Redis restart, the
  output-buffer limit) tears the connection down; a new one is made after a
  backoff computed by redis-py's `ExponentialWithJitterBackoff`, every
  channel is subscribed again in one command, and once Redis confirmed all
  of them `on_restored()` is called: what was published meanwhile is only
  in the streams, and the node reads it back from there.
* **The canary.** A connection can stay open and still deliver nothing (a
  half-open TCP connection, a hung Redis). Every `check_interval` seconds a
  fresh token is published on this node's canary channel through an
  ordinary client, and it must come back on the pub/sub connection within
  `check_interval`. If it does not, `healthy` turns False, `backend_deaf` is
  logged (once per episode), and the connection is torn down and made
  again as above. `healthy` turns True again only when a canary came back.
  A subscription that dies silently is noticed within 2 x `check_interval`
  (the canary in flight when it died, or the next one, misses its deadline).

Nothing is reference-counted: the node subscribes once per session it holds
connections for and unsubscribes when the last of them leaves.

Everything here runs on the event loop thread, the callbacks included.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import structlog
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import RedisError

from broker.cluster.store import BackendUnavailable

__all__ = ["Subscriber"]

log = structlog.get_logger("actor_broker.cluster")

_Kind = Literal["subscribe", "unsubscribe"]

#: how many messages the reader handles in a row before it lets other tasks run
_YIELD_EVERY = 64
#: the first reconnect waits at most twice this (then it doubles, up to the cap)
_BACKOFF_BASE = 0.05
#: the longest wait between two connection attempts
_BACKOFF_CAP = 2.0


@dataclass(slots=True, eq=False)
class _Waiter:
    """A caller waiting for Redis to confirm one SUBSCRIBE or UNSUBSCRIBE of one channel.

    `ticket` is the position of the caller's command among the commands of
    that kind for that channel sent on the current connection: the waiter
    is done once that many replies came back. None while no connection is
    up: the next connection's first SUBSCRIBE (of every wanted channel) is
    ticket 1.
    """

    ticket: int | None
    future: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


def _describe(error: BaseException) -> str:
    """An error for the log: redis-py's repr() of its errors drops the message."""
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _connection_of(pubsub: PubSub) -> AbstractConnection | None:
    """The PubSub's connection (redis-py leaves the attribute unannotated: mypy takes it for always None)."""
    return cast("AbstractConnection | None", pubsub.connection)


class Subscriber:
    """One pub/sub connection per node; see the module docstring for what it guarantees.

    Callbacks run on the loop thread, from the reader task, one at a time:

    * `on_events(session_id, payload)`: a message of `ab:{sid}:events`, the
      payload bytes exactly as published (broker/cluster/payload.py parses them);
    * `on_broadcast(payload)`: a message of `ab:broadcast`;
    * `on_restored()`: the connection was lost (or proved deaf) and is back,
      every channel subscribed again: catch up from the streams.

    An exception in a callback is logged (`subscriber_callback_failed`) and
    the reader goes on with the next message.

    Counters for /metrics (plain ints, only ever growing): `messages_received`
    (session and broadcast messages; canaries are not counted),
    `reconnects` (connections made again after a loss) and `canary_failures`.
    """

    def __init__(
        self,
        url: str,
        node_id: str,
        *,
        on_events: Callable[[str, bytes], None],
        on_broadcast: Callable[[bytes], None],
        on_restored: Callable[[], None],
        check_interval: float,
        prefix: str = "ab",
        timeout: float = 2.0,
    ) -> None:
        """`timeout` bounds connecting and every confirmation awaited (subscribe, unsubscribe, resubscribe)."""
        if check_interval <= 0:
            raise ValueError(f"check_interval must be positive, not {check_interval!r}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout!r}")
        self.node_id = node_id
        self.check_interval = check_interval
        self.timeout = timeout
        self.messages_received = 0
        self.reconnects = 0
        self.canary_failures = 0
        self._prefix = prefix
        self._on_events = on_events
        self._on_broadcast = on_broadcast
        self._on_restored = on_restored
        self._log = log.bind(node_id=node_id)
        self._broadcast_channel = f"{prefix}:broadcast".encode()
        self._canary_channel = f"{prefix}:canary:{node_id}".encode()
        # The pub/sub connection: redis-py must not retry or reconnect it by itself
        # (it would resubscribe behind our back, and we would never call on_restored):
        # no error is "supported" by its Retry, so every error reaches the reader.
        # Named, so that CLIENT LIST on the Redis side says which node a connection belongs to.
        name = re.sub(r"[^\x21-\x7e]", "_", node_id)
        self._sub_client = Redis.from_url(
            url,
            client_name=f"actor-broker:pubsub:{name}",
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0, supported_errors=()),
            health_check_interval=0,
        )
        # The canary's publisher: an ordinary client, bounded by the canary's own deadline.
        self._pub_client = Redis.from_url(
            url,
            client_name=f"actor-broker:canary:{name}",
            socket_timeout=check_interval,
            socket_connect_timeout=check_interval,
            retry=Retry(NoBackoff(), 0),
            max_connections=4,
        )
        self._backoff = ExponentialWithJitterBackoff(cap=min(_BACKOFF_CAP, check_interval), base=_BACKOFF_BASE)
        self._poll = min(0.25, check_interval / 4)
        #: channel -> session id, for every session the node asked for
        self._wanted: dict[bytes, str] = {}
        #: the current connection, once the command that (re)subscribes everything is on its way
        self._pubsub: PubSub | None = None
        #: commands sent and replies received on the current connection, per (kind, channel)
        self._sent: dict[tuple[_Kind, bytes], int] = {}
        self._confirmed: dict[tuple[_Kind, bytes], int] = {}
        self._waiters: dict[tuple[_Kind, bytes], list[_Waiter]] = {}
        #: channels of the current connection's first SUBSCRIBE whose reply has not come yet
        self._restoring: set[bytes] = set()
        self._restore_deadline = 0.0
        #: every channel of the current connection confirmed
        self._subscribed = False
        #: the last canary came back (reset by every reconnect)
        self._canary_ok = False
        #: a canary failed and none has come back since (backend_deaf was logged)
        self._deaf = False
        #: a connection loss was logged and the connection is not back yet
        self._outage = False
        #: the canary asks the reader to drop the connection
        self._teardown_reason: str | None = None
        self._attempt = 0
        self._canary: tuple[bytes, asyncio.Future[bool]] | None = None
        self._probe_now = asyncio.Event()
        self._started: asyncio.Future[BaseException | None] | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._canary_task: asyncio.Task[None] | None = None
        self._stopped = False

    # -- what the node asks ------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """Connected, every channel confirmed, and the last canary came back within check_interval."""
        return self._subscribed and self._canary_ok and not self._stopped

    @property
    def sessions(self) -> frozenset[str]:
        """The sessions subscribed (or being subscribed again after a loss)."""
        return frozenset(self._wanted.values())

    def events_channel(self, session_id: str) -> bytes:
        """The channel of one session's committed messages (the store publishes on it)."""
        return f"{self._prefix}:{{{session_id}}}:events".encode()

    async def start(self) -> None:
        """Connect and subscribe the broadcast and canary channels; return once Redis confirmed them.

        Raises BackendUnavailable if the first connection fails; nothing is
        left running then, and `start()` may be called again later. Once it
        returned, the subscriber reconnects by itself until `stop()`.
        `healthy` turns True when the first canary comes back (it is sent at once).
        """
        if self._stopped:
            raise RuntimeError("the subscriber was stopped")
        if self._reader_task is not None:
            raise RuntimeError("the subscriber is already started")
        started = self._started = asyncio.get_running_loop().create_future()
        self._reader_task = asyncio.create_task(self._run(), name=f"subscriber-reader-{self.node_id}")
        error = await started
        if error is not None:
            await self._end_tasks()
            raise BackendUnavailable(f"cannot subscribe to Redis: {_describe(error)}") from error
        self._canary_task = asyncio.create_task(self._canary_loop(), name=f"subscriber-canary-{self.node_id}")

    async def stop(self) -> None:
        """End both tasks and close every connection; pending subscribe() calls raise BackendUnavailable."""
        self._stopped = True
        if self._started is not None and not self._started.done():  # a start() still waiting raises
            self._started.set_result(BackendUnavailable("the subscriber stopped"))
        await self._end_tasks()
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.future.done():
                    waiter.future.set_exception(BackendUnavailable("the subscriber stopped"))
        await self._sub_client.aclose()
        await self._pub_client.aclose()

    async def subscribe(self, session_id: str) -> None:
        """Subscribe one session's channel; return once Redis confirmed it (a PUBLISH after this is received).

        While the connection is down this waits for it to come back. Raises
        BackendUnavailable when no confirmation came within `timeout`; the
        session is then not subscribed (a late confirmation is undone).
        """
        if self._stopped:
            raise BackendUnavailable("the subscriber stopped")
        channel = self.events_channel(session_id)
        self._wanted[channel] = session_id
        key: tuple[_Kind, bytes] = ("subscribe", channel)
        waiter = self._add_waiter(key)
        try:
            async with asyncio.timeout(self.timeout):
                pubsub = self._sendable()
                if pubsub is not None:
                    waiter.ticket = self._count_sent(key)
                    try:
                        await pubsub.subscribe(channel)
                    except (RedisError, OSError) as error:
                        # The reader sees the same broken connection, makes a new one and
                        # subscribes every wanted channel again: that confirms this waiter.
                        self._log.debug("subscribe_not_sent", session_id=session_id, error=_describe(error))
                await waiter.future
        except TimeoutError:
            if self._wanted.get(channel) == session_id:
                del self._wanted[channel]
            raise BackendUnavailable(
                f"Redis did not confirm the subscription of session {session_id!r} within {self.timeout} s"
            ) from None
        finally:
            self._drop_waiter(key, waiter)

    async def unsubscribe(self, session_id: str) -> None:
        """Stop delivering one session's messages at once; return once Redis confirmed (at most `timeout`).

        Never raises for Redis's sake: without a connection there is nothing
        to undo (the next connection does not subscribe it), and a message
        of the session that still arrives is dropped.
        """
        channel = self.events_channel(session_id)
        if self._wanted.pop(channel, None) is None:
            return
        pubsub = self._sendable()
        if pubsub is None:
            return
        key: tuple[_Kind, bytes] = ("unsubscribe", channel)
        waiter = self._add_waiter(key)
        waiter.ticket = self._count_sent(key)
        try:
            async with asyncio.timeout(self.timeout):
                await pubsub.unsubscribe(channel)
                await waiter.future
        except (TimeoutError, RedisError, OSError, BackendUnavailable) as error:
            self._log.debug("unsubscribe_unconfirmed", session_id=session_id, error=_describe(error))
        finally:
            self._drop_waiter(key, waiter)

    # -- the reader ---------------------------------------------------------------

    async def _run(self) -> None:
        """Connect, read until the connection fails or is found deaf, tear down, back off, again.

        Every loop here ends on `_stopped` as well as on its cancel: a cancel that lands
        inside a redis-py call can be lost (seen under load in tests/test_cluster_daemons.py:
        the reader went on after stop() cancelled it; compare redis/redis-py#2551), and
        a read with a short timeout (`_read`) is where the reader always waits.
        """
        while not self._stopped:
            try:
                await self._connect()
                await self._read()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - whatever went wrong, the answer is a new connection
                if self._started is not None and not self._started.done():
                    self._log.warning("pubsub_connect_failed", error=_describe(error))
                    await self._teardown()
                    self._started.set_result(error)  # start() raises it
                    return
                self._lost(error)
            finally:
                await self._teardown()
            self._attempt += 1
            await asyncio.sleep(self._backoff.compute(self._attempt))  # the reconnect backoff

    async def _connect(self) -> None:
        pubsub = self._sub_client.pubsub()
        try:
            async with asyncio.timeout(self.timeout):
                await pubsub.connect()  # type: ignore[no-untyped-call]
        except BaseException:
            await pubsub.aclose()
            raise
        # From here on subscribe() sends its own SUBSCRIBE: a channel wanted now is in
        # this batch, a channel wanted later is sent by its caller; never neither.
        self._pubsub = pubsub
        self._sent.clear()
        self._confirmed.clear()
        batch = [self._broadcast_channel, self._canary_channel, *self._wanted]
        for channel in batch:
            self._sent["subscribe", channel] = 1
        for (kind, channel), waiters in self._waiters.items():
            for waiter in waiters:
                if kind == "subscribe" and channel in self._wanted:
                    waiter.ticket = 1
                elif not waiter.future.done():  # unsubscribed meanwhile: nothing left to confirm
                    waiter.future.set_result(None)
        self._restoring = set(batch)
        self._restore_deadline = asyncio.get_running_loop().time() + self.timeout
        async with asyncio.timeout(self.timeout):
            await pubsub.subscribe(*batch)

    async def _read(self) -> None:
        """Read the current connection until the canary asks for a new one; raise when it fails."""
        pubsub = self._pubsub
        assert pubsub is not None
        loop = asyncio.get_running_loop()
        handled = 0
        while self._teardown_reason is None and not self._stopped:
            connection = _connection_of(pubsub)
            # redis-py would silently reconnect (and resubscribe) a dropped connection on the next read
            if connection is None or not connection.is_connected:
                raise BackendUnavailable("the pub/sub connection was closed")
            if self._restoring and loop.time() > self._restore_deadline:
                raise BackendUnavailable(f"Redis did not confirm the subscriptions within {self.timeout} s")
            # The connection's own read, not get_message(): for each published message that
            # is redis-py's health check, retry wrapper, message dict and observability hook
            # (broker/cluster/line.py says why the publish path skips the same layers).
            # (push_request: redis-py speaks RESP3, where a published message is a push)
            response = await connection.read_response(timeout=self._poll, push_request=True)
            if response is None:
                continue
            if type(response) is list and len(response) == 3 and response[0] == b"message":
                self._message(response[1], response[2])
            else:  # subscribe / unsubscribe confirmations: redis-py keeps its channel bookkeeping
                message = await pubsub.handle_message(response)  # type: ignore[no-untyped-call]
                if message is not None:
                    await self._handle(pubsub, message)
            handled += 1
            if handled % _YIELD_EVERY == 0:
                await asyncio.sleep(0)  # buffered messages are read without yielding to other tasks

    def _message(self, channel: bytes, data: bytes) -> None:
        """A published message on one of the channels."""
        if channel == self._canary_channel:
            canary = self._canary
            if canary is not None and canary[0] == data and not canary[1].done():
                canary[1].set_result(True)
        elif channel == self._broadcast_channel:
            self.messages_received += 1
            self._call("on_broadcast", self._on_broadcast, data)
        else:
            session_id = self._wanted.get(channel)
            if session_id is not None:  # else unsubscribed, and Redis has not processed it yet
                self.messages_received += 1
                self._call("on_events", self._on_events, session_id, data)

    async def _handle(self, pubsub: PubSub, message: dict[str, Any]) -> None:
        kind = message["type"]
        channel: bytes = message["channel"]
        if kind == "message":
            self._message(channel, message["data"])
        elif kind == "subscribe":
            self._confirm("subscribe", channel)
            if channel in self._restoring:
                self._restoring.discard(channel)
                if not self._restoring:
                    self._restored()
            if self._orphaned(channel):
                # a subscribe() that gave up (timeout) was confirmed after all: undo it
                self._count_sent(("unsubscribe", channel))
                await pubsub.unsubscribe(channel)
        elif kind == "unsubscribe":
            self._confirm("unsubscribe", channel)

    def _orphaned(self, channel: bytes) -> bool:
        if channel in self._wanted or channel in (self._broadcast_channel, self._canary_channel):
            return False
        key: tuple[_Kind, bytes] = ("unsubscribe", channel)
        return self._sent.get(key, 0) == self._confirmed.get(key, 0)

    def _restored(self) -> None:
        """Every channel of a new connection is confirmed."""
        self._subscribed = True
        self._outage = False
        self._probe_now.set()
        if self._started is not None and not self._started.done():
            self._log.info("pubsub_connected", channels=len(self._wanted) + 2)
            self._started.set_result(None)
            return
        self.reconnects += 1
        self._log.info("pubsub_restored", sessions=len(self._wanted), attempts=self._attempt)
        self._call("on_restored", self._on_restored)

    def _lost(self, error: Exception) -> None:
        if not self._outage:
            self._outage = True
            self._log.warning("pubsub_lost", error=_describe(error), sessions=len(self._wanted))
        else:
            self._log.debug("pubsub_connect_failed", error=_describe(error), attempt=self._attempt)

    async def _teardown(self) -> None:
        """Forget the current connection: not subscribed, not healthy; close it."""
        self._subscribed = False
        self._canary_ok = False
        self._teardown_reason = None
        self._restoring.clear()
        pubsub, self._pubsub = self._pubsub, None
        for (kind, _channel), waiters in self._waiters.items():
            if kind == "unsubscribe":  # the connection is gone, and so is the subscription
                for waiter in waiters:
                    if not waiter.future.done():
                        waiter.future.set_result(None)
        canary = self._canary
        if canary is not None and not canary[1].done():
            canary[1].set_result(False)
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    # -- the canary ---------------------------------------------------------------

    async def _canary_loop(self) -> None:
        """Every check_interval (and at once after a reconnect): one canary with a deadline of check_interval."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not self._stopped:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(next_at):
                    await self._probe_now.wait()
            self._probe_now.clear()
            next_at = loop.time() + self.check_interval
            if self._subscribed and self._teardown_reason is None:
                try:
                    await self._probe(next_at)
                except Exception:  # noqa: BLE001 - the check must outlive its own bugs
                    self._log.exception("canary_failed_unexpectedly")

    async def _probe(self, deadline: float) -> None:
        token = secrets.token_hex(8).encode()
        came_back: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._canary = (token, came_back)
        try:
            async with asyncio.timeout_at(deadline):
                await self._pub_client.publish(self._canary_channel, token)
                heard = await came_back
        except Exception as error:  # noqa: BLE001 - a publish that fails or times out is a failed canary
            self._canary_failed(error)
            return
        finally:
            self._canary = None
        if heard:
            self._canary_ok = True
            self._attempt = 0
            if self._deaf:
                self._deaf = False
                self._log.info("backend_deaf_repaired")
        # else: the reader lost the connection meanwhile; it logged that and reconnects

    def _canary_failed(self, error: Exception) -> None:
        if not self._subscribed:
            return  # the reader already knows the connection is gone
        self.canary_failures += 1
        self._canary_ok = False
        if not self._deaf:
            self._deaf = True
            self._log.warning(
                "backend_deaf", check_interval=self.check_interval, error=_describe(error), sessions=len(self._wanted)
            )
        self._teardown_reason = "canary"

    # -- helpers ------------------------------------------------------------------

    def _sendable(self) -> PubSub | None:
        """The connection a caller may send on now, or None (the reader's next connection covers it)."""
        pubsub = self._pubsub
        if pubsub is None or self._teardown_reason is not None:
            return None
        connection = _connection_of(pubsub)
        if connection is None or not connection.is_connected:
            return None
        return pubsub

    def _count_sent(self, key: tuple[_Kind, bytes]) -> int:
        sent = self._sent[key] = self._sent.get(key, 0) + 1
        return sent

    def _confirm(self, kind: _Kind, channel: bytes) -> None:
        key = (kind, channel)
        confirmed = self._confirmed[key] = self._confirmed.get(key, 0) + 1
        for waiter in self._waiters.get(key, ()):
            if waiter.ticket is not None and waiter.ticket <= confirmed and not waiter.future.done():
                waiter.future.set_result(None)

    def _add_waiter(self, key: tuple[_Kind, bytes]) -> _Waiter:
        waiter = _Waiter(ticket=None)
        self._waiters.setdefault(key, []).append(waiter)
        return waiter

    def _drop_waiter(self, key: tuple[_Kind, bytes], waiter: _Waiter) -> None:
        waiters = self._waiters.get(key)
        if waiters is not None:
            with contextlib.suppress(ValueError):
                waiters.remove(waiter)
            if not waiters:
                del self._waiters[key]

    def _call(self, name: str, callback: Callable[..., None], *args: Any) -> None:
        try:
            callback(*args)
        except Exception:  # noqa: BLE001 - the node's bug must not deafen the node
            self._log.exception("subscriber_callback_failed", callback=name)

    async def _end_tasks(self) -> None:
        tasks = [task for task in (self._canary_task, self._reader_task) if task is not None]
        self._canary_task = self._reader_task = None
        for task in tasks:
            task.cancel()
        if tasks:
            # asyncio.wait, not `await task` under suppress(CancelledError): that would also
            # swallow a cancel of the caller itself (stop() under its node's timeout).
            await asyncio.wait(tasks)
            for task in tasks:
                error = None if task.cancelled() else task.exception()
                if error is not None:
                    self._log.warning("subscriber_task_failed", error=_describe(error))
        await self._teardown()
