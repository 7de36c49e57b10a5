"""The systemd notification protocol (`sd_notify(3)`), written by hand.

The whole protocol is one datagram of `KEY=VALUE` lines sent to the
AF_UNIX socket named by `$NOTIFY_SOCKET`, so a dependency (libsystemd, a
binding package) would cost more than it saves. Outside systemd the
variable is unset and every call here does nothing, so the daemon calls it
unconditionally.

Sending never raises: a notification that cannot be delivered (systemd
restarting, the socket gone) must not take the broker down; it is dropped,
as `sd_notify()` itself does, and logged once per run of failures (the
watchdog pings several times a second).

Thread-safety: `SdNotifier` may be used from any thread; each call is one
`sendto` on a datagram socket, which the kernel keeps atomic.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger("actor_broker.sdnotify")

__all__ = ["SdNotifier", "watchdog_period"]


class SdNotifier:
    """Sends state changes to the service manager named by `NOTIFY_SOCKET`.

    `environ` is read once, at construction, so tests can pass their own.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._sock: socket.socket | None = None
        #: set while sends fail, so a gone manager is logged once, not at every ping
        self._failing = False

    @property
    def enabled(self) -> bool:
        """True when a service manager listens (we run under `Type=notify`)."""
        return self._address is not None

    def notify(self, *fields: str) -> bool:
        """Send `fields` (e.g. `"READY=1"`, `"STATUS=..."`) as one datagram.

        Returns True if the datagram was handed to the kernel. Newlines in a
        field would start a new assignment, so they are replaced by spaces.
        """
        if self._address is None or not fields:
            return False
        payload = "\n".join(field.replace("\n", " ") for field in fields).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # A full receive queue must not stall the event loop: drop instead.
                self._sock.setblocking(False)
            self._sock.sendto(payload, self._address)
        except OSError as exc:
            if not self._failing:
                self._failing = True
                log.warning("sd_notify_failed", error=str(exc), fields=[f.split("=", 1)[0] for f in fields])
            return False
        if self._failing:
            self._failing = False
            log.info("sd_notify_recovered")
        return True

    def ready(self, status: str | None = None) -> bool:
        """`READY=1`: start-up is complete (systemd starts the units that wait for us)."""
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        """`STATUS=`: one line shown by `systemctl status`."""
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        """`WATCHDOG=1`: the keep-alive ping; a missing one gets the service restarted."""
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """`STOPPING=1`: shutdown has begun, so systemd does not take the delay for a hang."""
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        """`RELOADING=1`: a configuration reload is under way (`READY=1` ends it)."""
        return self.notify("RELOADING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _socket_address(value: str) -> str | bytes | None:
    """`NOTIFY_SOCKET` as an address for `sendto`, or None when unusable.

    A leading `@` names a socket in the abstract namespace (a NUL byte on
    the wire). Anything but a path or an abstract name (systemd 254 also
    allows `vsock:`) is not supported and disables notifications.
    """
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def watchdog_period(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between `WATCHDOG=1` pings: half of `WATCHDOG_USEC`, or None.

    Half, as `sd_watchdog_enabled(3)` recommends, so one late ping is not
    yet a missed one. `WATCHDOG_PID`, when set, must be this process: the
    watchdog is meant for the main process, not for children that inherit
    the environment.
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2 / 1_000_000
