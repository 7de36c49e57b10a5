"""Run the broker as a process: loop, dispatcher, HTTP server, signals, systemd.

The life of a daemon, in order:

1. start: install the actor dispatcher on the loop, build the Broker and the
   application, bind the listening sockets;
2. ready: once the sockets listen (a `connect()` succeeds from then on),
   `/readyz` turns 200 and systemd gets `READY=1`; from then on `WATCHDOG=1`
   goes out from the loop at half of `WATCHDOG_USEC` (a blocked loop stops
   the pings and systemd restarts the service) and `STATUS=` with live
   counts every few seconds;
3. SIGHUP: reload the configuration file (see `Daemon.reload`);
4. SIGTERM / SIGINT: `STOPPING=1`, then the drain of docs/protocol.md section 3.8:
   `/readyz` 503, new handshakes and publishes 503, every client gets
   `server_shutdown` then close 1001, actors stop (connections, then
   sessions, then the rest), the HTTP server stops; exit 0 within
   `shutdown_timeout`. A second signal during the drain exits at once.

Everything here runs on the loop thread, except the forced-exit signal
handler (see `Daemon._force_exit`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from types import FrameType
from typing import Any, TypeVar

import structlog
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop, PeriodicCallback
from tornado.netutil import bind_sockets

from actors.messages import CloseConnection
from actors.runtime import Dispatcher, LoopDispatcher, install_dispatcher
from actors.wire import CloseCode, control_frame
from broker.app import SERVER_MAX_BODY, make_app
from broker.config import ConfigError, Settings, changed_keys, diff_for_reload, load_settings
from broker.core import Broker
from broker.descriptors import DescriptorBudget
from broker.gc_tuning import THAW_CHECK_INTERVAL, GcPauses, freeze_startup
from broker.listener import GuardedHTTPServer
from broker.logs import configure_logging, set_level
from broker.sdnotify import SdNotifier, watchdog_period

__all__ = ["RECONNECT_AFTER_MS", "STATUS_INTERVAL", "Daemon", "event_loop_factory", "run_on_event_loop", "serve"]

log = structlog.get_logger("actor_broker.daemon")

T = TypeVar("T")

#: How long clients are asked to wait before reconnecting after a shutdown:
#: long enough for a restart under systemd, short enough not to be noticed.
RECONNECT_AFTER_MS = 2000
#: Seconds between `STATUS=` updates (systemctl status shows the latest).
STATUS_INTERVAL = 5.0
#: How often the drain checks whether every client has gone. Closes are
#: driven by the actors and sockets; this only notices that they are done.
DRAIN_POLL = 0.05
#: Part of `shutdown_timeout` (at most this many seconds) kept for stopping
#: actors and the server after the clients had their chance to leave.
STOP_RESERVE = 1.0


EXIT_OK = 0
EXIT_CANNOT_LISTEN = 1


class Daemon:
    """One broker process. `run()` returns the exit code.

    `config_path` is the file SIGHUP reloads (None: nothing to reload).
    `environ` is where `NOTIFY_SOCKET` and `WATCHDOG_USEC` are read, and what a
    reload layers over the file (None: `os.environ`).
    """

    def __init__(
        self, settings: Settings, config_path: str | None = None, environ: dict[str, str] | None = None
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.environ = dict(os.environ if environ is None else environ)
        self.notifier = SdNotifier(self.environ)
        self.watchdog_period = watchdog_period(self.environ)
        self.broker: Broker | None = None
        self.app: tornado.web.Application | None = None
        self.dispatcher: Dispatcher | None = None
        self.port: int | None = None
        self._stop = asyncio.Event()
        self._periodic: list[PeriodicCallback] = []
        self._pins = self._flag_pins()

    # -- lifecycle ----------------------------------------------------------

    async def run(self) -> int:
        """Serve until SIGTERM / SIGINT, then drain. Runs on the loop it serves."""
        settings = self.settings
        dispatcher = LoopDispatcher(IOLoop.current())
        previous = install_dispatcher(dispatcher)
        self.dispatcher = dispatcher
        broker = self.broker = Broker(settings)
        self.app = make_app(broker)
        # Descriptors, timeouts and the accept back-off: docs/protocol.md section 5, "Sockets".
        budget = broker.descriptors = DescriptorBudget.for_process(lambda: broker.settings.fd_reserve)
        server = GuardedHTTPServer(
            self.app, settings=lambda: broker.settings, budget=budget, max_body_size=SERVER_MAX_BODY, xheaders=False
        )
        try:
            sockets = bind_sockets(settings.port, settings.host)
        except OSError as exc:
            log.error("listen_failed", host=settings.host, port=settings.port, error=str(exc))
            self.notifier.notify(
                f"STATUS=cannot listen on {settings.host}:{settings.port}: {exc}", f"ERRNO={exc.errno or 0}"
            )
            install_dispatcher(previous)
            return EXIT_CANNOT_LISTEN
        server.add_sockets(sockets)
        budget.announce(settings.max_connections)
        self.port = sockets[0].getsockname()[1]
        self._install_signal_handlers()
        try:
            # The sockets listen from here on: a client's connect() succeeds
            # (the kernel queues it until the loop accepts), so this is ready.
            broker.ready = True
            await broker.start()  # the cluster node, if any: it starts even while Redis is down
            broker.gc_pauses = GcPauses(freeze_survivors=True).install()
            frozen = freeze_startup()
            log.info(
                "listening",
                event_loop=loop_name(asyncio.get_running_loop()),
                gc_frozen_objects=frozen,
                host=settings.host,
                port=self.port,
                pid=os.getpid(),
                watchdog_period=self.watchdog_period,
                config_path=self.config_path,
            )
            self.notifier.ready(self.status_line())
            self._start_periodic()
            await self._stop.wait()
            await self.drain(server)
        finally:
            self._stop_periodic()
            self._remove_signal_handlers()
            install_dispatcher(previous)
            self.notifier.close()
        log.info("stopped", exit_code=EXIT_OK)
        return EXIT_OK

    def request_stop(self, signame: str = "request") -> None:
        """Begin the graceful shutdown (what SIGTERM and SIGINT do)."""
        if self._stop.is_set():
            return
        self.notifier.stopping(f"stopping ({signame}): draining connections")
        log.info("shutdown_requested", signal=signame)
        self._stop.set()

    def status_line(self) -> str:
        """The one line `systemctl status` shows: what the broker holds right now."""
        broker = self.broker
        if broker is None:
            return "starting"
        stats = broker.stats
        counts = (
            f"{stats.active_connections} connections, {len(broker.directory)} sessions, "
            f"{stats.total_buffered_messages} buffered messages"
        )
        return f"draining: {counts}" if broker.draining else counts

    # -- drain -------------------------------------------------------------

    async def drain(self, server: HTTPServer) -> None:
        """Refuse new work, tell every client to come back later, close them with 1001.

        Bounded by `shutdown_timeout` (as it is now: a reload may have
        changed it): clients that have not gone when only `STOP_RESERVE` is
        left are closed at once, then actors stop, then the server.
        """
        broker = self.broker
        assert broker is not None
        loop = asyncio.get_running_loop()
        timeout = max(0.0, broker.settings.shutdown_timeout)
        deadline = loop.time() + timeout
        clients_deadline = deadline - min(STOP_RESERVE, timeout / 5)
        broker.ready = False
        broker.draining = True
        log.info(
            "draining",
            connections=broker.stats.active_connections,
            sessions=len(broker.directory),
            shutdown_timeout=timeout,
        )
        self.notifier.status(self.status_line())
        notice = control_frame({"type": "server_shutdown", "reconnect_after_ms": RECONNECT_AFTER_MS})
        goodbye = CloseConnection(CloseCode.GOING_AWAY, "server shutdown")
        told: set[str] = set()
        while True:
            # Listed again each round: a handshake that passed admission just
            # before draining began opens its connection a moment later.
            told.update(broker.tell_connections(notice, goodbye, skip=told))
            if not self._clients_left() or loop.time() >= clients_deadline:
                break
            await asyncio.sleep(DRAIN_POLL)
        if self._clients_left():
            log.warning(
                "drain_timeout",
                connections=broker.stats.active_connections,
                sockets=broker.open_connections,
                shutdown_timeout=timeout,
            )
            broker.close_all(CloseCode.GOING_AWAY, "server shutdown")
        else:
            log.info("clients_closed", seconds=round(timeout - (deadline - loop.time()), 3))
        await broker.stop_actors(max(0.0, deadline - loop.time()))
        await broker.close()
        server.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.close_all_connections(), max(0.0, deadline - loop.time()))

    def _clients_left(self) -> bool:
        """True while a connection actor lives or a WebSocket has not closed yet."""
        broker = self.broker
        assert broker is not None
        return broker.stats.active_connections > 0 or broker.open_connections > 0

    # -- reload ------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: read the configuration file again and apply what can change live.

        Settings other than host, port, backend and redis_url take effect at
        once, for new and existing sessions and connections: the broker's
        actors read `broker.settings` when they use a value. The others keep
        their value and are logged as needing a restart. A file that does not
        load is logged and changes nothing. Values the command line gave
        (`--log-level`) still win over the file, as at start-up.
        """
        broker = self.broker
        if broker is None:
            return
        path = self.config_path
        if path is None:
            log.warning("reload_skipped", reason="no configuration file: start with --config or BROKER_CONFIG")
            return
        self.notifier.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            try:
                fresh = load_settings(path, env=self.environ)
            except ConfigError as exc:
                log.error("config_reload_failed", path=path, error=str(exc), kept="the settings in use")
                return
            except Exception as exc:
                log.error("config_reload_failed", path=path, error=repr(exc), kept="the settings in use", exc_info=True)
                return
            old = broker.settings
            applied, needs_restart = diff_for_reload(old, fresh.replace(**self._pins))
            changed = changed_keys(old, applied)
            broker.settings = applied
            self._apply_to_runtime(old, applied)
            log.info("config_reloaded", path=path, changed=changed)
            if needs_restart:
                log.warning(
                    "config_restart_required",
                    path=path,
                    keys=needs_restart,
                    detail="these keys keep their old value until the daemon restarts",
                )
        finally:
            self.notifier.ready(self.status_line())

    def _apply_to_runtime(self, old: Settings, new: Settings) -> None:
        """What reads settings outside `broker.settings`: logging.

        Everything else (pings, sizes, limits) is read from `broker.settings`
        when used, so a reload reaches existing connections and sessions too.
        """
        if (new.log_format, new.log_level) != (old.log_format, old.log_level):
            if new.log_format != old.log_format:
                configure_logging(new.log_level, new.log_format)
            else:
                set_level(new.log_level)

    def _flag_pins(self) -> dict[str, Any]:
        """Settings the caller set beyond the file and environment (command-line flags).

        `serve()` gets finished settings, not the flags; comparing them with
        what the file and environment alone give recovers the flags' values,
        so a reload keeps them. If the file cannot be read now, nothing is
        pinned (the reload will say what is wrong with it).
        """
        if self.config_path is None:
            return {}
        try:
            baseline = load_settings(self.config_path, env=self.environ)
        except Exception:  # noqa: BLE001 - only a refinement; start-up already validated
            return {}
        return {key: getattr(self.settings, key) for key in changed_keys(baseline, self.settings)}

    # -- signals and timers --------------------------------------------------

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)

    def _remove_signal_handlers(self) -> None:
        """Give the signals back (matters when `run()` is embedded in a longer-lived process)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            if not loop.remove_signal_handler(sig) and signal.getsignal(sig) == self._force_exit:
                signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        """First SIGTERM / SIGINT: drain. From now on the next one exits at once."""
        loop = asyncio.get_running_loop()
        for other in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(other)
            # A plain handler, not the loop's: it must work even if the loop is stuck.
            signal.signal(other, self._force_exit)
        self.request_stop(sig.name)

    def _on_reload_signal(self) -> None:
        log.info("reload_requested", signal="SIGHUP", path=self.config_path)
        self.reload()

    def _force_exit(self, signum: int, frame: FrameType | None) -> None:
        """A second stop signal: give up on the drain and exit now.

        Runs in the main thread between two bytecodes, wherever the loop is,
        so it does the minimum: one log line, flush, `os._exit`. The exit code
        is 128 + the signal's number, as a shell reports a killed process.
        """
        name = signal.Signals(signum).name
        log.warning("forced_exit", signal=name, detail="second stop signal during the drain")
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os._exit(128 + signum)

    def _ping_watchdog(self) -> None:
        # PeriodicCallback awaits what its callback returns: the notifier's bool is not for it.
        self.notifier.watchdog()

    def _start_periodic(self) -> None:
        if self.watchdog_period is not None:
            self.notifier.watchdog()
            self._periodic.append(PeriodicCallback(self._ping_watchdog, self.watchdog_period * 1000))
        if self.notifier.enabled:
            self._periodic.append(PeriodicCallback(self._send_status, STATUS_INTERVAL * 1000))
        self._periodic.append(PeriodicCallback(self._thaw_when_due, THAW_CHECK_INTERVAL * 1000))
        for callback in self._periodic:
            callback.start()

    def _stop_periodic(self) -> None:
        for callback in self._periodic:
            callback.stop()
        self._periodic.clear()

    def _thaw_when_due(self) -> None:
        broker = self.broker
        if broker is not None and broker.gc_pauses is not None:
            broker.gc_pauses.thaw_when_due(broker.settings.gc_thaw_interval, time.monotonic())

    def _send_status(self) -> None:
        self.notifier.status(self.status_line())


def serve(settings: Settings, config_path: str | None = None) -> int:
    """Run the daemon until it is stopped; returns the process exit code.

    `config_path` is the file the settings were loaded from (SIGHUP reloads
    it); the CLI resolves it from `--config` or `BROKER_CONFIG`.
    """
    configure_logging(settings.log_level, settings.log_format)
    return run_on_event_loop(Daemon(settings, config_path).run(), settings.event_loop)


def event_loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop factory for the `event_loop` setting; None: asyncio's own loop.

    uvloop is an optional extra (`pip install 'actor-broker[uvloop]'`), so it
    is imported only here: "auto" takes it when it is installed, "uvloop"
    needs it (broker.config refuses that setting at load when it is absent).
    """
    if choice == "asyncio":
        return None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run_on_event_loop(main: Coroutine[Any, Any, T], choice: str) -> T:
    """`asyncio.run(main)` on the loop `choice` names (the `event_loop` setting).

    The loop is made before Tornado's IOLoop exists: Tornado wraps whichever
    asyncio loop is running when `Daemon.run` first asks for it.
    """
    with asyncio.Runner(loop_factory=event_loop_factory(choice)) as runner:
        return runner.run(main)


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """The loop's name for the start-up log line: "uvloop" or "asyncio"."""
    return "uvloop" if type(loop).__module__.split(".")[0] == "uvloop" else "asyncio"
