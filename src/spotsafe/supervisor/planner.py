"""Where the next attempt runs: the cheapest healthy spot pool, or on-demand when the deadline is at risk.

A pure decision over explicit inputs (pools, health, the clock's ``now``, measured
progress), so that failover and escalation are tested with an injected clock.

Projection: ``step_rate`` is the checkpoint progress per second of held
machine time (attempts' durations, so replayed work and restarts already count
against it); ``effective_rate`` is the progress per second of the job's whole
life, downtime between attempts included. On spot the job is projected to
finish at ``now + remaining / effective_rate``; on on-demand at
``now + remaining / step_rate``. The deadline is at risk when the spot finish is
later than ``deadline - slack * (deadline - now)``. A pool excluded for reclaims is passed over only while another
pool can be used: reclaims do not stop work, so with nowhere else to go the job
stays. A pool excluded for lack of capacity is waited for. Escalation is sticky: once
a job moved to on-demand for its deadline it stays there, so that it does not
flap between markets as the estimate moves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from spotsafe.supervisor.health import Exclusion, FailoverPolicy, Health
from spotsafe.supervisor.pools import Pool
from spotsafe.supervisor.store import AttemptRecord


@dataclass(frozen=True)
class Rates:
    """Measured progress. ``None``: not measured yet."""

    step_rate: float | None
    effective_rate: float | None
    done: int | None


def measure(attempts: Sequence[AttemptRecord], now: float, newest: int | None) -> Rates:
    """Rates from the job's attempts (oldest first) and its ``newest`` committed step now."""
    ended = [a for a in attempts if a.ended is not None and a.exit_class != "no_capacity"]
    held = sum(max(0.0, a.ended - a.started) for a in ended if a.ended is not None)
    gained = sum(max(0, (a.step_after or 0) - (a.step_before or 0)) for a in ended if a.step_after is not None)
    step_rate = gained / held if ended and held > 0 else None
    effective = None
    if attempts and ended:
        first = attempts[0]
        elapsed = now - first.started
        if elapsed > 0:
            effective = max(0, (newest if newest is not None else 0) - (first.step_before or 0)) / elapsed
    return Rates(step_rate, effective, newest)


@dataclass(frozen=True)
class Projection:
    deadline: float
    remaining: int
    spot_finish: float | None
    on_demand_finish: float | None
    limit: float
    at_risk: bool
    reason: str


def project(*, deadline: float, total_steps: int, rates: Rates, now: float, slack: float) -> Projection:
    remaining = max(0, total_steps - (rates.done + 1 if rates.done is not None else 0))
    limit = deadline - slack * max(0.0, deadline - now)
    od = now + remaining / rates.step_rate if rates.step_rate else None
    if remaining == 0:
        return Projection(deadline, 0, now, now, limit, False, "the work is done")
    if rates.effective_rate is None:
        return Projection(deadline, remaining, None, od, limit, now > limit, "no progress measured yet")
    spot = now + remaining / rates.effective_rate if rates.effective_rate > 0 else math.inf
    at_risk = spot > limit
    why = (
        f"{remaining} steps left at {rates.effective_rate * 3600:.0f} steps/h overall: spot finishes "
        f"{_when(spot, now)}, {'after' if at_risk else 'before'} the limit {_when(limit, now)} "
        f"(deadline {_when(deadline, now)} less {slack:.0%} of the time left)"
    )
    if od is not None:
        why += f"; on-demand would finish {_when(od, now)}"
    return Projection(deadline, remaining, spot, od, limit, at_risk, why)


def _when(t: float, now: float) -> str:
    if math.isinf(t):
        return "never"
    d = t - now
    sign = "in " if d >= 0 else ""
    d = abs(d)
    text = f"{d / 3600:.1f} h" if d >= 5400 else f"{d / 60:.1f} min" if d >= 90 else f"{d:.0f} s"
    return sign + text + ("" if t >= now else " ago")


@dataclass(frozen=True)
class Decision:
    """``pool`` to launch in (``None``: wait ``wait_s`` for a cool-down to end), and why."""

    pool: Pool | None
    reason: str
    wait_s: float = 0.0
    escalated: bool = False
    newly_escalated: bool = False
    excluded: list[Exclusion] = field(default_factory=list)
    projection: Projection | None = None


def _price(pool: Pool) -> tuple[float, str]:
    return (pool.price_per_hour * pool.nodes, pool.name)


def choose(
    pools: Sequence[Pool],
    health: Health,
    *,
    now: float,
    policy: FailoverPolicy,
    projection: Projection | None,
    escalated: bool,
) -> Decision:
    """The pool for the next attempt. See the module docstring for the rules."""
    exclusions = [health.pool_exclusion(p.name, now) for p in pools]
    out = [e for e in exclusions if e.until > now]
    usable = [p for p, e in zip(pools, exclusions, strict=True) if e.until <= now]
    spot = sorted((p for p in usable if p.spot), key=_price)
    od = sorted((p for p in usable if not p.spot), key=_price)
    has_od = any(not p.spot for p in pools)
    away = "; ".join(f"{e.pool} excluded for {_when(e.until, now).removeprefix('in ')} ({e.reason})" for e in out)
    suffix = f"; {away}" if away else ""

    def wait(why: str) -> Decision:
        ends = [e.until for e in exclusions if e.until > now]
        return Decision(
            None,
            why + suffix,
            wait_s=(min(ends) - now) if ends else 60.0,
            excluded=out,
            escalated=escalated,
            projection=projection,
        )

    # Reclaims do not stop work: with nowhere else to go, stay in the cheapest pool that was only reclaimed.
    reclaimed = sorted(
        (p for p, e in zip(pools, exclusions, strict=True) if e.until > now and not e.no_capacity),
        key=lambda p: (not p.spot, *_price(p)),
    )

    def go(pool: Pool, why: str, *, escalated: bool = False, newly_escalated: bool = False) -> Decision:
        return Decision(
            pool,
            why + suffix,
            escalated=escalated,
            newly_escalated=newly_escalated,
            excluded=out,
            projection=projection,
        )

    def stay(why: str) -> Decision:
        pool = reclaimed[0]
        why = f"{why}; none for lack of capacity: staying in {pool.describe()}, since waiting would not help"
        return go(pool, why, escalated=escalated and not pool.spot)

    escalated = escalated and policy.escalate  # a job switched to a policy that never escalates goes back to spot
    at_risk = projection is not None and projection.at_risk
    if escalated or (at_risk and policy.escalate and has_od):
        why = (
            "escalated earlier for the deadline; staying on on-demand"
            if escalated
            else f"deadline at risk: {projection.reason if projection else ''}"
        )
        if od:
            return go(
                od[0],
                f"{why}: cheapest on-demand pool {od[0].describe()}",
                escalated=True,
                newly_escalated=not escalated,
            )
        if spot:
            return go(
                spot[0], f"{why}, but every on-demand pool is excluded: {spot[0].describe()}", escalated=escalated
            )
        if reclaimed:
            return stay(f"{why}, but every pool is excluded")
        return wait(f"{why}, but every pool is out of capacity; waiting for the first cool-down to end")
    note = ""
    if at_risk and projection is not None:
        note = f" (deadline at risk: {projection.reason}; " + (
            "not escalating: this job is opportunistic)" if not policy.escalate else "no on-demand pool to use)"
        )
    if spot:
        return go(spot[0], f"cheapest healthy spot pool: {spot[0].describe()}{note}")
    any_spot = any(p.spot for p in pools)
    if od and (policy.on_demand_when_spot_exhausted or not any_spot):
        why = (
            "every spot pool is excluded, and this job runs on-demand rather than wait"
            if any_spot
            else "only on-demand pools are configured"
        )
        return go(od[0], f"{why}: {od[0].describe()}{note}")
    candidates = [p for p in reclaimed if p.spot or not any_spot]
    if candidates:
        reclaimed[:] = candidates
        return stay("every pool is excluded" + note)
    return wait("every pool is out of capacity; waiting for the first cool-down to end" + note)
