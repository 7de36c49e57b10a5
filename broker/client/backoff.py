"""How long to wait before the next attempt: exponential backoff with jitter.

Thousands of clients dropped by the same failure must not come back in the
same millisecond, so each delay is drawn at random from the upper half of
an exponentially growing window (attempt 0: `initial`, doubling up to
`maximum`): never zero, never in step with another client.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Backoff"]


@dataclass(frozen=True)
class Backoff:
    """The retry policy of `follow()` and `Publisher`.

    `delay(n)` is the wait before retry number `n` (0 for the first retry
    after a failure). `rng` is injectable so a test can fix the draws.
    """

    #: the window of the first retry, in seconds
    initial: float = 0.5
    #: the largest window, in seconds
    maximum: float = 30.0
    #: the window grows by this factor per failed attempt
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not (0 < self.initial <= self.maximum) or self.factor < 1:
            raise ValueError("Backoff needs 0 < initial <= maximum and factor >= 1")

    def window(self, attempt: int) -> float:
        """The upper bound of the delay before retry `attempt`."""
        return min(self.maximum, self.initial * self.factor ** min(attempt, 64))

    def delay(self, attempt: int) -> float:
        """A random delay in the upper half of `window(attempt)`."""
        top = self.window(attempt)
        return self.rng.uniform(top / 2, top)
