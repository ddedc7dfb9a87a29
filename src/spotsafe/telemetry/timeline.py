"""A run's timeline: attempts, interruptions, checkpoints, training progress and cost over time.

Built from the run's event log alone (the same events as :mod:`spotsafe.telemetry.report`),
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

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import LoggedEvent
from spotsafe.telemetry.report import Report


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
        return not self.running and self.outcome != "finished"


@dataclass
class Mark:
    """A moment on the timeline: ``kind`` says what happened, ``label`` says it for people."""

    time: float
    kind: str
    label: str
    step: int | None = None
    attempt: int | None = None


@dataclass
class Gap:
    """Time outside attempts: launching the first, a restart, a backoff, a wait for capacity."""

    start: float
    end: float
    label: str


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
    times = [logged.event.time for logged in events]
    start = min(times) if times else (now or 0.0)
    end = max(times) if times else start
    t = Timeline(run=run, start=start, end=end)
    pending_pool: tuple[str, str, float, int] | None = None  # pool, market, price per hour, nodes
    rates: dict[int, float] = {}  # attempt index -> dollars per second while it runs
    ended_costs: list[tuple[float, float, float]] = []  # start, end, dollars
    last_end: float | None = None
    launched: float | None = None  # the supervisor's launch of the first attempt, before its process ran
    wait_label: str | None = None
    ran = {logged.attempt for logged in events if isinstance(logged.event, ev.RunStarted)}  # attempts that wrote
    for logged in events:
        e = logged.event
        if isinstance(e, ev.AttemptStarted):
            pending_pool = (e.pool, e.market, e.price_per_hour, e.nodes)
            launched = e.time if launched is None else launched
            continue
        if isinstance(e, ev.AttemptEnded):
            ended_costs.append((e.time - e.duration_s, e.time, e.cost))
            if e.number not in ran:  # its process wrote nothing
                if e.exit_class not in ("no_capacity", "succeeded"):  # stopped as it started (see the report)
                    start = max(e.time - e.duration_s, last_end if last_end is not None else -math.inf)
                    span = Span(len(t.attempts) + 1, min(start, e.time), e.time, outcome=e.exit_class, silent=True)
                    if pending_pool is not None:
                        span.pool, span.market = pending_pool[0], pending_pool[1]
                    if last_end is not None and span.start > last_end:
                        t.gaps.append(Gap(last_end, span.start, wait_label or "restart"))
                    t.attempts.append(span)
                    t.progress.append([])
                    pending_pool, wait_label, last_end = None, None, span.end
            elif t.attempts and t.attempts[-1].outcome is None and e.exit_class != "no_capacity":
                t.attempts[-1].outcome = "finished" if e.exit_class == "succeeded" else e.exit_class
            if e.exit_class == "no_capacity":
                wait_label = f"no capacity in {e.pool}"
            continue
        if isinstance(e, ev.RetryDecided):
            if e.relaunch and e.delay_s > 0 and wait_label is None:
                wait_label = f"backoff {e.delay_s:.0f} s"
            continue
        if isinstance(e, ev.NoPoolAvailable):
            wait_label = "no pool available"
            continue
        if isinstance(e, ev.MarketInterruption):
            if e.interrupted is not None and e.interrupted not in {m.attempt for m in t.market}:  # once each
                t.market.append(
                    Mark(e.time, "market", f"market interruption {e.number} ({e.mode})", None, e.interrupted)
                )
            continue
        if e.type in ev.SUPERVISOR_TYPES:
            continue
        if isinstance(e, ev.RunStarted):
            span = Span(number=len(t.attempts) + 1, start=e.time, end=e.time)
            if pending_pool is not None:
                span.pool, span.market = pending_pool[0], pending_pool[1]
                rates[len(t.attempts)] = pending_pool[2] * pending_pool[3] / 3600.0
            if last_end is not None and e.time > last_end:
                t.gaps.append(Gap(last_end, e.time, wait_label or "restart"))
            elif last_end is None and launched is not None and e.time > launched:
                t.gaps.append(Gap(launched, e.time, "launching"))
            pending_pool = None
            wait_label = None
            t.attempts.append(span)
            t.progress.append([])
            last_end = e.time
            continue
        if not t.attempts:
            continue
        a = t.attempts[-1]
        a.end = max(a.end, e.time)
        last_end = a.end
        series = t.progress[-1]
        if isinstance(e, ev.Progress):
            series.append((e.time, e.step))
        elif isinstance(e, ev.RestoreCompleted):
            a.restored_step = e.step
            series.append((e.time, e.step))
            t.restores.append(Mark(e.time, "restore", f"restored step {e.step} ({e.checkpoint})", e.step, a.number))
        elif isinstance(e, ev.RestoreFresh):
            series.append((e.time, 0))
        elif isinstance(e, ev.SaveCommitted):
            series.append((e.time, e.step))
            what = "emergency checkpoint" if e.reason == "notice" else f"checkpoint ({e.reason})"
            t.checkpoints.append(Mark(e.time, e.reason, f"{what} at step {e.step}", e.step, a.number))
        elif isinstance(e, ev.SaveFailed):
            t.failures.append(Mark(e.time, "save_failed", f"save at step {e.step} failed: {e.error}", e.step, a.number))
        elif isinstance(e, ev.CheckpointSkipped):
            t.failures.append(Mark(e.time, "skipped", f"skipped damaged {e.checkpoint}", e.step, a.number))
        elif isinstance(e, ev.NoticeReceived) and e.kind == "stop":
            if a.source is None:
                a.source = e.source
                t.notices.append(Mark(e.time, "notice", f"{e.source} notice", e.step, a.number))
        elif isinstance(e, ev.RunExited):
            a.outcome = e.reason
            series.append((e.time, e.step))
    if t.attempts and t.attempts[-1].outcome is None:
        t.attempts[-1].running = True
        if now is not None:
            t.attempts[-1].end = max(t.attempts[-1].end, now)
            t.end = max(t.end, now)
    for a in t.attempts:
        if a.interrupted:
            series = t.progress[a.number - 1]
            step = series[-1][1] if series else None
            t.interruptions.append(Mark(a.end, a.source or "unannounced", _interruption_label(a), step, a.number))
    t.cost = _cost_series(t, ended_costs, rates)
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
