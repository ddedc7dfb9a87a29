"""Intervals chosen from cost, recomputed as the run measures itself; and the notice settings.

Variables (``../shared/PREEMPTION-SIGNALS.md``): ``d`` the time one checkpoint takes,
``M`` the mean time between interruptions that lose work, ``R`` the restart time
(provision + restore), ``t`` the compute time between checkpoints.

* :func:`young_daly` - ``t = sqrt(2 d M)`` refined by Daly (2006). ``d`` is the measured
  time a save takes until it is durable (``cost="commit"``; an asynchronous save stalls
  training only for its copy, but its writing still competes for I/O and CPU, so the
  stall alone, ``cost="stall"``, makes saves very frequent); ``M`` is the run's observed
  time divided by the interruptions that lost work, with a prior (``prior_mtbi_hours``,
  worth one interruption) so that the first hours of a run are not a guess from nothing.
* :func:`max_loss` - keep the expected loss per interruption, ``t/2 + d + R`` with ``d`` the
  time until a save is durable, under a budget given in minutes of lost work or in dollars
  (``price_per_hour`` x ``nodes``): ``t = 2 (L - d - R)``.
* :func:`on_notice` - how the emergency save reacts to a notice (safety factor, margin
  before the deadline, what a soft warning does). A notice always triggers it; adding
  ``on_notice(...)`` to the policy changes its settings.

Each policy's :meth:`choose` gives the interval and the numbers behind it; the interval
never drops below the time a save needs to commit (at most one save is in flight).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from spotsafe.checks import check_choice, check_int, check_number
from spotsafe.errors import ConfigError
from spotsafe.policy.interval import Choice, Never, SaveContext, SavePolicy

HOUR = 3600.0
DEFAULT_RESTART_S = 120.0
FIRST_SAVE_S = 60.0


def _positive(name: str, value: object, *, allow_none: bool = False) -> None:
    check_number(name, value, above=0, allow_none=allow_none)


def daly_interval(d: float, m: float) -> float:
    """Daly's optimum compute time between checkpoints for checkpoint cost ``d`` and MTBI ``m``."""
    if d >= 2 * m:
        return m
    x = d / (2 * m)
    return math.sqrt(2 * d * m) * (1 + math.sqrt(x) / 3 + x / 9) - d


def _fmt(seconds: float) -> str:
    if seconds >= 2 * HOUR:
        return f"{seconds / HOUR:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def _floor(ctx: SaveContext, t: float) -> tuple[float, str]:
    """No shorter than a save needs to commit (one in flight at a time), and never below 1 s."""
    floor = max(1.0, ctx.commit_s or 0.0)
    if t < floor:
        return floor, f"; raised to {_fmt(floor)}, the time a save takes to commit"
    return t, ""


@dataclass(frozen=True, kw_only=True)
class YoungDaly(SavePolicy):
    """Save every ``t`` seconds with ``t`` from Young/Daly, re-estimated as the run goes."""

    prior_mtbi_hours: float = 4.0
    count: str = "unnoticed"
    cost: str = "commit"
    first_save_s: float = FIRST_SAVE_S

    def __post_init__(self) -> None:
        _positive("prior_mtbi_hours", self.prior_mtbi_hours)
        _positive("first_save_s", self.first_save_s)
        check_choice("count", self.count, ("unnoticed", "all"))
        check_choice("cost", self.cost, ("commit", "stall"))

    def mtbi(self, ctx: SaveContext) -> tuple[float, int]:
        """(M in seconds, interruptions counted)."""
        n = ctx.unnoticed if self.count == "unnoticed" else ctx.interruptions
        return (self.prior_mtbi_hours * HOUR + ctx.run_s) / (1 + n), n

    def choose(self, ctx: SaveContext) -> Choice:
        m, n = self.mtbi(ctx)
        kind = "interruptions that lost work" if self.count == "unnoticed" else "interruptions"
        observed = f"M={_fmt(m)} ({n} {kind} in {_fmt(ctx.run_s)} + a {self.prior_mtbi_hours:g} h prior)"
        measured = ctx.commit_s if self.cost == "commit" else ctx.stall_s
        if measured is None:
            return Choice(
                self.first_save_s,
                None,
                f"Young/Daly: no save measured yet, first save after {_fmt(self.first_save_s)}; {observed}",
            )
        d = max(measured, 1e-3)
        what = "time to commit a save" if self.cost == "commit" else "stall per save"
        t, raised = _floor(ctx, daly_interval(d, m))
        return Choice(t, None, f"Young/Daly: d={d:.3f} s ({what}), {observed} -> t={_fmt(t)}{raised}")

    def should_save(self, ctx: SaveContext) -> bool:
        choice = self.choose(ctx)
        return ctx.steps_since_save > 0 and choice.seconds is not None and ctx.seconds_since_save >= choice.seconds

    def describe(self) -> str:
        changed = [f"{k}={v!r}" for k, v in self.__dict__.items() if v != type(self).__dataclass_fields__[k].default]
        return f"young_daly({', '.join(changed)})"


@dataclass(frozen=True, kw_only=True)
class MaxLoss(SavePolicy):
    """Save often enough that the expected loss per interruption stays under ``budget_s`` seconds."""

    budget_s: float
    label: str
    default_restart_s: float = DEFAULT_RESTART_S

    def __post_init__(self) -> None:
        _positive("the loss budget", self.budget_s)
        _positive("default_restart_s", self.default_restart_s)

    def choose(self, ctx: SaveContext) -> Choice:
        d = ctx.commit_s if ctx.commit_s is not None else 0.0
        r = ctx.restart_s if ctx.restart_s is not None else self.default_restart_s
        r_note = f"R={_fmt(r)}" + ("" if ctx.restart_s is not None else " (assumed until a restart is measured)")
        d_note = f"d={_fmt(d)}" if ctx.commit_s is not None else "d not measured yet"
        t = 2 * (self.budget_s - d - r)
        if t <= 0:
            t, _ = _floor(ctx, 0.0)
            return Choice(
                t,
                None,
                f"{self.label}: cannot be met ({d_note}, {r_note} already exceed it); "
                f"saving as often as saves commit, every {_fmt(t)}",
            )
        t, raised = _floor(ctx, t)
        return Choice(
            t,
            None,
            f"{self.label}: t = 2 (L - d - R) with L={_fmt(self.budget_s)}, {d_note}, {r_note} -> t={_fmt(t)}{raised}",
        )

    def should_save(self, ctx: SaveContext) -> bool:
        choice = self.choose(ctx)
        return ctx.steps_since_save > 0 and choice.seconds is not None and ctx.seconds_since_save >= choice.seconds

    def describe(self) -> str:
        return self.label


@dataclass(frozen=True, kw_only=True)
class OnNotice(Never):
    """Settings of the emergency save (see :func:`on_notice`); like :class:`Never`, it never asks for a regular
    save."""

    safety: float = 1.5
    margin_s: float = 2.0
    warnings: str = "save"

    def __post_init__(self) -> None:
        check_number("safety", self.safety, at_least=1, hint=" (time estimates are multiplied by it)")
        check_number("margin_s", self.margin_s, at_least=0, unit="seconds")
        check_choice("warnings", self.warnings, ("save", "ignore"))

    def describe(self) -> str:
        return "on notice"


def young_daly(
    *, prior_mtbi_hours: float = 4.0, count: str = "unnoticed", cost: str = "commit", first_save_s: float = FIRST_SAVE_S
) -> YoungDaly:
    """The Young/Daly interval from the measured save cost and the observed interruption rate.

    ``count="unnoticed"`` (default) counts only interruptions that lost work: when notices
    arrive in time the emergency checkpoint removes the loss, so rare regular saves suffice.
    ``cost="commit"`` (default) takes a save's time until durable as ``d``; ``"stall"`` only
    the time training waited. Until a save is measured, the first one comes after ``first_save_s``.
    """
    return YoungDaly(prior_mtbi_hours=prior_mtbi_hours, count=count, cost=cost, first_save_s=first_save_s)


def max_loss(
    *,
    minutes: float | None = None,
    dollars: float | None = None,
    price_per_hour: float | None = None,
    nodes: int = 1,
    default_restart_s: float = DEFAULT_RESTART_S,
) -> MaxLoss:
    """Keep the expected loss per interruption under ``minutes`` of work or ``dollars`` of compute.

    ``dollars`` needs ``price_per_hour`` (per node) and ``nodes``: the budget in time is
    ``dollars / (price_per_hour * nodes)`` hours. ``R`` is measured from the run's restarts;
    until one is seen, ``default_restart_s`` is assumed.
    """
    if (minutes is None) == (dollars is None):
        raise ConfigError("max_loss() needs exactly one of minutes= or dollars=")
    _positive("max_loss(minutes=...)", minutes, allow_none=True)
    _positive("max_loss(dollars=...)", dollars, allow_none=True)
    _positive("price_per_hour", price_per_hour, allow_none=True)
    check_int("nodes", nodes, at_least=1)
    if minutes is not None:
        return MaxLoss(
            budget_s=60.0 * minutes, label=f"max_loss(minutes={minutes:g})", default_restart_s=default_restart_s
        )
    if price_per_hour is None:
        raise ConfigError("max_loss(dollars=...) needs price_per_hour= (the price of one node per hour)")
    assert dollars is not None
    budget_s = dollars / (price_per_hour * nodes) * HOUR
    label = f"max_loss(dollars={dollars:g}, price_per_hour={price_per_hour:g}, nodes={nodes})"
    return MaxLoss(budget_s=budget_s, label=label, default_restart_s=default_restart_s)


def on_notice(*, safety: float = 1.5, margin_s: float = 2.0, warnings: str = "save") -> OnNotice:
    """How to react to notices: the emergency save must fit ``deadline - margin_s`` with its
    estimated time multiplied by ``safety``; a soft warning (AWS rebalance, Azure reboot) takes
    an early checkpoint (``warnings="save"``) or is only logged (``"ignore"``)."""
    return OnNotice(safety=safety, margin_s=margin_s, warnings=warnings)
