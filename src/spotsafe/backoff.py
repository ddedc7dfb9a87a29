"""The one backoff: exponential growth, full jitter, an optional time budget.

Both retry mechanisms draw their waits here: storage retries
(:class:`spotsafe.storage.retry.StorageRetry`) and relaunches
(:class:`spotsafe.supervisor.retry.RelaunchPolicy`). A :class:`Backoff` is a
frozen value with two pure methods over explicit inputs; the clock, the sleep
and the random source belong to the caller, so tests inject them::

    backoff = Backoff(initial_s=0.1, multiplier=2.0, max_delay_s=10.0, budget_s=120.0)
    delay = backoff.delay(attempt, rng)          # uniform in [0, min(10, 0.1 * 2**(attempt - 1))]
    if not backoff.allows(spent_s=clock() - started, delay_s=delay):
        raise ...                                # the budget would be spent before the next try

tenacity was considered and not used: its jittered waits draw from the module-level
``random``, which a test cannot seed per call site, and the budget here is checked
against a caller's clock before each sleep, not after.

Counted limits (how many preemptions, how many errors in a row) are not a property
of the wait and stay with the relaunch budget that counts them.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from spotsafe.checks import check_number


@dataclass(frozen=True, kw_only=True)
class Backoff:
    """Waits ``uniform(0, min(max_delay_s, initial_s * multiplier**(n - 1)))`` before try ``n + 1``.

    ``budget_s`` bounds when the last retry may start (a retry whose wait would end past it is
    not made); the duration of that last try comes on top. ``math.inf``: no time budget.
    """

    initial_s: float
    max_delay_s: float
    multiplier: float = 2.0
    budget_s: float = math.inf

    def __post_init__(self) -> None:
        check_number("Backoff.initial_s", self.initial_s, at_least=0, unit="seconds")
        check_number("Backoff.max_delay_s", self.max_delay_s, at_least=0, finite=False, unit="seconds")
        check_number("Backoff.multiplier", self.multiplier, at_least=1)
        check_number("Backoff.budget_s", self.budget_s, at_least=0, finite=False, unit="seconds")

    def ceiling(self, failures: int) -> float:
        """The largest wait after ``failures`` failures in a row (0 for none): the capped exponential."""
        if failures <= 0:
            return 0.0
        try:
            grown = self.initial_s * self.multiplier ** (failures - 1)
        except OverflowError:  # far past any cap: the cap applies
            grown = math.inf if self.initial_s > 0 else 0.0
        return min(self.max_delay_s, grown)

    def delay(self, failures: int, rng: random.Random) -> float:
        """Full jitter: uniform in ``[0, ceiling(failures)]``; 0 without drawing when ``failures <= 0``.

        Draws exactly one ``rng.uniform`` per call with ``failures >= 1``, so a seeded ``rng``
        gives the same waits in the same order.
        """
        if failures <= 0:
            return 0.0
        return rng.uniform(0.0, self.ceiling(failures))

    def allows(self, *, spent_s: float, delay_s: float) -> bool:
        """Whether a retry that first waits ``delay_s``, ``spent_s`` after the first try began, is within budget."""
        return spent_s + delay_s <= self.budget_s
