"""The run report: what interruptions cost a run, from its run model (:mod:`spotsafe.telemetry.runmodel`).

Every figure is read from the model, whose module defines them (attempts, silent attempts, interruptions
and their sources, resumes, replayed work, time to recover, useful time and goodput, cost); a report of a
run that is still going is the same computation on a shorter log. The same work on demand is the useful
time at the on-demand price: given, or else the cheapest hourly price (price x nodes) of the on-demand
pools in the job's pools or that its attempts ran in.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from spotsafe.telemetry.log import LoggedEvent
from spotsafe.telemetry.runmodel import RunModel
from spotsafe.telemetry.runrecords import Breakdown, IntervalChoice


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
    unit: str = "step"
    """What a step counts: ``step``, or ``item`` for a batch job (:mod:`spotsafe.batch`)."""
    breakdown: Breakdown | None = None
    """Where the wall time went."""

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
        if self.breakdown is not None:  # the split, with its derived figures
            b = self.breakdown
            doc["breakdown"] = {
                **dict(b.parts()),
                "wall": b.wall,
                "controlled": b.controlled,
                "goodput": b.goodput,
                "goodput_controlled": b.goodput_controlled,
            }
        return doc


def build_report(
    run: str,
    events: Iterable[LoggedEvent],
    *,
    on_demand_price: float | None = None,
    now: float | None = None,
) -> Report:
    """The report of one run from its events (in log order). ``now``: the time a running attempt has reached."""
    return report_of(run, RunModel.fold(events, now=now, series=False), on_demand_price=on_demand_price)


def report_of(run: str, model: RunModel, *, on_demand_price: float | None = None) -> Report:
    """The report of one run from its model."""
    saves = model.checkpoints
    return Report(
        run=run,
        state=model.state,
        first_event=model.first,
        last_event=model.last_time,
        attempts=len(model.attempts),
        supervisor_attempts=len(model.ended),
        interruptions=len(model.interrupted),
        interruptions_by_source=model.interruptions_by_source(),
        drill_interruptions=len(model.market),
        restarts=len(model.restarts()),
        resumed=model.resumed(),
        failed_to_resume=model.failed_to_resume(),
        replayed_steps=Spread.of([float(n) for n in model.replayed_steps()]),
        replayed_seconds=Spread.of(model.replayed_seconds()),
        recover_seconds=Spread.of(model.recover_seconds()),
        stall_seconds=Spread.of([s.stall_s for s in saves]),
        write_seconds=Spread.of([s.duration_s for s in saves]),
        checkpoint_bytes=Spread.of([float(s.bytes) for s in saves]),
        written_bytes=Spread.of([float(s.written_bytes if s.written_bytes is not None else s.bytes) for s in saves]),
        checkpoints=len(saves),
        emergency_checkpoints=model.emergency_checkpoints,
        wall_seconds=model.wall_seconds,
        useful_seconds=model.useful_seconds,
        final_step=model.final_step,
        cost=model.cost,
        on_demand_price=model.on_demand_price(on_demand_price),
        intervals=list(model.intervals),
        unit=model.unit,
        breakdown=model.breakdown(),
    )
