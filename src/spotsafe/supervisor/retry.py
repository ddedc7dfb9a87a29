"""When to relaunch, and after how long: the relaunch policy (a value) and the budget it spends (counters).

Preemptions and errors have separate budgets. A preemption never is the job's
fault, so its budget is large. An error counts only when the job made no
progress: when the newest checkpoint's step did not advance since the attempt
before. A crash loop that never gets past its checkpoint stops after
``max_errors`` attempts in a row; a long job that crashes now and then, but
checkpoints in between, keeps going. An attempt that found no capacity uses
neither budget (failover moves the job, and a deadline escalates it), but it
lengthens the backoff. The wait is the shared :class:`~spotsafe.backoff.Backoff`
(exponential with full jitter: a random delay between 0 and
``min(max_delay_s, initial_s * 2**n)``), counted from the consecutive failures,
so that a fleet of jobs reclaimed together does not come back all at once.

:class:`RelaunchPolicy` is what a job allows (frozen, from its job file or preset);
:class:`RelaunchBudget` is what its attempts have used of it, and decides after each.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

from spotsafe.backoff import Backoff
from spotsafe.errors import ConfigError
from spotsafe.supervisor.classify import ExitClass


@dataclass(frozen=True)
class Verdict:
    """What to do after an attempt: ``relaunch`` after ``delay_s``, or stop with ``reason``."""

    relaunch: bool
    delay_s: float
    reason: str


@dataclass(frozen=True, kw_only=True)
class RelaunchPolicy:
    """Relaunch limits and backoff. ``max_preemptions``: preemptions the job may have in all; ``max_errors``:
    errors without progress in a row after which it gives up (an error after progress does not count).
    The delay before a relaunch grows with the failures in a row without progress; after progress it is 0."""

    max_preemptions: int = 100
    max_errors: int = 3
    initial_s: float = 1.0
    max_delay_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("max_preemptions", "max_errors"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("initial_s", "max_delay_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ConfigError(f"{name} must be a finite number of seconds >= 0, got {value!r}")

    @cached_property
    def backoff(self) -> Backoff:
        """The wait before a relaunch: ``backoff.delay(failures, rng)``, uniform in
        ``[0, min(max_delay_s, initial_s * 2**(failures - 1))]`` (0 after no failure). No time budget:
        the counted limits above end a job, and a deadline escalates it."""
        return Backoff(initial_s=self.initial_s, multiplier=2.0, max_delay_s=self.max_delay_s)


@dataclass
class RelaunchBudget:
    """What one job's attempts have used of its :class:`RelaunchPolicy`, and the decision after each attempt."""

    policy: RelaunchPolicy
    preemptions: int = 0
    errors_in_a_row: int = 0
    failures_in_a_row: int = 0

    @classmethod
    def replay(cls, policy: RelaunchPolicy, history: Iterable[tuple[ExitClass, bool]]) -> RelaunchBudget:
        """The counters after the attempts in ``history`` ((exit class, progressed) each, oldest first):
        how a supervisor started again for a job carries its budgets on."""
        budget = cls(policy)
        rng = random.Random(0)
        for exit_class, progressed in history:
            budget.after(exit_class, progressed=progressed, rng=rng)
        return budget

    def after(self, exit_class: ExitClass, *, progressed: bool, rng: random.Random) -> Verdict:
        """Count an attempt that ended with ``exit_class`` (``progressed``: the checkpoint step advanced)."""
        if exit_class is ExitClass.SUCCEEDED:
            return Verdict(False, 0.0, "the job succeeded")
        if exit_class is ExitClass.USAGE:
            return Verdict(False, 0.0, "the job reported a usage or configuration error (exit 2): retrying cannot help")
        if exit_class is ExitClass.NO_USABLE_CHECKPOINT:
            return Verdict(
                False,
                0.0,
                "the job found committed checkpoints and none it can restore (exit 65): a relaunch would find the "
                "same ones; see its checkpoint_skipped events or `spotsafe verify --all`, or set "
                "SPOTSAFE_ON_DAMAGED=start_fresh to start from step 0",
            )
        if progressed:
            self.errors_in_a_row = 0
            self.failures_in_a_row = 0
        else:
            self.failures_in_a_row += 1
        delay = self.policy.backoff.delay(self.failures_in_a_row, rng)
        if exit_class is ExitClass.NO_CAPACITY:  # no budget: failover and the deadline decide
            return Verdict(True, delay, f"no capacity ({self.failures_in_a_row} failures in a row): trying again")
        if exit_class.is_preemption:
            self.preemptions += 1
            if self.preemptions > self.policy.max_preemptions:
                return Verdict(False, 0.0, f"preemption budget spent ({self.policy.max_preemptions} preemptions)")
            return Verdict(True, delay, f"{exit_class.value}: relaunching (preemption {self.preemptions})")
        if progressed:
            return Verdict(True, delay, f"{exit_class.value} after the checkpoint advanced: relaunching")
        self.errors_in_a_row += 1
        if self.errors_in_a_row >= self.policy.max_errors:
            return Verdict(
                False,
                0.0,
                f"error budget spent: {self.errors_in_a_row} {exit_class.value} exits in a row without the "
                f"checkpoint advancing (max_errors={self.policy.max_errors})",
            )
        why = f"{self.errors_in_a_row} in a row without progress"
        return Verdict(True, delay, f"{exit_class.value} ({why}): relaunching")
