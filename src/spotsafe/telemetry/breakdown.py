"""Where a run's wall time went: useful training, replayed work, checkpoint stalls, restore, start-up, backoff,
waiting for capacity (:class:`~spotsafe.telemetry.runrecords.Breakdown`), from the run model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from spotsafe.telemetry.runrecords import Breakdown

if TYPE_CHECKING:
    from spotsafe.telemetry.runmodel import RunModel


def breakdown_of(model: RunModel) -> Breakdown:
    """Where the wall time went (:class:`~spotsafe.telemetry.runrecords.Breakdown`).

    Restore is each restore's own ``duration_s``; start-up is, per attempt, the time from its launch (the
    supervisor's ``attempt_started``; unsupervised: its ``run_started``) to its restore less the restore,
    the whole of an attempt that did no work, and what is left of the time between attempts once the
    supervisor's waits (backoff, capacity) are taken out of it (noticing the exit, launching again)."""
    restore: dict[int, float] = {}
    for r in model.restores:
        if r.attempt is not None:
            restore[r.attempt] = restore.get(r.attempt, 0.0) + r.event.duration_s
    startup = 0.0
    for a in model.attempts:
        if a.silent:
            startup += a.end - a.start
            continue
        ready = a.restored_at if a.restored_at is not None else a.start
        startup += max(0.0, ready - a.start - restore.get(a.number, 0.0))
    waited = {"backoff": 0.0, "capacity": 0.0}
    for gap in model.gaps:
        left = gap.end - gap.start
        for kind in ("capacity", "backoff"):  # waits may overlap: never more than the gap
            inside = sum(max(0.0, min(e, gap.end) - max(s, gap.start)) for s, e, k in model.waits if k == kind)
            inside = min(inside, left)
            waited[kind] += inside
            left -= inside
        startup += max(0.0, left)
    return Breakdown(
        wall=model.wall_seconds,
        useful=model.useful_seconds,
        replayed=sum(model.replayed_seconds()),
        stalls=sum(model.stalls().values()),
        restore=sum(restore.values()),
        startup=startup,
        backoff=waited["backoff"],
        capacity=waited["capacity"],
    )
