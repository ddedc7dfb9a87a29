"""Failover knobs, criticality presets, and health scores per pool and per machine.

Health is computed from the job's attempts alone (the job store's rows), so a
supervisor started again sees the same scores. Three things count against
capacity, each within a sliding ``window_s``:

* a **reclaim** (the attempt was preempted or killed from outside) counts against its pool;
* **no capacity** (the launcher could not get a machine) counts against its pool, in a row;
* an **error** (crash, out of memory, no progress) counts against the machine it ran on.

A pool reclaimed ``reclaims`` times within the window, or without capacity
``capacity_failures`` times in a row, is excluded until ``cooldown_s`` after the
last of those; a machine with ``machine_errors`` errors likewise. A score is
``1 - (count / threshold)``, floored at 0: 1.0 is healthy, 0.0 is excluded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from spotsafe.errors import ConfigError
from spotsafe.supervisor.classify import ExitClass
from spotsafe.supervisor.retry import RelaunchPolicy


@dataclass(frozen=True, kw_only=True)
class FailoverPolicy:
    """When to leave a pool or a machine, and when to pay for on-demand capacity.

    ``deadline_slack``: escalate when the projected spot finish is later than the deadline minus this
    fraction of the time left (0.1: keep a tenth in hand). ``escalate``: on-demand may be used for a
    deadline at all. ``on_demand_when_spot_exhausted``: use on-demand while every spot pool cools down,
    instead of waiting for one.
    """

    reclaims: int = 3
    capacity_failures: int = 2
    machine_errors: int = 2
    window_s: float = 3600.0
    cooldown_s: float = 1800.0
    deadline_slack: float = 0.1
    escalate: bool = True
    on_demand_when_spot_exhausted: bool = False

    def __post_init__(self) -> None:
        for name in ("reclaims", "capacity_failures", "machine_errors"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"failover {name} must be an integer >= 1, got {value!r}")
        for name in ("window_s", "cooldown_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ConfigError(f"failover {name} must be a finite number of seconds >= 0, got {value!r}")
        slack = self.deadline_slack
        if isinstance(slack, bool) or not isinstance(slack, (int, float)) or not 0 <= slack < 1:
            raise ConfigError(f"failover deadline_slack must be a fraction in [0, 1), got {slack!r}")


@dataclass(frozen=True)
class Preset:
    """A criticality level: the relaunch budgets and failover knobs that go with it."""

    name: str
    retry: RelaunchPolicy
    failover: FailoverPolicy
    summary: str


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "critical",
            RelaunchPolicy(max_preemptions=1000, max_errors=5, initial_s=1.0, max_delay_s=30.0),
            FailoverPolicy(
                reclaims=2,
                capacity_failures=1,
                machine_errors=1,
                cooldown_s=7200.0,
                deadline_slack=0.25,
                on_demand_when_spot_exhausted=True,
            ),
            "must finish on time: leave a pool after 2 reclaims in an hour, keep a quarter of the time left "
            "in hand, and run on-demand rather than wait for spot capacity",
        ),
        Preset(
            "standard",
            RelaunchPolicy(),
            FailoverPolicy(),
            "leave a pool after 3 reclaims in an hour for 30 minutes; on-demand only when the deadline is at risk",
        ),
        Preset(
            "opportunistic",
            RelaunchPolicy(max_preemptions=10_000, max_errors=3, initial_s=5.0, max_delay_s=600.0),
            FailoverPolicy(
                reclaims=5, capacity_failures=3, machine_errors=3, cooldown_s=900.0, deadline_slack=0.0, escalate=False
            ),
            "cheapest possible: spot only, never on-demand (a deadline is reported, not enforced), waits for capacity",
        ),
    )
}


def preset(name: str) -> Preset:
    """The preset called ``name``; a :class:`ConfigError` that lists the others when there is none."""
    if name not in PRESETS:
        raise ConfigError(f"criticality must be one of {', '.join(PRESETS)}, got {name!r}")
    return PRESETS[name]


@dataclass(frozen=True)
class Outcome:
    """One finished attempt as health sees it."""

    time: float
    pool: str
    machine: str | None
    exit_class: ExitClass


@dataclass(frozen=True)
class Exclusion:
    pool: str
    machine: str | None
    until: float
    score: float
    reason: str
    no_capacity: bool = False
    """Excluded because it could not provide machines (waiting helps), not because it was reclaimed."""

    @property
    def key(self) -> tuple[str, str | None]:
        return (self.pool, self.machine)


@dataclass
class Health:
    """Scores and exclusions at one moment, from the outcomes so far."""

    policy: FailoverPolicy
    outcomes: list[Outcome] = field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)

    def extend(self, outcomes: Iterable[Outcome]) -> None:
        self.outcomes.extend(outcomes)

    def _recent(self, now: float) -> list[Outcome]:
        return [o for o in self.outcomes if now - o.time <= self.policy.window_s]

    def _capacity_run(self, pool: str, now: float) -> list[Outcome]:
        """The pool's latest attempts without capacity, in a row, within the window."""
        run: list[Outcome] = []
        for o in reversed([o for o in self._recent(now) if o.pool == pool]):
            if o.exit_class is not ExitClass.NO_CAPACITY:
                break
            run.append(o)
        return run

    def pool_exclusion(self, pool: str, now: float) -> Exclusion:
        """The pool's score, and (``until > now``) whether it is excluded."""
        p = self.policy
        reclaims = [o for o in self._recent(now) if o.pool == pool and o.exit_class.is_preemption]
        short = self._capacity_run(pool, now)
        score = 1.0 - max(len(reclaims) / p.reclaims, len(short) / p.capacity_failures)
        until, reason, no_capacity = -math.inf, "", False
        if len(reclaims) >= p.reclaims:
            until = reclaims[-1].time + p.cooldown_s
            reason = f"reclaimed {_times(len(reclaims))} within {_span(p.window_s)}"
        if len(short) >= p.capacity_failures and short[0].time + p.cooldown_s > until:
            until = short[0].time + p.cooldown_s
            reason, no_capacity = f"no capacity {_times(len(short))} in a row", True
        return Exclusion(pool, None, until, max(0.0, score), reason, no_capacity)

    def machine_exclusions(self, pool: str, now: float) -> list[Exclusion]:
        """Machines of ``pool`` with errors in the window, each with its score and cool-down."""
        p = self.policy
        errors: dict[str, list[Outcome]] = {}
        for o in self._recent(now):
            if o.pool == pool and o.machine and o.exit_class.is_error:
                errors.setdefault(o.machine, []).append(o)
        out = []
        for machine, bad in errors.items():
            until = bad[-1].time + p.cooldown_s if len(bad) >= p.machine_errors else -math.inf
            reason = (
                f"{len(bad)} failed attempts ({', '.join(o.exit_class.value for o in bad)}) within {_span(p.window_s)}"
            )
            out.append(Exclusion(pool, machine, until, max(0.0, 1.0 - len(bad) / p.machine_errors), reason))
        return out

    def excluded_machines(self, pool: str, now: float) -> tuple[str, ...]:
        return tuple(sorted(e.machine for e in self.machine_exclusions(pool, now) if e.machine and e.until > now))


def _times(n: int) -> str:
    return "once" if n == 1 else "twice" if n == 2 else f"{n} times"


def _span(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        hours = int(seconds // 3600)
        return "an hour" if hours == 1 else f"{hours} hours"
    if seconds >= 60:
        return f"{seconds / 60:g} minutes"
    return f"{seconds:g} s"


def with_overrides(policy: FailoverPolicy, **changes: object) -> FailoverPolicy:
    """``policy`` with the given fields changed (validated again)."""
    return replace(policy, **changes)  # type: ignore[arg-type]
