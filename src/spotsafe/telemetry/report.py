"""The run report: what interruptions cost a run, computed from its event log and (optionally) the job store.

Definitions (every figure is derived from events alone, so a report of a run
that is still going is the same computation on a shorter log):

* An **attempt** is one process's life in the run, from its ``run_started``;
  an attempt the supervisor launched that was stopped (killed, preempted, a
  crash) before it wrote any event is one too (**silent**: the supervisor's
  ``attempt_started`` and ``attempt_ended`` stand for it; it did no useful work).
  It was **interrupted** unless it exited ``finished``; the attempt still
  running (the last one, with no exit, while the run goes on) is neither.
* An interruption's **source** is the first stop notice the attempt received
  (``aws``, ``gcp``, ``azure``, ``kubernetes``, ``slurm``, ``SIGTERM`` ...);
  with none it is ``unannounced`` (a kill, a crash). How many of them a
  drill's emulated market delivered is counted apart (``drill_interruptions``).
* A restart **resumed** when it restored a checkpoint (possibly an older one,
  after skipping a damaged one); it **failed to resume** when it started fresh
  although a checkpoint had been committed before.
* **Replayed work** is the restore's ``replayed_steps``, in seconds at the
  interrupted attempt's own step time.
* **Time to recover** runs from the interrupted attempt's last event to the
  next attempt's first ``progress`` event after its restore.
* **Goodput** is useful time over the run's wall time (first event to last):
  useful time is each attempt's time from its restore to its end, less the work
  the next attempt replayed.
* **Cost** is the sum of the supervisor's ``attempt_ended`` costs; the same work
  on demand is the useful time at the on-demand price: given, or else the
  cheapest hourly price (price x nodes) of the on-demand pools in the job's
  pools or that its attempts ran in.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import LoggedEvent


@dataclass(frozen=True)
class Spread:
    """Summary of a set of values."""

    count: int
    mean: float | None
    median: float | None
    p95: float | None
    max: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            return cls(0, None, None, None, None)
        ordered = sorted(values)
        p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
        return cls(len(values), statistics.fmean(values), statistics.median(values), p95, ordered[-1])


@dataclass
class AttemptSummary:
    run_attempt: int
    pid: int
    started: float
    ended: float
    exit_reason: str | None
    restored_step: int | None
    restored_at: float | None
    first_progress_at: float | None
    last_step: int | None
    step_time_s: float | None
    source: str | None
    replayed_steps: int | None = None
    """Steps the next attempt redid after this one was interrupted."""
    silent: bool = False
    """The process wrote no event: it was stopped before its first (see the module's definitions)."""

    @property
    def interrupted(self) -> bool:
        return self.exit_reason not in ("finished", "no_usable_checkpoint")  # the latter failed on its own


@dataclass
class IntervalChoice:
    time: float
    policy: str
    interval_s: float | None
    interval_steps: int | None
    reason: str


@dataclass
class Report:
    run: str
    state: str
    """``finished``, ``running`` (no exit after the last start) or ``stopped``."""
    first_event: float | None
    last_event: float | None
    attempts: int
    supervisor_attempts: int
    interruptions: int
    interruptions_by_source: dict[str, int]
    drill_interruptions: int
    restarts: int
    resumed: int
    failed_to_resume: int
    replayed_steps: Spread
    replayed_seconds: Spread
    recover_seconds: Spread
    stall_seconds: Spread
    write_seconds: Spread
    checkpoint_bytes: Spread
    written_bytes: Spread
    checkpoints: int
    emergency_checkpoints: int
    wall_seconds: float
    useful_seconds: float
    final_step: int | None
    cost: float | None
    on_demand_price: float | None
    intervals: list[IntervalChoice] = field(default_factory=list)

    @property
    def resume_rate(self) -> float | None:
        return self.resumed / self.restarts if self.restarts else None

    @property
    def goodput(self) -> float | None:
        return self.useful_seconds / self.wall_seconds if self.wall_seconds > 0 else None

    @property
    def on_demand_cost(self) -> float | None:
        if self.on_demand_price is None:
            return None
        return self.on_demand_price * self.useful_seconds / 3600.0

    @property
    def saved(self) -> float | None:
        if self.cost is None or self.on_demand_cost is None:
            return None
        return self.on_demand_cost - self.cost

    def to_json(self) -> dict[str, object]:
        doc = asdict(self)
        doc.update(
            resume_rate=self.resume_rate, goodput=self.goodput, on_demand_cost=self.on_demand_cost, saved=self.saved
        )
        return doc


def build_report(
    run: str,
    events: Iterable[LoggedEvent],
    *,
    on_demand_price: float | None = None,
    now: float | None = None,
) -> Report:
    """The report of one run from its events (in log order). ``now``: the time a running attempt has reached."""
    attempts: list[AttemptSummary] = []
    progress: dict[int, list[tuple[float, int]]] = {}
    saves: list[ev.SaveCommitted] = []
    costs: list[float] = []
    od_prices: list[float] = []
    drill: set[int] = set()  # the attempts a drill's market interrupted
    supervised = 0
    intervals: list[IntervalChoice] = []
    last_reason: dict[str, str] = {}
    first = last = None
    ever_committed = False
    fresh_after_commit: set[int] = set()
    events = list(events)
    ran = {logged.attempt for logged in events if isinstance(logged.event, ev.RunStarted)}  # attempts that wrote
    for logged in events:
        e = logged.event
        first = e.time if first is None else min(first, e.time)
        last = e.time if last is None else max(last, e.time)
        if isinstance(e, ev.AttemptEnded):
            costs.append(e.cost)
            supervised += 1
            if e.number not in ran:  # its process wrote nothing
                if e.exit_class not in ("no_capacity", "succeeded"):  # stopped as it started: an attempt of no work
                    silent = AttemptSummary(len(attempts) + 1, 0, e.time, e.time, e.exit_class, None, None, None,
                                            None, None, None, silent=True)  # fmt: skip
                    attempts.append(silent)
            elif attempts and attempts[-1].exit_reason is None and e.exit_class != "no_capacity":
                # The attempt ended without its own run_exited (a kill, a crash): the supervisor saw it end.
                attempts[-1].exit_reason = "finished" if e.exit_class == "succeeded" else e.exit_class
            continue
        if isinstance(e, ev.PoolChosen):
            if e.on_demand_per_hour is not None:  # the job's own on-demand pool, used or not
                od_prices.append(e.on_demand_per_hour)
            continue
        if isinstance(e, ev.AttemptStarted):
            if e.market == "on-demand":
                od_prices.append(e.price_per_hour * e.nodes)
            continue
        if isinstance(e, ev.MarketInterruption):
            if e.interrupted is not None:
                drill.add(e.interrupted)  # once each (a log from before the market knew not to count it twice)
            continue
        if e.type in ev.SUPERVISOR_TYPES:
            continue
        if isinstance(e, ev.RunStarted):
            attempts.append(
                AttemptSummary(len(attempts) + 1, logged.pid, e.time, e.time, None, None, None, None, None, None, None)
            )
            continue
        if not attempts:
            continue
        a = attempts[-1]
        a.ended = max(a.ended, e.time)
        if isinstance(e, ev.Progress):
            progress.setdefault(len(attempts) - 1, []).append((e.time, e.step))
            a.last_step = e.step
            if a.first_progress_at is None and a.restored_at is not None:
                a.first_progress_at = e.time
        elif isinstance(e, ev.RestoreCompleted):
            a.restored_step, a.restored_at = e.step, e.time
            worked = [b for b in attempts[:-1] if not b.silent]  # the work replayed was the last that ran
            if worked:
                worked[-1].replayed_steps = e.replayed_steps
        elif isinstance(e, ev.RestoreFresh):
            a.restored_at = e.time  # started from scratch: not a resume
            if ever_committed:
                fresh_after_commit.add(len(attempts) - 1)
        elif isinstance(e, ev.RestoreFailed):
            fresh_after_commit.add(len(attempts) - 1)  # a failed resume (nothing restorable), not a fresh start
        elif isinstance(e, ev.SaveCommitted):
            saves.append(e)
            ever_committed = True
            a.last_step = max(a.last_step or 0, e.step)
        elif isinstance(e, ev.NoticeReceived) and e.kind == "stop" and a.source is None:
            a.source = e.source
        elif isinstance(e, ev.RunExited):
            a.exit_reason = e.reason
            a.last_step = e.step
        elif isinstance(e, ev.IntervalChosen):
            choice = IntervalChoice(e.time, e.policy, e.interval_s, e.interval_steps, e.reason)
            if last_reason.get(choice.policy) != choice.reason:  # every attempt announces its parts; keep changes
                last_reason[choice.policy] = choice.reason
                intervals.append(choice)
    for i, a in enumerate(attempts):
        points = progress.get(i, [])
        if len(points) >= 2 and points[-1][1] > points[0][1]:
            a.step_time_s = (points[-1][0] - points[0][0]) / (points[-1][1] - points[0][1])

    running = bool(attempts) and attempts[-1].exit_reason is None
    if running and now is not None:
        attempts[-1].ended = max(attempts[-1].ended, now)
        last = max(last or now, now)
    ended = attempts[:-1] if running else attempts
    interrupted = [a for a in ended if a.interrupted]
    by_source: Counter[str] = Counter(a.source or "unannounced" for a in interrupted)
    restarts = [i for i in range(1, len(attempts)) if attempts[i - 1].interrupted and not attempts[i].silent]
    resumed = sum(1 for i in restarts if attempts[i].restored_step is not None and i not in fresh_after_commit)
    failed = sum(1 for i in restarts if i in fresh_after_commit)
    replayed_steps = [float(a.replayed_steps) for a in interrupted if a.replayed_steps is not None]
    replayed_s = [
        float(a.replayed_steps) * a.step_time_s
        for a in interrupted
        if a.replayed_steps is not None and a.step_time_s is not None
    ]
    recover = [
        progressed - attempts[i - 1].ended
        for i in restarts
        if (progressed := attempts[i].first_progress_at) is not None
    ]
    useful = 0.0
    for a in attempts:
        start = a.restored_at if a.restored_at is not None else a.started
        lost = (a.replayed_steps or 0) * (a.step_time_s or 0.0)
        useful += max(0.0, a.ended - start - lost)
    final_step = max((a.last_step for a in attempts if a.last_step is not None), default=None)
    state = "running" if running else ("finished" if attempts and attempts[-1].exit_reason == "finished" else "stopped")
    return Report(
        run=run,
        state=state if attempts else "empty",
        first_event=first,
        last_event=last,
        attempts=len(attempts),
        supervisor_attempts=supervised,
        interruptions=len(interrupted),
        interruptions_by_source=dict(by_source),
        drill_interruptions=len(drill),
        restarts=len(restarts),
        resumed=resumed,
        failed_to_resume=failed,
        replayed_steps=Spread.of(replayed_steps),
        replayed_seconds=Spread.of(replayed_s),
        recover_seconds=Spread.of(recover),
        stall_seconds=Spread.of([s.stall_s for s in saves]),
        write_seconds=Spread.of([s.duration_s for s in saves]),
        checkpoint_bytes=Spread.of([float(s.bytes) for s in saves]),
        written_bytes=Spread.of([float(s.written_bytes if s.written_bytes is not None else s.bytes) for s in saves]),
        checkpoints=len(saves),
        emergency_checkpoints=sum(1 for s in saves if s.reason == "notice"),
        wall_seconds=(last - first) if first is not None and last is not None else 0.0,
        useful_seconds=useful,
        final_step=final_step,
        cost=sum(costs) if costs else None,
        on_demand_price=on_demand_price if on_demand_price is not None else (min(od_prices) if od_prices else None),
        intervals=intervals,
    )
