"""A run's timeline: attempts, interruptions, checkpoints, training progress and cost over time.

Read from the run model (:mod:`spotsafe.telemetry.runmodel`, the same fold as the report's),
so a running run's timeline is the same computation on a shorter log. The dashboard and
``spotsafe report --plot`` draw it; ``to_json`` gives it to anything else.

* An **attempt** is a process's life, from its ``run_started`` to its last event (to
  ``now`` while it runs). Its pool and market come from the supervisor's
  ``attempt_started`` before it; its **outcome** is its ``run_exited`` reason, or the
  supervisor's exit class when it died without one. An attempt stopped before it wrote
  any event is **silent**: from the supervisor's launch to its ``attempt_ended`` (as in
  the report).
* An **interruption** is marked where the interrupted attempt ended, labelled with its
  source (the first stop notice, else ``unannounced``); the notice itself is a separate
  mark at the moment it arrived. A drill's market deliveries are marks of their own.
* A **gap** is time outside attempts: launching the first one (from the supervisor's
  ``attempt_started`` to the process's ``run_started``), and from each attempt's end to
  the next one's start (a restart, a backoff, a wait for capacity).
* **Progress** is every step the job reported (``progress``, ``restore_completed``,
  ``save_committed``), per attempt, so replayed work shows as a drop at a restart.
* **Cost** is cumulative: the supervisor's recorded cost of each ended attempt, accrued
  evenly over its duration, and the running attempt at its pool's price per hour times
  nodes. The **on-demand** line is what the progress made so far would have cost on demand:
  the on-demand price times the uninterrupted time per step times the furthest step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from spotsafe.reasons import NOT_STOPPED, SaveReason
from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import LoggedEvent
from spotsafe.telemetry.report import Report
from spotsafe.telemetry.runmodel import RunModel
from spotsafe.telemetry.runrecords import UNANNOUNCED, Gap

__all__ = ["Gap", "Mark", "Span", "Timeline", "build_timeline", "timeline_of"]


@dataclass
class Span:
    """One attempt on the timeline."""

    number: int
    start: float
    end: float
    pool: str | None = None
    market: str | None = None
    outcome: str | None = None
    """``finished``, ``preempted``, ``crashed``..., ``None`` while it runs (or when nothing recorded its end)."""
    source: str | None = None
    restored_step: int | None = None
    running: bool = False
    silent: bool = False
    """Its process wrote no event: it was stopped as it started (the supervisor's records stand for it)."""

    @property
    def interrupted(self) -> bool:
        """It ended without finishing (nor failing on its own): as :attr:`RunModel.interrupted` counts it."""
        return not self.running and self.outcome not in NOT_STOPPED


@dataclass
class Mark:
    """A moment on the timeline: ``kind`` says what happened, ``label`` says it for people."""

    time: float
    kind: str
    label: str
    step: int | None = None
    attempt: int | None = None


@dataclass
class Timeline:
    run: str
    start: float
    end: float
    attempts: list[Span] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)
    notices: list[Mark] = field(default_factory=list)
    interruptions: list[Mark] = field(default_factory=list)
    market: list[Mark] = field(default_factory=list)
    checkpoints: list[Mark] = field(default_factory=list)
    failures: list[Mark] = field(default_factory=list)
    restores: list[Mark] = field(default_factory=list)
    progress: list[list[tuple[float, int]]] = field(default_factory=list)
    """Per attempt, ``(time, step)`` in order."""
    cost: list[tuple[float, float]] = field(default_factory=list)
    on_demand: list[tuple[float, float]] = field(default_factory=list)

    @property
    def duration(self) -> float:
        return max(0.0, self.end - self.start)

    def to_json(self) -> dict[str, object]:
        doc = asdict(self)
        doc["duration"] = self.duration
        return doc


def build_timeline(
    run: str, events: Sequence[LoggedEvent], report: Report | None = None, *, now: float | None = None
) -> Timeline:
    """The timeline of one run from its events (in log order). ``report``: the same run's report, for the
    on-demand line (its price and useful time per step). ``now``: how far a running attempt has got."""
    return timeline_of(run, RunModel.fold(events, now=now), report)


def timeline_of(run: str, model: RunModel, report: Report | None = None) -> Timeline:
    """The timeline of one run from its model (folded with its series)."""
    start = model.first if model.first is not None else (model.now or 0.0)
    last = model.last_time
    t = Timeline(run=run, start=start, end=last if last is not None else start, gaps=list(model.gaps))
    for a in model.attempts:
        running = model.running and a is model.attempts[-1]
        t.attempts.append(
            Span(a.number, a.start, model.end_of(a), a.pool, a.market, a.outcome, a.source, a.restored_step,
                 running=running, silent=a.silent)
        )  # fmt: skip
        t.progress.append(list(a.series))
        if a.notice is not None:
            t.notices.append(Mark(a.notice.time, "notice", f"{a.notice.source} notice", a.notice.step, a.number))
    for e in model.market.values():
        t.market.append(Mark(e.time, "market", f"market interruption {e.number} ({e.mode})", None, e.interrupted))
    for save in model.saves:
        if save.attempt is not None:
            s = save.event
            what = "emergency checkpoint" if s.reason == SaveReason.NOTICE else f"checkpoint ({s.reason})"
            t.checkpoints.append(Mark(s.time, s.reason, f"{what} at step {s.step}", s.step, save.attempt))
    for failure in model.failures:
        f = failure.event
        if failure.attempt is None:
            continue
        if isinstance(f, ev.SaveFailed):
            label = f"save at step {f.step} failed: {f.error}"
            t.failures.append(Mark(f.time, "save_failed", label, f.step, failure.attempt))
        else:
            t.failures.append(Mark(f.time, "skipped", f"skipped damaged {f.checkpoint}", f.step, failure.attempt))
    for restore in model.restores:
        if restore.attempt is not None:
            r = restore.event
            label = f"restored step {r.step} ({r.checkpoint})"
            t.restores.append(Mark(r.time, "restore", label, r.step, restore.attempt))
    for a in model.interrupted:
        span = t.attempts[a.number - 1]
        step = a.series[-1][1] if a.series else None
        t.interruptions.append(Mark(span.end, a.source or UNANNOUNCED, _interruption_label(span), step, a.number))
    ended = [(e.time - e.duration_s, e.time, e.cost) for e in model.ended]
    rates = {len(model.attempts) - 1: model.attempts[-1].rate or 0.0} if model.running else {}
    t.cost = _cost_series(t, ended, rates)
    t.on_demand = _on_demand_series(t, report)
    return t


def _interruption_label(a: Span) -> str:
    if a.silent:
        return f"attempt {a.number} interrupted ({a.outcome} as it started, before its first event)"
    if a.source is not None:
        return f"attempt {a.number} interrupted ({a.source} notice, {a.outcome})"
    return f"attempt {a.number} interrupted ({a.outcome or 'ended without a record'})"


def _cost_series(
    t: Timeline, ended: list[tuple[float, float, float]], rates: dict[int, float]
) -> list[tuple[float, float]]:
    """Cumulative dollars over time: ended attempts (supervisor records) accrue evenly, the running one
    at its pool's rate."""
    if not ended and not (t.attempts and t.attempts[-1].running and rates.get(len(t.attempts) - 1)):
        return []
    points: list[tuple[float, float]] = [(t.start, 0.0)]
    total = 0.0
    for start, end, dollars in ended:
        if dollars <= 0:
            continue
        points.append((max(start, points[-1][0]), total))
        total += dollars
        points.append((end, total))
    last = t.attempts[-1] if t.attempts else None
    if last is not None and last.running and (rate := rates.get(len(t.attempts) - 1)):
        points.append((max(last.start, points[-1][0]), total))
        total += rate * max(0.0, last.end - last.start)
        points.append((last.end, total))
    if points[-1][0] < t.end:
        points.append((t.end, total))
    return points


def _on_demand_series(t: Timeline, report: Report | None) -> list[tuple[float, float]]:
    """What the progress made so far would have cost on demand."""
    if report is None or report.on_demand_price is None or not report.final_step:
        return []
    per_step = report.useful_seconds / report.final_step  # seconds of uninterrupted work per step
    dollars_per_step = report.on_demand_price * per_step / 3600.0
    merged = sorted(point for series in t.progress for point in series)
    points: list[tuple[float, float]] = [(t.start, 0.0)]
    furthest = 0
    for time, step in merged:
        if step > furthest:
            furthest = step
            points.append((time, furthest * dollars_per_step))
    if points[-1][0] < t.end:
        points.append((t.end, points[-1][1]))
    return points
