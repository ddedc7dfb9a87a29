"""The run model: a run's event log folded once into attempts, saves, interruptions, restores, waits and costs.

Every reader of the log reads this model and computes nothing of its own from raw events: the report
(:mod:`.report`), the timeline and its plot (:mod:`.timeline`), the Checkpointer's history (:mod:`.store`),
the metrics (:mod:`.metrics`), the live status, the drill's and the demo's summaries and the dashboard.
The fold is incremental: feed events in log order to :meth:`RunModel.apply` (a live reader, one at a
time), or fold a whole log with :meth:`RunModel.fold`. A running run's model is the same fold over a
shorter log; ``now`` says how far its running attempt has got.

Definitions:

* An **attempt** is one process's life in the run, from its ``run_started`` to its last event;
  an attempt the supervisor launched that was stopped (killed, preempted, a crash) before it wrote
  any event is one too (**silent**: from its launch to the supervisor's ``attempt_ended``; it did no
  useful work). Its **outcome** is its ``run_exited`` reason, else the supervisor's exit class
  (``succeeded`` reads ``finished``). It was **interrupted** unless it finished (or failed on its own
  with ``no_usable_checkpoint``); the attempt still running (the last one, with no outcome) is neither.
* An interruption's **source** is the first stop notice the attempt received (``aws``, ``gcp``,
  ``azure``, ``kubernetes``, ``slurm``, ``SIGTERM`` ...); with none it is ``unannounced`` (a kill, a
  crash). The interruptions a drill's emulated market delivered are counted apart (once per attempt).
* A restart **resumed** when it restored a checkpoint; it **failed to resume** when it started fresh
  although a checkpoint had been committed before, or could restore none.
* **Replayed work** is the restore's ``replayed_steps``, charged to the attempt that last worked, in
  seconds at that attempt's own step time (from its ``progress`` events).
* **Time to recover** runs from the interrupted attempt's last event to the next attempt's first
  ``progress`` event after its restore.
* **Useful time** is each attempt's time from its restore to its end, less the work the next attempt
  replayed and its checkpoint stalls; **goodput** is useful time over the run's wall time (first event to
  last). :meth:`RunModel.breakdown` splits the wall time (:mod:`.breakdown`).
* A **wait** is time outside attempts: launching the first one, and from each attempt's end to the
  next one's start (a restart, a backoff, a wait for capacity).
* **Cost** is the sum of the supervisor's ``attempt_ended`` costs; the running attempt accrues at its
  pool's price per hour times nodes.

Job events that come before any attempt started belong to none (``At.attempt`` is ``None``): the
per-process readers (metrics) count them, the run's figures do not.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from spotsafe.reasons import ExitReason, SaveReason
from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import LoggedEvent
from spotsafe.telemetry.runrecords import (
    CAPACITY_TAKEN,
    NO_CAPACITY,
    SUCCEEDED,
    UNANNOUNCED,
    At,
    Attempt,
    Breakdown,
    Gap,
    IntervalChoice,
)


@dataclass
class RunModel:
    """A run's events folded into attempts and what happened in them. Feed events with :meth:`apply` in log order.

    ``series=False`` keeps no per-step series (a long-lived process's metrics need none).
    """

    now: float | None = None
    series: bool = True
    attempts: list[Attempt] = field(default_factory=list)
    saves: list[At[ev.SaveCommitted]] = field(default_factory=list)
    save_starts: list[At[ev.SaveStarted]] = field(default_factory=list)
    failures: list[At[ev.SaveFailed | ev.CheckpointSkipped]] = field(default_factory=list)
    restores: list[At[ev.RestoreCompleted]] = field(default_factory=list)
    notices: list[ev.NoticeReceived] = field(default_factory=list)
    emergencies: list[ev.EmergencyFinished] = field(default_factory=list)
    partials_removed: int = 0
    restore_failures: int = 0
    """``restore_failed`` events: committed checkpoints existed and none could be restored."""
    writing: set[int] = field(default_factory=set)
    """Steps whose save started and has neither committed nor failed yet."""
    step: int | None = None
    """The newest step reported (``progress``, ``restore_completed``)."""
    ended: list[ev.AttemptEnded] = field(default_factory=list)
    pools: list[str] = field(default_factory=list)
    """The pools attempts were launched in, in order of their first launch."""
    relaunch_delays: list[float] = field(default_factory=list)
    escalations: int = 0
    exclusions: list[ev.Excluded] = field(default_factory=list)
    market: dict[int, ev.MarketInterruption] = field(default_factory=dict)
    """A drill's market: its first delivery to each attempt it interrupted, by attempt number."""
    market_outages: int = 0
    on_demand_prices: list[float] = field(default_factory=list)
    intervals: list[IntervalChoice] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)
    waits: list[tuple[float, float, str]] = field(default_factory=list)
    """The supervisor's waits ``(start, end, "backoff" | "capacity")`` (a delay after no capacity: capacity)."""
    first: float | None = None
    last: float | None = None
    ran: set[int] = field(default_factory=set)
    unit: str = "step"
    """What a step counts (the runs' ``run_started``): ``step``, or ``item`` for a batch job."""
    """The supervisor's attempt numbers whose process wrote (a ``run_started``)."""
    _pending: ev.AttemptStarted | None = field(default=None, repr=False)
    _launched: float | None = field(default=None, repr=False)
    _last_end: float | None = field(default=None, repr=False)
    _wait: str | None = field(default=None, repr=False)
    _committed: bool = field(default=False, repr=False)
    _policies: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def fold(cls, events: Iterable[LoggedEvent], *, now: float | None = None, series: bool = True) -> RunModel:
        """The model of a whole log (``now``: the time a running attempt has reached)."""
        events = list(events)
        model = cls(now=now, series=series)
        model.ran.update(logged.attempt for logged in events if isinstance(logged.event, ev.RunStarted))
        for logged in events:
            model.apply(logged)
        return model

    def apply(self, logged: LoggedEvent) -> None:
        """Fold one more event in."""
        e = logged.event
        self.first = e.time if self.first is None else min(self.first, e.time)
        self.last = e.time if self.last is None else max(self.last, e.time)
        if e.type in ev.SUPERVISOR_TYPES:
            self._supervisor(e)
        elif isinstance(e, ev.RunStarted):
            self.ran.add(logged.attempt)
            self.unit = e.unit
            self._begin(Attempt(len(self.attempts) + 1, logged.pid, e.time, e.time))
        else:
            self._job(e)

    # -- the fold ---------------------------------------------------------------------------------------------------
    def _supervisor(self, e: ev.Event) -> None:
        match e:
            case ev.AttemptStarted():
                if e.pool not in self.pools:
                    self.pools.append(e.pool)
                self._pending = e
                self._launched = e.time if self._launched is None else self._launched
                if e.market == "on-demand":
                    self.on_demand_prices.append(e.price_per_hour * e.nodes)
            case ev.AttemptEnded():
                self.ended.append(e)
                if e.exit_class == NO_CAPACITY:
                    self.waits.append((e.time - e.duration_s, e.time, "capacity"))
                if e.number not in self.ran:  # its process wrote nothing
                    if e.exit_class not in (NO_CAPACITY, SUCCEEDED):  # stopped as it started: an attempt of no work
                        floor = self._last_end if self._last_end is not None else -math.inf
                        start = min(max(e.time - e.duration_s, floor), e.time)
                        self._begin(
                            Attempt(len(self.attempts) + 1, 0, start, e.time, silent=True, outcome=e.exit_class)
                        )
                elif self.attempts and self.attempts[-1].outcome is None and e.exit_class != NO_CAPACITY:
                    # The attempt ended without its own run_exited (a kill, a crash): the supervisor saw it end.
                    self.attempts[-1].outcome = ExitReason.FINISHED if e.exit_class == SUCCEEDED else e.exit_class
                if e.exit_class == NO_CAPACITY:
                    self._wait = f"no capacity in {e.pool}"
            case ev.RetryDecided():
                if e.relaunch:
                    self.relaunch_delays.append(e.delay_s)
                    after_none = bool(self.ended) and self.ended[-1].exit_class == NO_CAPACITY
                    self.waits.append((e.time, e.time + e.delay_s, "capacity" if after_none else "backoff"))
                    if e.delay_s > 0 and self._wait is None:
                        self._wait = f"backoff {e.delay_s:.0f} s"
            case ev.NoPoolAvailable():
                self._wait = "no pool available"
                self.waits.append((e.time, e.time + e.wait_s, "capacity"))
            case ev.PoolChosen():
                if e.on_demand_per_hour is not None:  # the job's own on-demand pool, used or not
                    self.on_demand_prices.append(e.on_demand_per_hour)
            case ev.MarketInterruption():
                self.market_outages += 1
                if e.interrupted is not None:
                    self.market.setdefault(e.interrupted, e)  # once each
            case ev.Escalated():
                self.escalations += 1
            case ev.Excluded():
                self.exclusions.append(e)
            case _:
                pass

    def _begin(self, attempt: Attempt) -> None:
        """A new attempt: where it runs (the supervisor's launch before it) and the wait before it."""
        launch = self._pending
        if launch is not None:
            attempt.pool, attempt.market = launch.pool, launch.market
            attempt.launched_at = launch.time
            if not attempt.silent:
                attempt.rate = launch.price_per_hour * launch.nodes / 3600.0
        if self._last_end is not None and attempt.start > self._last_end:
            self.gaps.append(Gap(self._last_end, attempt.start, self._wait or "restart"))
        elif (
            self._last_end is None
            and self._launched is not None
            and attempt.start > self._launched
            and not attempt.silent
        ):
            self.gaps.append(Gap(self._launched, attempt.start, "launching"))
        self._pending, self._wait, self._last_end = None, None, attempt.end
        self.attempts.append(attempt)

    def _job(self, e: ev.Event) -> None:
        a = self.attempts[-1] if self.attempts else None
        number = a.number if a is not None else None
        match e:
            case ev.SaveStarted():
                self.save_starts.append(At(e, number))
                self.writing.add(e.step)
            case ev.SaveCommitted():
                self.saves.append(At(e, number))
                self.writing.discard(e.step)
            case ev.SaveFailed():
                self.failures.append(At(e, number))
                self.writing.discard(e.step)
            case ev.CheckpointSkipped():
                self.failures.append(At(e, number))
            case ev.RestoreCompleted():
                self.restores.append(At(e, number))
                self.step = e.step
            case ev.Progress():
                self.step = e.step
            case ev.NoticeReceived():
                self.notices.append(e)
            case ev.EmergencyFinished():
                self.emergencies.append(e)
            case ev.PartialRemoved():
                self.partials_removed += 1
            case ev.RestoreFailed():
                self.restore_failures += 1
            case _:
                pass
        if a is not None:
            a.end = max(a.end, e.time)
            self._last_end = a.end
            self._attempt(a, e)

    def _attempt(self, a: Attempt, e: ev.Event) -> None:
        match e:
            case ev.Progress():
                self._point(a, e.time, e.step)
                a.last_step = e.step
                first = a.progress_span[0] if a.progress_span is not None else (e.time, e.step)
                a.progress_span = (first, (e.time, e.step))
                if a.first_progress_at is None and a.restored_at is not None:
                    a.first_progress_at = e.time
            case ev.RestoreCompleted():
                a.restored_step, a.restored_at = e.step, e.time
                a.first_restored_at = a.first_restored_at if a.first_restored_at is not None else e.time
                a.committed_steps.add(e.step)  # stopping at the restored step loses nothing
                self._point(a, e.time, e.step)
                worked = [b for b in self.attempts[:-1] if not b.silent]  # the work replayed was the last that ran
                if worked:
                    worked[-1].replayed_steps = e.replayed_steps
            case ev.RestoreFresh():
                a.restored_at = e.time  # started from scratch: not a resume
                a.first_restored_at = a.first_restored_at if a.first_restored_at is not None else e.time
                a.committed_steps.add(0)  # nor does stopping before the first step
                self._point(a, e.time, 0)
                a.failed_resume |= self._committed
            case ev.RestoreFailed():
                a.failed_resume = True  # a failed resume (nothing restorable), not a fresh start
            case ev.SaveCommitted():
                self._committed = True
                a.last_step = max(a.last_step or 0, e.step)
                a.committed_steps.add(e.step)
                self._point(a, e.time, e.step)
            case ev.NoticeReceived() if e.kind == "stop" and a.notice is None:
                a.notice = e
            case ev.RunExited():
                a.outcome = a.exited = e.reason
                a.last_step = a.exit_step = e.step
                self._point(a, e.time, e.step)
            case ev.IntervalChosen():
                if self._policies.get(e.policy) != e.reason:  # every attempt announces its parts; keep changes
                    self._policies[e.policy] = e.reason
                    self.intervals.append(IntervalChoice(e.time, e.policy, e.interval_s, e.interval_steps, e.reason))
            case _:
                pass

    def _point(self, a: Attempt, time: float, step: int) -> None:
        a.furthest_step = max(a.furthest_step or 0, step)
        if self.series:
            a.series.append((time, step))

    # -- figures ----------------------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """The last attempt has no outcome yet."""
        return bool(self.attempts) and self.attempts[-1].outcome is None

    def end_of(self, a: Attempt) -> float:
        """When ``a`` ended: its last event, or ``now`` for the running attempt."""
        if self.now is not None and self.running and a is self.attempts[-1]:
            return max(a.end, self.now)
        return a.end

    @property
    def last_time(self) -> float | None:
        if self.now is not None and self.running:
            return max(self.last if self.last is not None else self.now, self.now)
        return self.last

    @property
    def wall_seconds(self) -> float:
        last = self.last_time
        return last - self.first if self.first is not None and last is not None else 0.0

    @property
    def state(self) -> str:
        """``finished``, ``running`` (no outcome after the last start), ``stopped``, or ``empty``."""
        if not self.attempts:
            return "empty"
        if self.running:
            return "running"
        return "finished" if self.attempts[-1].outcome == ExitReason.FINISHED else "stopped"

    @property
    def interrupted(self) -> list[Attempt]:
        """The attempts that ended without finishing."""
        ended = self.attempts[:-1] if self.running else self.attempts
        return [a for a in ended if a.stopped]

    def interruptions_by_source(self) -> dict[str, int]:
        return dict(Counter(a.source or UNANNOUNCED for a in self.interrupted))

    @property
    def capacity_interruptions(self) -> int:
        """Interruptions as the supervisor counts them while the job runs: those a drill's market delivered,
        else the attempts that ended with their capacity taken (preempted, killed), not errors."""
        if self.market_outages:
            return len(self.market)
        return sum(1 for e in self.ended if e.exit_class in CAPACITY_TAKEN)

    def restarts(self) -> list[int]:
        """Indexes of the attempts that followed an interrupted one (and wrote)."""
        return [i for i in range(1, len(self.attempts)) if self.attempts[i - 1].stopped and not self.attempts[i].silent]

    def resumed(self) -> int:
        return sum(
            1
            for i in self.restarts()
            if self.attempts[i].restored_step is not None and not self.attempts[i].failed_resume
        )

    def failed_to_resume(self) -> int:
        return sum(1 for i in self.restarts() if self.attempts[i].failed_resume)

    def replayed_steps(self) -> list[int]:
        """Steps replayed after each interruption (where the restore said)."""
        return [a.replayed_steps for a in self.interrupted if a.replayed_steps is not None]

    def replayed_seconds(self) -> list[float]:
        return [
            a.replayed_steps * a.step_time_s
            for a in self.interrupted
            if a.replayed_steps is not None and a.step_time_s is not None
        ]

    @property
    def replayed_total(self) -> int:
        """Every restore's replayed steps, added up."""
        return sum(r.event.replayed_steps or 0 for r in self.restores)

    def recover_seconds(self) -> list[float]:
        return [
            progressed - self.attempts[i - 1].end
            for i in self.restarts()
            if (progressed := self.attempts[i].first_progress_at) is not None
        ]

    def stalls(self) -> dict[int, float]:
        """Checkpoint stalls (the training thread blocked by a save), by attempt number."""
        out: dict[int, float] = {}
        for s in self.saves:
            if s.attempt is not None:
                out[s.attempt] = out.get(s.attempt, 0.0) + s.event.stall_s
        return out

    @property
    def useful_seconds(self) -> float:
        useful, stalls = 0.0, self.stalls()
        for a in self.attempts:
            if a.silent:
                continue  # stopped as it started: no useful work
            start = a.restored_at if a.restored_at is not None else a.start
            lost = (a.replayed_steps or 0) * (a.step_time_s or 0.0) + stalls.get(a.number, 0.0)
            useful += max(0.0, self.end_of(a) - start - lost)
        return useful

    def breakdown(self) -> Breakdown:
        from spotsafe.telemetry.breakdown import breakdown_of  # it reads this module's model

        return breakdown_of(self)

    @property
    def goodput(self) -> float | None:
        wall = self.wall_seconds
        return self.useful_seconds / wall if wall > 0 else None

    @property
    def final_step(self) -> int | None:
        return max((a.last_step for a in self.attempts if a.last_step is not None), default=None)

    @property
    def checkpoints(self) -> list[ev.SaveCommitted]:
        """The run's committed checkpoints (in attempts), in order."""
        return [s.event for s in self.saves if s.attempt is not None]

    @property
    def emergency_checkpoints(self) -> int:
        return sum(1 for s in self.checkpoints if s.reason == SaveReason.NOTICE)

    @property
    def skipped(self) -> int:
        """Checkpoints restore fell back past."""
        return sum(1 for f in self.failures if isinstance(f.event, ev.CheckpointSkipped))

    @property
    def cost(self) -> float | None:
        return sum(e.cost for e in self.ended) if self.ended else None

    def on_demand_price(self, given: float | None = None) -> float | None:
        """``given``, else the cheapest on-demand price the supervisor offered or used (``None``: none)."""
        if given is not None:
            return given
        return min(self.on_demand_prices) if self.on_demand_prices else None
