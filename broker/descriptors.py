"""The process's file descriptors: the open-file limit, the budget, what ran short.

Every client socket is a descriptor, and a process has a fixed number of
them (`RLIMIT_NOFILE`). Without a budget, long-lived connections (WebSockets,
Server-Sent Events) can take the last one, and then nothing is accepted any
more: not a health probe, not a publish. So (docs/protocol.md section 5,
"Sockets"):

* at start-up the soft limit is raised to the hard limit (`raise_open_file_limit`);
* the budget is that limit minus `fd_reserve`; long-lived connections are
  refused (503) once the descriptors in use reach it (`DescriptorBudget.exhausted`,
  called from `Broker.admit_connection`), so the reserve stays for health
  probes, publishers and the backend;
* the counts of what was done when descriptors ran short (accept failures,
  idle connections shed, connections closed for a timeout) live here too,
  for `/metrics`.

Descriptors in use are counted, not listed, on the hot path: the descriptors
the process had besides client sockets (its listening sockets, the event
loop, log files) are listed from `/proc/self/fd` at start-up and again at
most once a second near the budget and at each `/metrics` scrape; client
sockets are counted as they open and close (`broker.listener`).
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

__all__ = ["DescriptorBudget", "OpenFileLimit", "count_open_descriptors", "raise_open_file_limit"]

log = structlog.get_logger("actor_broker.descriptors")

#: Where the process's open descriptors are listed (Linux; `/dev/fd` elsewhere).
_FD_DIRECTORIES = ("/proc/self/fd", "/dev/fd")
#: Least time between two listings near the budget (a listing costs about 1 µs per descriptor).
RECOUNT_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class OpenFileLimit:
    """The soft limit before and after start-up raised it, and the hard limit."""

    before: int
    soft: int
    hard: int | None  # None: unlimited


def raise_open_file_limit() -> OpenFileLimit:
    """Raise the soft `RLIMIT_NOFILE` to the hard limit; the limits before and after.

    The soft limit (often 1024) is what `open()` and `accept()` run into; only
    the hard one is a decision of the administrator (systemd's `LimitNOFILE=`).
    An unlimited hard limit (not on Linux) leaves the soft one as it is: there
    is no number to raise it to.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return OpenFileLimit(soft, soft, None)
    if soft == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return OpenFileLimit(soft, soft, hard)
        return OpenFileLimit(soft, hard, hard)
    return OpenFileLimit(soft, soft, hard)


def count_open_descriptors() -> int | None:
    """Descriptors this process has open now, or None where they cannot be listed."""
    for directory in _FD_DIRECTORIES:
        try:
            # The listing opens one descriptor of its own, which it lists too.
            return len(os.listdir(directory)) - 1
        except OSError:
            continue
    return None


class DescriptorBudget:
    """How many descriptors the process has, uses and may give to long-lived connections.

    `reserve` is read at each check (a SIGHUP reload may change `fd_reserve`).
    `baseline` is the descriptors that are not client sockets; `sockets` the
    client sockets open now (the listener counts them).
    """

    def __init__(self, limit: int, reserve: Callable[[], int], baseline: int = 0) -> None:
        self.limit = limit
        self._reserve = reserve
        self.baseline = baseline
        self.sockets = 0
        #: accept() calls that failed (EMFILE, ENFILE, ...), each followed by a back-off
        self.accept_failures = 0
        #: connections waiting for a request that were closed to make room past the budget
        self.shed = 0
        #: connections closed because a timeout ran out, by what they were waiting for
        self.timeouts: dict[str, int] = {"headers": 0, "idle": 0, "body": 0}
        self._recounted_at = -RECOUNT_INTERVAL
        #: the limits as start-up found and left them (None: not raised by this object)
        self.raised: OpenFileLimit | None = None

    @classmethod
    def for_process(cls, reserve: Callable[[], int]) -> DescriptorBudget:
        """Raise this process's open-file limit (see `raise_open_file_limit`) and budget it."""
        limits = raise_open_file_limit()
        budget = cls(limits.soft, reserve)
        budget.raised = limits
        budget.recount()
        return budget

    def announce(self, max_connections: int) -> None:
        """The start-up log line: the limit, the budget, and a warning if max_connections cannot fit.

        Call it once the listening sockets exist, so they count in what is in use.
        """
        in_use = self.recount()
        room = max(0, self.budget - in_use)
        fields = {
            "limit": self.limit,
            "limit_before": self.raised.before if self.raised else self.limit,
            "hard_limit": self.raised.hard if self.raised else None,
            "fd_reserve": self.reserve,
            "budget": self.budget,
            "in_use": in_use,
            "max_connections": max_connections,
        }
        log.info("descriptor_budget", **fields)
        if max_connections > room:
            log.warning(
                "max_connections_over_budget",
                **fields,
                connections_that_fit=room,
                detail=(
                    "past the descriptor budget, WebSocket and SSE handshakes are answered 503 before "
                    "max_connections is reached; raise the hard open-file limit (LimitNOFILE=) or lower "
                    "max_connections"
                ),
            )

    @property
    def reserve(self) -> int:
        return self._reserve()

    @property
    def budget(self) -> int:
        """Descriptors long-lived connections may bring the total to."""
        return max(0, self.limit - self.reserve)

    @property
    def in_use(self) -> int:
        return self.baseline + self.sockets

    def exhausted(self) -> bool:
        """Whether a new long-lived connection would eat into the reserve (refuse it: 503)."""
        if self.in_use < self.budget:
            return False
        self.recount_soon()  # descriptors closed outside the listener's sight may have freed room
        return self.in_use >= self.budget

    def over_budget(self) -> bool:
        """Whether more descriptors are in use than the budget (the listener sheds idle ones)."""
        return self.in_use > self.budget

    def socket_opened(self) -> None:
        self.sockets += 1

    def socket_closed(self) -> None:
        self.sockets -= 1

    def recount(self) -> int:
        """List the open descriptors and take the ones that are not client sockets as the baseline."""
        counted = count_open_descriptors()
        self._recounted_at = time.monotonic()
        if counted is not None:
            self.baseline = max(0, counted - self.sockets)
        return self.in_use

    def recount_soon(self) -> None:
        """`recount`, unless one ran within the last RECOUNT_INTERVAL."""
        if time.monotonic() - self._recounted_at >= RECOUNT_INTERVAL:
            self.recount()
