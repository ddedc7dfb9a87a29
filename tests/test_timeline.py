"""A run's timeline (:func:`spotsafe.telemetry.timeline.build_timeline`): attempts, gaps, marks, progress, cost.

Synthetic event logs with explicit times are written through the real :class:`EventLog` and read back, so
every span, mark and series point is known exactly; one test runs a real tiny job under ``spotsafe run``
(it SIGTERMs itself once and resumes) and checks the timeline against the report, the job store and
``spotsafe ls``.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest

from spotsafe.storage.local import LocalStorage
from spotsafe.supervisor.store import read_store
from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import EVENTS_FILE, EventLog, LoggedEvent, RunIdentity, read_events
from spotsafe.telemetry.report import Report, build_report
from spotsafe.telemetry.store import read_run_events
from spotsafe.telemetry.timeline import Gap, Mark, Timeline, build_timeline

from .conftest import TINY_JOB

SPOTSAFE = Path(sys.executable).with_name("spotsafe")
RUN_ID = "r"
SUPERVISOR = RunIdentity(RUN_ID, 0, 100)


# -- a synthetic event log -----------------------------------------------------------------------------------------


def job(attempt: int) -> RunIdentity:
    return RunIdentity(RUN_ID, attempt, 100 + attempt)


class Log:
    """A run folder whose ``events.jsonl`` is written through the real :class:`EventLog`."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir

    def write(self, identity: RunIdentity, *events: ev.Event) -> Log:
        with EventLog(self.dir / EVENTS_FILE, identity) as log:
            for event in events:
                log.emit(event)
        return self

    def events(self) -> list[LoggedEvent]:
        return list(read_events(self.dir / EVENTS_FILE))

    def report(self, **kwargs: float | None) -> Report:
        return build_report(str(self.dir), self.events(), **kwargs)  # type: ignore[arg-type]

    def timeline(self, *, now: float | None = None, on_demand_price: float | None = None) -> Timeline:
        events = self.events()
        report = build_report(str(self.dir), events, on_demand_price=on_demand_price, now=now)
        return build_timeline(str(self.dir), events, report, now=now)


def started(t: float) -> ev.RunStarted:
    return ev.RunStarted(time=t, url="run", host="m")


def progress(t: float, step: int) -> ev.Progress:
    return ev.Progress(time=t, step=step, epoch=0)


def commit(t: float, step: int, reason: str = "interval") -> ev.SaveCommitted:
    return ev.SaveCommitted(
        time=t,
        step=step,
        checkpoint=f"step-{step:08d}",
        reason=reason,
        bytes=1000,
        blobs=3,
        stall_s=0.1,
        duration_s=0.5,
    )


def notice(t: float, source: str, step: int, kind: str = "stop") -> ev.NoticeReceived:
    return ev.NoticeReceived(time=t, source=source, count=1, step=step, deadline=None, kind=kind)


def restored(t: float, step: int, replayed: int) -> ev.RestoreCompleted:
    return ev.RestoreCompleted(
        time=t,
        step=step,
        epoch=0,
        checkpoint=f"step-{step:08d}",
        bytes=1000,
        duration_s=0.5,
        last_known_step=step + replayed,
        replayed_steps=replayed,
    )


def fresh(t: float) -> ev.RestoreFresh:
    return ev.RestoreFresh(time=t, skipped=0)


def exited(t: float, reason: str, step: int) -> ev.RunExited:
    return ev.RunExited(time=t, reason=reason, step=step, exit_code=0 if reason == "finished" else 75)


def attempt_started(
    t: float, number: int, pool: str = "spot-a", *, market: str = "spot", price: float = 1.8, nodes: int = 1
) -> ev.AttemptStarted:
    return ev.AttemptStarted(
        time=t, job=RUN_ID, number=number, pool=pool, market=market, price_per_hour=price, step_before=None, nodes=nodes
    )


def attempt_ended(
    t: float, number: int, cost: float, exit_class: str = "preempted", *, duration: float = 1.0, pool: str = "spot-a"
) -> ev.AttemptEnded:
    return ev.AttemptEnded(
        time=t,
        job=RUN_ID,
        number=number,
        pool=pool,
        machine="m",
        exit_code=None if exit_class in ("killed", "no_capacity") else 75,
        exit_class=exit_class,
        step_before=None,
        step_after=None,
        duration_s=duration,
        cost=cost,
    )


def retry(t: float, delay: float = 0.0) -> ev.RetryDecided:
    return ev.RetryDecided(time=t, job=RUN_ID, relaunch=True, delay_s=delay, reason="preempted")


def finished_job(t: float) -> ev.JobFinished:
    return ev.JobFinished(time=t, job=RUN_ID, state="succeeded", reason="the job succeeded")


def market(t: float, number: int, interrupted: int | None) -> ev.MarketInterruption:
    return ev.MarketInterruption(
        time=t, number=number, mode="aws", interrupted=interrupted, window_s=5.0, capacity_back_in_s=1.0, killed=False
    )


def steps(series: Sequence[tuple[float, int]]) -> list[int]:
    return [step for _, step in series]


def monotonic(points: Sequence[tuple[float, float]]) -> bool:
    return all(a[0] <= b[0] and a[1] <= b[1] for a, b in itertools.pairwise(points))


def check_shape(t: Timeline) -> None:
    """What holds for every timeline: ordered attempts inside the run, gaps between them, series in order."""
    assert t.start <= t.end
    assert [a.number for a in t.attempts] == list(range(1, len(t.attempts) + 1))
    assert len(t.progress) == len(t.attempts)
    for a, series in zip(t.attempts, t.progress, strict=True):
        assert t.start <= a.start <= a.end <= t.end
        assert all(a.start <= time <= a.end for time, _ in series)
        assert [time for time, _ in series] == sorted(time for time, _ in series)
    for earlier, later in itertools.pairwise(t.attempts):
        assert earlier.end <= later.start
    for gap in t.gaps:
        assert gap.start < gap.end
        assert any(gap.end == a.start for a in t.attempts), gap  # every wait ends where an attempt starts
        for a in t.attempts:
            assert gap.end <= a.start or gap.start >= a.end, (gap, a)  # no wait overlaps an attempt
    assert sum(1 for a in t.attempts if a.running) <= 1
    assert not any(a.running for a in t.attempts[:-1])
    for points in (t.cost, t.on_demand):
        assert monotonic(points), points
        if points:
            assert points[0] == (t.start, 0.0) and points[-1][0] == t.end


def check_against_report(t: Timeline, r: Report) -> None:
    """The timeline and the report are two views of one log: their counts agree."""
    assert len(t.attempts) == r.attempts
    assert len(t.interruptions) == r.interruptions
    assert Counter(m.kind for m in t.interruptions) == Counter(r.interruptions_by_source)
    assert len(t.checkpoints) == r.checkpoints
    assert sum(1 for m in t.checkpoints if m.kind == "notice") == r.emergency_checkpoints
    assert len(t.market) == r.drill_interruptions
    assert t.attempts[-1].running == (r.state == "running")


# -- a finished run, never interrupted ------------------------------------------------------------------------------


@pytest.fixture
def uninterrupted(tmp_path: Path) -> Log:
    """Launched at 0, running from 2 to 14 (steps 1-10 at 3-12, a final save at 13), the supervisor's end at 15."""
    log = Log(tmp_path / "run")
    log.write(SUPERVISOR, attempt_started(0.0, 1, price=3.6))
    log.write(
        job(1),
        started(2.0),
        fresh(2.5),
        *[progress(2.0 + s, s) for s in range(1, 11)],
        commit(13.0, 10, "final"),
        exited(14.0, "finished", 10),
    )
    log.write(SUPERVISOR, attempt_ended(15.0, 1, 0.015, "succeeded", duration=15.0), finished_job(15.5))
    return log


def test_a_finished_uninterrupted_run_is_one_span_after_its_launch(uninterrupted: Log) -> None:
    t = uninterrupted.timeline()
    check_shape(t)
    check_against_report(t, uninterrupted.report())
    assert (t.start, t.end, t.duration) == (0.0, 15.5, 15.5)
    [a] = t.attempts
    assert (a.number, a.start, a.end) == (1, 2.0, 14.0)
    assert (a.pool, a.market, a.outcome, a.source, a.restored_step) == ("spot-a", "spot", "finished", None, None)
    assert not a.running and not a.interrupted
    assert t.gaps == [Gap(0.0, 2.0, "launching")]
    assert t.notices == t.interruptions == t.restores == t.failures == t.market == []
    assert t.checkpoints == [Mark(13.0, "final", "checkpoint (final) at step 10", 10, 1)]
    assert steps(t.progress[0]) == [0, *range(1, 11), 10, 10]  # fresh start, progress, the final save, the exit
    assert t.progress[0][0] == (2.5, 0) and t.progress[0][-1] == (14.0, 10)


def test_now_changes_nothing_in_a_finished_run(uninterrupted: Log) -> None:
    assert uninterrupted.timeline(now=1000.0) == uninterrupted.timeline()


def test_a_run_without_events_is_an_empty_timeline() -> None:
    t = build_timeline("nothing", [], None, now=50.0)
    assert (t.start, t.end, t.attempts, t.gaps, t.progress, t.cost, t.on_demand) == (50.0, 50.0, [], [], [], [], [])
    assert build_timeline("nothing", [], None).duration == 0.0


# -- preempted with a notice, resumed --------------------------------------------------------------------------------


def write_preempted(log: Log, *between: ev.Event, second_launch: float = 22.0) -> Log:
    """Attempt 1 (spot-a, 1-16): fresh, steps 1-14 at 2-15, a commit at step 10, an AWS stop notice at 15.5
    (after a GCP warning), exits preempted at 16 without an emergency save. The supervisor ends it at 17 and
    writes ``between``; attempt 2 (spot-b) is launched at ``second_launch`` and runs from 23: it restores
    step 10 (4 replayed) at 24, steps 11-20 at 25-34, a final save at 35, finished at 36."""
    log.write(SUPERVISOR, attempt_started(0.0, 1, "spot-a", price=1.8))
    log.write(
        job(1),
        started(1.0),
        fresh(1.5),
        *[progress(1.0 + s, s) for s in range(1, 11)],
        commit(11.5, 10),
        *[progress(1.0 + s, s) for s in range(11, 15)],
        notice(15.2, "gcp", 14, kind="warning"),
        notice(15.5, "aws", 14),
        notice(15.7, "SIGTERM", 14),
        exited(16.0, "preempted", 14),
    )
    log.write(SUPERVISOR, attempt_ended(17.0, 1, 0.008, duration=17.0), *between)
    log.write(SUPERVISOR, attempt_started(second_launch, 2, "spot-b", price=2.0))
    log.write(
        job(2),
        started(23.0),
        restored(24.0, 10, 4),
        *[progress(24.0 + s - 10, s) for s in range(11, 21)],
        commit(35.0, 20, "final"),
        exited(36.0, "finished", 20),
    )
    log.write(SUPERVISOR, attempt_ended(37.0, 2, 0.0077, "succeeded", duration=15.0, pool="spot-b"), finished_job(37.0))
    return log


@pytest.fixture
def preempted(tmp_path: Path) -> Log:
    return write_preempted(Log(tmp_path / "run"), retry(17.0, delay=5.0))


def test_a_preempted_attempt_has_its_notice_its_interruption_and_the_restore(preempted: Log) -> None:
    t = preempted.timeline()
    check_shape(t)
    check_against_report(t, preempted.report())
    first, second = t.attempts
    assert (first.pool, first.market, first.outcome, first.source) == ("spot-a", "spot", "preempted", "aws")
    assert (first.start, first.end) == (1.0, 16.0) and first.interrupted
    assert (second.pool, second.outcome, second.restored_step, second.source) == ("spot-b", "finished", 10, None)
    assert (second.start, second.end) == (23.0, 36.0) and not second.interrupted
    # The first stop notice marks the moment it came (the warning and the later SIGTERM are no marks) ...
    assert t.notices == [Mark(15.5, "notice", "aws notice", 14, 1)]
    # ... the interruption is where the attempt ended, labelled with that source ...
    assert t.interruptions == [Mark(16.0, "aws", "attempt 1 interrupted (aws notice, preempted)", 14, 1)]
    # ... and the next attempt's restore is a mark of its own.
    assert t.restores == [Mark(24.0, "restore", "restored step 10 (step-00000010)", 10, 2)]
    assert [m.step for m in t.checkpoints] == [10, 20]
    assert [m.attempt for m in t.checkpoints] == [1, 2]


def test_progress_is_per_attempt_and_drops_to_the_restored_step(preempted: Log) -> None:
    t = preempted.timeline()
    first, second = t.progress
    assert steps(first) == [0, *range(1, 11), 10, *range(11, 15), 14]
    assert steps(second) == [10, *range(11, 21), 20, 20]
    assert second[0] == (24.0, 10)  # the restore: replayed work shows as a drop from 14 to 10
    assert max(steps(first)) - second[0][1] == 4 == preempted.report().replayed_steps.max


def test_the_wait_between_attempts_is_labelled_with_the_backoff(preempted: Log) -> None:
    assert preempted.timeline().gaps == [Gap(0.0, 1.0, "launching"), Gap(16.0, 23.0, "backoff 5 s")]


@pytest.mark.parametrize(
    ("between", "label"),
    [
        pytest.param([retry(17.0)], "restart", id="restart"),
        pytest.param([retry(17.0, delay=5.0)], "backoff 5 s", id="backoff"),
        pytest.param(
            [
                retry(17.0),
                attempt_started(18.0, 2, "spot-b"),
                attempt_ended(18.5, 2, 0.0, "no_capacity", pool="spot-b"),
                retry(18.5, delay=2.0),  # the backoff after the capacity failure does not rename the wait
            ],
            "no capacity in spot-b",
            id="no-capacity",
        ),
        pytest.param(
            [retry(17.0), ev.NoPoolAvailable(time=17.5, job=RUN_ID, wait_s=4.0, reason="all pools cooling down")],
            "no pool available",
            id="no-pool",
        ),
    ],
)
def test_the_wait_before_a_restart_says_what_it_waited_for(tmp_path: Path, between: list[ev.Event], label: str) -> None:
    log = write_preempted(Log(tmp_path / "run"), *between)
    t = log.timeline()
    check_shape(t)
    assert t.gaps == [Gap(0.0, 1.0, "launching"), Gap(16.0, 23.0, label)]
    # A launch that found no capacity is no attempt of the run, and does not change the first attempt's outcome.
    assert [a.outcome for a in t.attempts] == ["preempted", "finished"]
    assert t.attempts[1].pool == "spot-b"


# -- killed without warning -----------------------------------------------------------------------------------------


@pytest.fixture
def killed(tmp_path: Path) -> Log:
    """Attempt 1 runs from 1, steps 1-10 at 2-11 (a commit at 5), and is killed: no ``run_exited``; the supervisor
    records ``killed`` at 20. Attempt 2 restores step 5 at 22 and finishes at 28."""
    log = Log(tmp_path / "run")
    log.write(SUPERVISOR, attempt_started(0.0, 1))
    log.write(job(1), started(1.0), fresh(1.5), *[progress(1.0 + s, s) for s in range(1, 6)], commit(6.5, 5))
    log.write(job(1), *[progress(1.0 + s, s) for s in range(6, 11)])
    log.write(SUPERVISOR, attempt_ended(20.0, 1, 0.01, "killed", duration=20.0), retry(20.0), attempt_started(20.0, 2))
    log.write(job(2), started(21.0), restored(22.0, 5, 5), *[progress(17.0 + s, s) for s in range(6, 11)])
    log.write(job(2), exited(28.0, "finished", 10))
    log.write(SUPERVISOR, attempt_ended(29.0, 2, 0.005, "succeeded", duration=9.0))
    return log


def test_an_unannounced_kill_takes_its_outcome_from_the_supervisor(killed: Log) -> None:
    t = killed.timeline()
    check_shape(t)
    check_against_report(t, killed.report())
    first, second = t.attempts
    assert (first.outcome, first.source, first.end, first.running) == ("killed", None, 11.0, False)
    assert second.outcome == "finished"
    assert t.notices == []
    # At the attempt's last event (not when the supervisor noticed), with the last step it reached.
    assert t.interruptions == [Mark(11.0, "unannounced", "attempt 1 interrupted (killed)", 10, 1)]
    assert t.gaps == [Gap(0.0, 1.0, "launching"), Gap(11.0, 21.0, "restart")]
    assert killed.report().interruptions_by_source == {"unannounced": 1}


@pytest.mark.parametrize("exit_class", ["crashed", "out_of_memory", "no_progress"])
def test_other_exit_classes_of_the_supervisor_are_the_outcome(tmp_path: Path, exit_class: str) -> None:
    log = Log(tmp_path / "run")
    log.write(SUPERVISOR, attempt_started(0.0, 1))
    log.write(job(1), started(1.0), fresh(1.5), progress(2.0, 1))
    log.write(SUPERVISOR, attempt_ended(5.0, 1, 0.001, exit_class))
    t = log.timeline(now=100.0)
    assert [(a.outcome, a.running) for a in t.attempts] == [(exit_class, False)]
    assert t.end == 5.0  # ended: ``now`` does not extend it
    assert [(m.kind, m.label) for m in t.interruptions] == [("unannounced", f"attempt 1 interrupted ({exit_class})")]
    check_against_report(t, log.report(now=100.0))


def test_an_attempt_whose_end_nothing_recorded_is_interrupted_without_a_record(tmp_path: Path) -> None:
    """The supervisor itself died with attempt 1: no exit and no ``attempt_ended``; a new supervisor started 2."""
    log = Log(tmp_path / "run")
    log.write(job(1), started(1.0), fresh(1.5), progress(3.0, 1))
    log.write(SUPERVISOR, attempt_started(10.0, 2))
    log.write(job(2), started(11.0), fresh(11.5), progress(12.0, 1), exited(13.0, "finished", 1))
    t = log.timeline()
    check_shape(t)
    first, second = t.attempts
    assert (first.outcome, first.running, first.interrupted, first.pool) == (None, False, True, None)
    assert (second.pool, second.outcome) == ("spot-a", "finished")
    assert t.interruptions == [Mark(3.0, "unannounced", "attempt 1 interrupted (ended without a record)", 1, 1)]
    assert t.gaps == [Gap(3.0, 11.0, "restart")]  # no supervisor launch before attempt 1: no launching gap
    assert t.cost == []  # no attempt_ended: no recorded cost, and nothing runs now


def test_an_attempt_that_logged_only_its_start_is_not_covered_by_a_gap(tmp_path: Path) -> None:
    log = Log(tmp_path / "run")
    log.write(SUPERVISOR, attempt_started(0.0, 1))
    log.write(job(1), started(1.0), fresh(1.5), progress(3.0, 1), exited(4.0, "preempted", 1))
    log.write(SUPERVISOR, attempt_ended(5.0, 1, 0.001), retry(5.0), attempt_started(6.0, 2))
    log.write(job(2), started(7.0))  # died at once, before its restore
    log.write(SUPERVISOR, attempt_ended(8.0, 2, 0.001, "crashed"), retry(8.0), attempt_started(9.0, 3))
    log.write(job(3), started(10.0), fresh(10.5), progress(11.0, 1), exited(12.0, "finished", 1))
    t = log.timeline()
    assert [(a.start, a.end, a.outcome) for a in t.attempts] == [
        (1.0, 4.0, "preempted"),
        (7.0, 7.0, "crashed"),
        (10.0, 12.0, "finished"),
    ]
    assert t.gaps == [Gap(0.0, 1.0, "launching"), Gap(4.0, 7.0, "restart"), Gap(7.0, 10.0, "restart")]


def test_an_attempt_killed_as_it_started_is_a_silent_attempt_of_the_timeline(tmp_path: Path) -> None:
    """Attempt 2 was launched at 10 and killed at 12 before its process wrote anything; a launch at 13 found no
    capacity; attempt 3 ran from 15. The drill's market interrupted attempts 1 and 2."""
    log = Log(tmp_path / "run")
    log.write(SUPERVISOR, attempt_started(0.0, 1))
    log.write(job(1), started(1.0), fresh(1.5), progress(3.0, 1), commit(3.5, 1), exited(4.0, "preempted", 1))
    log.write(SUPERVISOR, market(3.8, 1, 1), attempt_ended(5.0, 1, 0.001), retry(5.0), attempt_started(10.0, 2))
    log.write(SUPERVISOR, market(11.5, 2, 2), attempt_ended(12.0, 2, 0.001, "killed", duration=2.0), retry(12.0))
    log.write(SUPERVISOR, attempt_started(13.0, 3), attempt_ended(13.0, 3, 0.0, "no_capacity"), retry(13.0, 1.0))
    log.write(SUPERVISOR, attempt_started(14.0, 4, "spot-b"))
    log.write(job(4), started(15.0), restored(15.5, 1, 0), progress(16.0, 2), exited(17.0, "finished", 2))
    log.write(SUPERVISOR, attempt_ended(18.0, 4, 0.001, "succeeded", duration=4.0, pool="spot-b"))
    t = log.timeline()
    check_shape(t)
    check_against_report(t, log.report())
    assert [(a.start, a.end, a.outcome, a.silent, a.pool) for a in t.attempts] == [
        (1.0, 4.0, "preempted", False, "spot-a"),
        (10.0, 12.0, "killed", True, "spot-a"),  # from the supervisor's launch to its end
        (15.0, 17.0, "finished", False, "spot-b"),
    ]
    assert t.progress[1] == []
    assert t.interruptions[1] == Mark(12.0, "unannounced", "attempt 2 interrupted (killed as it started, before its "
                                      "first event)", None, 2)  # fmt: skip
    assert t.gaps == [Gap(0.0, 1.0, "launching"), Gap(4.0, 10.0, "restart"), Gap(12.0, 15.0, "no capacity in spot-a")]
    assert len(t.market) == 2 == len(t.interruptions)


# -- a running run ---------------------------------------------------------------------------------------------------


@pytest.fixture
def running(tmp_path: Path) -> Log:
    """Attempt 1 (spot-a, $1.8/h) preempted and charged $0.5; attempt 2 (spot-b, 2 nodes at $3.6/h) started at 41,
    last event at 50, still running."""
    log = Log(tmp_path / "running")
    log.write(SUPERVISOR, attempt_started(0.0, 1, "spot-a", price=1.8))
    log.write(job(1), started(1.0), fresh(1.5), *[progress(1.0 + s, s) for s in range(1, 11)], commit(11.5, 10))
    log.write(job(1), notice(12.0, "azure", 10), exited(13.0, "preempted", 10))
    log.write(SUPERVISOR, attempt_ended(14.0, 1, 0.5, duration=14.0), retry(14.0, 25.0))
    log.write(SUPERVISOR, attempt_started(40.0, 2, "spot-b", price=3.6, nodes=2))
    log.write(job(2), started(41.0), restored(42.0, 10, 0), *[progress(42.0 + s - 10, s) for s in range(11, 19)])
    return log


def test_a_running_attempt_runs_to_now(running: Log) -> None:
    t = running.timeline(now=100.0)
    check_shape(t)
    check_against_report(t, running.report(now=100.0))
    first, second = t.attempts
    assert (first.outcome, first.running) == ("preempted", False)
    assert (second.outcome, second.running, second.interrupted) == (None, True, False)
    assert (second.start, second.end, t.end) == (41.0, 100.0, 100.0)
    assert [m.attempt for m in t.interruptions] == [1]  # the running attempt is no interruption
    assert t.gaps == [Gap(0.0, 1.0, "launching"), Gap(13.0, 41.0, "backoff 25 s")]
    # Without ``now`` it ends at its last event.
    later = running.timeline()
    assert (later.attempts[1].end, later.end, later.attempts[1].running) == (50.0, 50.0, True)


def test_a_running_attempt_accrues_its_pools_price_times_nodes(running: Log) -> None:
    t = running.timeline(now=100.0)
    # The ended attempt's recorded $0.5, then 2 nodes at $3.6/h from 41 to 100.
    assert t.cost[-1] == (100.0, pytest.approx(0.5 + 2 * 3.6 * (100.0 - 41.0) / 3600))
    assert (14.0, 0.5) in t.cost
    assert monotonic(t.cost)
    # Later, more has accrued.
    assert running.timeline(now=200.0).cost[-1][1] == pytest.approx(0.5 + 2 * 3.6 * (200.0 - 41.0) / 3600)


def test_a_single_running_attempt_costs_from_its_start(tmp_path: Path) -> None:
    log = Log(tmp_path / "run")
    log.write(SUPERVISOR, attempt_started(0.0, 1, price=7.2, nodes=4))
    log.write(job(1), started(10.0), fresh(10.5), progress(11.0, 1))
    t = log.timeline(now=3610.0)
    check_shape(t)
    assert t.cost[0] == (0.0, 0.0)
    assert t.cost[-1] == (3610.0, pytest.approx(7.2 * 4))  # one hour, four nodes
    assert all(c == 0.0 for time, c in t.cost if time <= 10.0)  # nothing accrues before it started


# -- cost --------------------------------------------------------------------------------------------------------


def test_ended_attempts_cost_what_the_supervisor_recorded(preempted: Log) -> None:
    t = preempted.timeline()
    r = preempted.report()
    assert r.cost == pytest.approx(0.008 + 0.0077)
    assert t.cost[-1] == (t.end, pytest.approx(r.cost))
    assert t.cost[0] == (0.0, 0.0)
    assert monotonic(t.cost)
    # Each attempt's cost accrues over its duration, up to its attempt_ended.
    assert (17.0, pytest.approx(0.008)) in t.cost
    assert (37.0, pytest.approx(0.0157)) in t.cost
    assert all(c <= 0.008 + 1e-12 for time, c in t.cost if time <= 22.0)  # nothing of attempt 2 before it began


def test_without_supervisor_events_there_is_no_cost_series(tmp_path: Path) -> None:
    log = Log(tmp_path / "run")
    log.write(
        job(1), started(1.0), fresh(1.5), *[progress(1.0 + s, s) for s in range(1, 6)], exited(7.0, "finished", 5)
    )
    t = log.timeline(now=50.0)
    assert t.cost == []
    assert log.report().cost is None
    assert [(a.pool, a.market) for a in t.attempts] == [(None, None)]
    assert t.gaps == []


def test_the_on_demand_line_ends_at_the_reports_on_demand_cost(preempted: Log) -> None:
    t = preempted.timeline(on_demand_price=3.6)
    r = preempted.report(on_demand_price=3.6)
    assert r.on_demand_cost is not None and r.on_demand_cost > 0
    assert t.on_demand[0] == (0.0, 0.0)
    assert t.on_demand[-1] == (t.end, pytest.approx(r.on_demand_cost))
    assert monotonic(t.on_demand)
    # It rises with the furthest step only: replaying steps 11-14 after the restart adds nothing.
    assert [time for time, _ in t.on_demand if 24.0 <= time <= 29.0] == [29.0]  # step 15, the first new one
    # Without a price (and no on-demand pool) there is no line.
    assert preempted.timeline().on_demand == []


def test_an_on_demand_pool_the_supervisor_used_gives_the_on_demand_line(tmp_path: Path) -> None:
    log = Log(tmp_path / "run")
    log.write(SUPERVISOR, attempt_started(0.0, 1, "od", market="on-demand", price=3.06))
    log.write(job(1), started(1.0), fresh(1.5), *[progress(1.0 + s, s) for s in range(1, 11)])
    log.write(job(1), exited(12.0, "finished", 10))
    log.write(SUPERVISOR, attempt_ended(13.0, 1, 0.01, "succeeded", duration=13.0, pool="od"))
    t = log.timeline()
    r = log.report()
    assert t.attempts[0].market == "on-demand"
    assert r.on_demand_price == 3.06 and r.on_demand_cost is not None
    assert t.on_demand[-1][1] == pytest.approx(r.on_demand_cost)


# -- drills, damaged checkpoints and failed saves ---------------------------------------------------------------------


def test_a_drills_market_interruptions_are_marks_of_their_own(tmp_path: Path) -> None:
    log = write_preempted(
        Log(tmp_path / "run"), market(16.5, 1, 1), market(16.8, 2, 1), market(19.0, 3, None), retry(17.0, delay=5.0)
    )  # the market took attempt 1's machine (a log from before the fix counted it again); then nothing ran
    t = log.timeline()
    assert t.market == [Mark(16.5, "market", "market interruption 1 (aws)", None, 1)]
    assert log.report().drill_interruptions == 1  # the attempts it interrupted, each once
    check_against_report(t, log.report())
    assert len(t.interruptions) == 1  # the market's delivery is not a second interruption of the run


@pytest.fixture
def damaged(tmp_path: Path) -> Log:
    """Attempt 1's save at step 14 fails; attempt 2 skips the damaged step-20 checkpoint and restores step 10."""
    log = Log(tmp_path / "run")
    log.write(
        job(1),
        started(1.0),
        fresh(1.5),
        *[progress(1.0 + s, s) for s in range(1, 11)],
        commit(11.5, 10),
        *[progress(1.0 + s, s) for s in range(11, 15)],
        ev.SaveFailed(time=15.5, step=14, reason="notice", error="OSError: disk full"),
        exited(16.0, "preempted", 14),
    )
    log.write(
        job(2),
        started(20.0),
        ev.CheckpointSkipped(time=20.5, checkpoint="step-00000020", step=20, reason="checksum mismatch"),
        restored(21.0, 10, 4),
        progress(22.0, 11),
    )
    return log


def test_a_failed_save_and_a_skipped_damaged_checkpoint_are_failure_marks(damaged: Log) -> None:
    t = damaged.timeline()
    check_shape(t)
    assert [(m.time, m.kind, m.step) for m in t.failures] == [(15.5, "save_failed", 14), (20.5, "skipped", 20)]
    failed, skipped = t.failures
    assert failed.label == "save at step 14 failed: OSError: disk full"
    assert skipped.label == "skipped damaged step-00000020" and skipped.attempt == 2
    assert [m.step for m in t.checkpoints] == [10]  # neither is a checkpoint
    assert t.restores == [Mark(21.0, "restore", "restored step 10 (step-00000010)", 10, 2)]


def test_a_failed_save_is_marked_on_its_attempt(damaged: Log) -> None:
    assert [m.attempt for m in damaged.timeline().failures] == [1, 2]


# -- JSON -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["preempted", "killed", "running", "damaged"])
def test_to_json_is_serialisable(request: pytest.FixtureRequest, name: str) -> None:
    log: Log = request.getfixturevalue(name)
    t = log.timeline(now=120.0, on_demand_price=2.0)
    doc = json.loads(json.dumps(t.to_json(), allow_nan=False))
    assert doc["run"] == str(log.dir)
    assert doc["duration"] == pytest.approx(t.duration)
    assert len(doc["attempts"]) == len(t.attempts) and doc["attempts"][0]["number"] == 1
    assert {"start", "end", "pool", "market", "outcome", "source", "running"} <= set(doc["attempts"][0])
    assert [[list(p) for p in series] for series in t.progress] == doc["progress"]
    assert doc["cost"] == [list(p) for p in t.cost]
    assert doc["interruptions"] == [
        {"time": m.time, "kind": m.kind, "label": m.label, "step": m.step, "attempt": m.attempt}
        for m in t.interruptions
    ]


# -- a real run: a tiny job under ``spotsafe run``, SIGTERMed once ----------------------------------------------------

JOB_FILE = """
[[pools]]
name = "p"
market = "spot"
price_per_hour = 36.0
"""


@pytest.mark.e2e
def test_the_timeline_of_a_real_supervised_run(tmp_path: Path) -> None:
    jobfile = tmp_path / "job.toml"
    jobfile.write_text(JOB_FILE)
    run_dir, db, total = tmp_path / "run", tmp_path / "jobs.sqlite", 30
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTSAFE_")}
    cmd = [str(SPOTSAFE), "run", "-f", str(jobfile), "--url", str(run_dir), "--store", str(db), "--backoff", "0",
           "--", sys.executable, str(TINY_JOB), str(total), "--stop", "1:12"]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]

    events = list(read_run_events(LocalStorage(run_dir)))
    r = build_report(str(run_dir), events, on_demand_price=72.0)
    t = build_timeline(str(run_dir), events, r)
    check_shape(t)
    check_against_report(t, r)
    assert (r.state, r.attempts, r.interruptions, r.final_step) == ("finished", 2, 1, total)

    first, second = t.attempts
    assert (first.pool, first.market, first.outcome, first.source) == ("p", "spot", "preempted", "SIGTERM")
    assert (second.pool, second.market, second.outcome) == ("p", "spot", "finished")
    [stop] = t.notices
    [interruption] = t.interruptions
    assert (interruption.kind, stop.label) == ("SIGTERM", "SIGTERM notice")
    assert r.interruptions_by_source == {"SIGTERM": 1}
    assert stop.time <= interruption.time == first.end
    # The stop saved an emergency checkpoint at the step it stopped at; the next attempt restored exactly it.
    emergency = [m for m in t.checkpoints if m.kind == "notice"]
    assert [m.step for m in emergency] == [stop.step] == [interruption.step]
    assert [(m.step, m.attempt) for m in t.restores] == [(stop.step, 2)] and second.restored_step == stop.step
    assert t.progress[1][0][1] == stop.step
    assert steps(t.progress[1])[-1] == total
    assert [g.label for g in t.gaps] == ["launching", "restart"]

    # Every commit is a checkpoint mark; those retention did not delete are what ``spotsafe ls`` lists.
    deleted = {e.event.step for e in events if isinstance(e.event, ev.CheckpointDeleted)}
    committed = {e.event.step for e in events if isinstance(e.event, ev.SaveCommitted)}
    assert [m.step for m in t.checkpoints] == sorted(committed)
    ls = subprocess.run([str(SPOTSAFE), "ls", str(run_dir), "--json"], env=env, capture_output=True, text=True,
                        timeout=120, check=True)  # fmt: skip
    listed = {c["step"] for c in json.loads(ls.stdout) if c["status"] in ("committed", "verified")}
    assert listed == {m.step for m in t.checkpoints if m.step is not None} - deleted
    assert total in listed

    # Cost: the job store's recorded costs, which the supervisor also logged.
    [(record, attempts)] = read_store(db)
    assert record.url == str(run_dir) and [a.exit_class for a in attempts] == ["preempted", "succeeded"]
    costs = [a.cost for a in attempts]
    assert all(c is not None and c > 0 for c in costs)
    assert r.cost == pytest.approx(sum(c for c in costs if c is not None))
    assert t.cost[-1] == (t.end, pytest.approx(r.cost))
    assert r.on_demand_cost is not None and t.on_demand[-1][1] == pytest.approx(r.on_demand_cost)
    json.dumps(t.to_json(), allow_nan=False)
