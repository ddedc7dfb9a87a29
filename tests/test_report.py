"""``spotsafe report``: the run report from a run's event log (and the job store).

Most tests write a synthetic event log with explicit times through :class:`EventLog`, so every figure
of the report is known exactly; one runs a real job under the supervisor, preempted twice.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from spotsafe.errors import ConfigError
from spotsafe.storage.local import LocalStorage
from spotsafe.supervisor.pools import Pool
from spotsafe.supervisor.retry import RelaunchPolicy
from spotsafe.supervisor.run import RunConfig, Supervisor, on_demand_per_hour
from spotsafe.supervisor.store import JobStore
from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import EVENTS_FILE, EventLog, RunIdentity
from spotsafe.telemetry.report import Report, Spread, build_report
from spotsafe.telemetry.rows import report_rows
from spotsafe.telemetry.runrecords import Breakdown
from spotsafe.telemetry.store import read_run_events

from .conftest import TINY_JOB

SPOTSAFE = str(Path(sys.executable).with_name("spotsafe"))
RUN_ID = "r"
SUPERVISOR = RunIdentity(RUN_ID, 0, 100)


# -- writing a synthetic event log -------------------------------------------------------------------------------


def write(run_dir: Path, identity: RunIdentity, *events: ev.Event) -> None:
    """Append ``events`` to the run's log as the process ``identity`` would."""
    with EventLog(run_dir / EVENTS_FILE, identity) as log:
        for event in events:
            log.emit(event)


def job(attempt: int) -> RunIdentity:
    return RunIdentity(RUN_ID, attempt, 100 + attempt)


def started(t: float, run_dir: Path) -> ev.RunStarted:
    return ev.RunStarted(time=t, url=str(run_dir), host="m")


def progress(t: float, step: int) -> ev.Progress:
    return ev.Progress(time=t, step=step, epoch=0)


def commit(
    t: float,
    step: int,
    *,
    reason: str = "interval",
    size: int = 1000,
    stall: float = 0.5,
    duration: float = 1.0,
    written: int | None = None,
) -> ev.SaveCommitted:
    return ev.SaveCommitted(
        time=t,
        step=step,
        checkpoint=f"step-{step:08d}",
        reason=reason,
        bytes=size,
        blobs=3,
        stall_s=stall,
        duration_s=duration,
        written_bytes=written,
    )


def notice(t: float, source: str, step: int, *, kind: str = "stop") -> ev.NoticeReceived:
    return ev.NoticeReceived(time=t, source=source, count=1, step=step, deadline=None, kind=kind)


def restored(t: float, step: int, replayed: int | None) -> ev.RestoreCompleted:
    last_known = None if replayed is None else step + replayed
    return ev.RestoreCompleted(
        time=t,
        step=step,
        epoch=0,
        checkpoint=f"step-{step:08d}",
        bytes=1000,
        duration_s=0.5,
        last_known_step=last_known,
        replayed_steps=replayed,
    )


def fresh(t: float, skipped: int = 0) -> ev.RestoreFresh:
    return ev.RestoreFresh(time=t, skipped=skipped)


def exited(t: float, reason: str, step: int) -> ev.RunExited:
    return ev.RunExited(time=t, reason=reason, step=step, exit_code=0 if reason == "finished" else 75)


def interval(t: float, policy: str, reason: str, steps: int | None = None, seconds: float | None = None) -> ev.Event:
    return ev.IntervalChosen(time=t, policy=policy, interval_s=seconds, interval_steps=steps, reason=reason)


def pool_chosen(t: float, market: str = "spot", price: float = 1.8) -> ev.PoolChosen:
    return ev.PoolChosen(time=t, job=RUN_ID, pool=market, market=market, price_per_hour=price, reason="cheapest")


def attempt_started(t: float, number: int, market: str = "spot", price: float = 1.8) -> ev.AttemptStarted:
    return ev.AttemptStarted(
        time=t, job=RUN_ID, number=number, pool=market, market=market, price_per_hour=price, step_before=None
    )


def attempt_ended(t: float, number: int, cost: float, exit_class: str = "preempted") -> ev.AttemptEnded:
    return ev.AttemptEnded(
        time=t,
        job=RUN_ID,
        number=number,
        pool="spot",
        machine="m",
        exit_code=75,
        exit_class=exit_class,
        step_before=None,
        step_after=None,
        duration_s=1.0,
        cost=cost,
    )


def retry(t: float) -> ev.RetryDecided:
    return ev.RetryDecided(time=t, job=RUN_ID, relaunch=True, delay_s=0.0, reason="preempted")


def market(t: float, interrupted: int | None) -> ev.MarketInterruption:
    return ev.MarketInterruption(
        time=t, number=1, mode="aws", interrupted=interrupted, window_s=5.0, capacity_back_in_s=1.0, killed=False
    )


def report_of(run_dir: Path, **kwargs: Any) -> Report:
    return build_report(str(run_dir), read_run_events(LocalStorage(run_dir)), **kwargs)


YOUNG_DALY = "Young/Daly: d=1.000 s (stall per save), 1 interruption in 60 s -> t=60 s"


def write_three_attempts(run_dir: Path) -> None:
    """A run of three attempts (the first stopped on an AWS notice, the second killed unannounced, the
    third finished), with the supervisor's and a drill market's events in between.

    Attempt 1 (t 1-30): fresh at 2, one step per second from step 1 at 3 to step 25 at 27, commits at
    steps 10 and 20, a GCP warning, then AWS and SIGTERM stop notices, an emergency save at 25, exit.
    Attempt 2 (t 41-63): restores step 25 (0 replayed) at 43, two seconds per step from step 26 at 45 to
    step 35 at 63, a commit at 30, then killed (no exit). Attempt 3 (t 73-86): restores step 30 at 74
    (5 replayed), one second per step from step 31 at 75 to step 40 at 84, a final save, finished.
    """
    write(run_dir, SUPERVISOR, pool_chosen(0.0), attempt_started(0.0, 1))
    write(
        run_dir,
        job(1),
        started(1.0, run_dir),
        fresh(2.0),
        interval(2.0, "every 10 steps", "fixed: every 10 steps", steps=10),
        *[progress(2.0 + s, s) for s in range(1, 11)],
        commit(12.5, 10, stall=0.5, duration=2.0),
        *[progress(2.0 + s, s) for s in range(11, 21)],
        commit(22.5, 20, stall=0.25, duration=1.0, written=200),
        *[progress(2.0 + s, s) for s in range(21, 26)],
        notice(27.5, "gcp", 25, kind="warning"),
        notice(28.0, "aws", 25),
        notice(28.5, "SIGTERM", 25),
        commit(29.0, 25, reason="notice", stall=1.0, duration=1.5, written=100),
        exited(30.0, "preempted", 25),
    )
    write(
        run_dir,
        SUPERVISOR,
        attempt_ended(31.0, 1, 0.5),
        retry(31.0),
        market(31.0, 1),  # the drill's market took attempt 1's machine
        market(35.0, None),  # nothing was running
        pool_chosen(40.0),
        attempt_started(40.0, 2),
    )
    write(
        run_dir,
        job(2),
        started(41.0, run_dir),
        interval(41.0, "every 10 steps", "fixed: every 10 steps", steps=10),  # unchanged: not a new choice
        restored(43.0, 25, 0),
        *[progress(43.0 + 2 * (s - 25), s) for s in range(26, 31)],
        commit(53.5, 30, stall=0.75, duration=3.0, written=300),
        *[progress(43.0 + 2 * (s - 25), s) for s in range(31, 36)],
    )
    write(run_dir, SUPERVISOR, attempt_ended(70.0, 2, 0.75, "killed"), retry(70.0), attempt_started(72.0, 3))
    write(
        run_dir,
        job(3),
        started(73.0, run_dir),
        restored(74.0, 30, 5),
        interval(74.0, "young-daly", YOUNG_DALY, seconds=60.0),
        *[progress(74.0 + s - 30, s) for s in range(31, 41)],
        commit(85.0, 40, reason="final", size=2000, stall=0.5, duration=2.5, written=500),
        exited(86.0, "finished", 40),
    )
    write(
        run_dir,
        SUPERVISOR,
        attempt_ended(87.0, 3, 0.25, "succeeded"),
        ev.JobFinished(time=88.0, job=RUN_ID, state="succeeded", reason="the job succeeded"),
    )


@pytest.fixture
def three_attempts(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    write_three_attempts(run_dir)
    return run_dir


# -- build_report on a synthetic log -----------------------------------------------------------------------------


def test_attempts_interruptions_and_their_sources(three_attempts: Path) -> None:
    r = report_of(three_attempts)
    assert r.run == str(three_attempts)
    assert r.state == "finished"
    assert (r.first_event, r.last_event) == (0.0, 88.0)
    assert r.attempts == 3
    assert r.supervisor_attempts == 3
    # The first stop notice of attempt 1 (not the GCP warning before it, nor the SIGTERM after it);
    # attempt 2 got none; attempt 3 finished.
    assert r.interruptions == 2
    assert r.interruptions_by_source == {"aws": 1, "unannounced": 1}
    assert r.drill_interruptions == 1  # the market's interruption while nothing ran does not count


def test_restarts_resumes_and_replayed_work(three_attempts: Path) -> None:
    r = report_of(three_attempts)
    assert (r.restarts, r.resumed, r.failed_to_resume) == (2, 2, 0)
    assert r.resume_rate == 1.0
    # Attempt 1 saved at its stopping step (0 replayed); attempt 2 was killed 5 steps past its last save.
    assert r.replayed_steps == Spread(count=2, mean=2.5, median=2.5, p95=5.0, max=5.0)
    # In seconds at the interrupted attempt's own step time: 1 s/step for attempt 1, 2 s/step for attempt 2.
    assert r.replayed_seconds == Spread(count=2, mean=5.0, median=5.0, p95=10.0, max=10.0)


def test_time_to_recover_runs_from_the_last_event_to_the_first_progress_after_the_restore(
    three_attempts: Path,
) -> None:
    r = report_of(three_attempts)
    # 30 (attempt 1's exit) -> 45 (attempt 2's first progress), 63 (attempt 2's last progress) -> 75.
    # The supervisor's and the market's events in between (31-40, 70-72) belong to no attempt.
    assert r.recover_seconds == Spread(count=2, mean=13.5, median=13.5, p95=15.0, max=15.0)


def test_checkpoint_stall_write_and_size_spreads(three_attempts: Path) -> None:
    r = report_of(three_attempts)
    assert r.checkpoints == 5
    assert r.emergency_checkpoints == 1
    assert r.stall_seconds == Spread(count=5, mean=0.6, median=0.5, p95=1.0, max=1.0)
    assert r.write_seconds == Spread(count=5, mean=2.0, median=2.0, p95=3.0, max=3.0)
    assert r.checkpoint_bytes == Spread(count=5, mean=1200.0, median=1000.0, p95=2000.0, max=2000.0)
    # ``written_bytes`` when the save says so, else its whole size.
    assert r.written_bytes == Spread(count=5, mean=420.0, median=300.0, p95=1000.0, max=1000.0)


def test_goodput_final_step_and_cost(three_attempts: Path) -> None:
    r = report_of(three_attempts, on_demand_price=180.0)
    assert r.wall_seconds == 88.0  # first event (the supervisor's, at 0) to last (at 88)
    # From each restore to the attempt's end, less what the next attempt replayed and the checkpoint stalls:
    # attempt 1: 30 - 2 - 0 - 1.75 = 26.25; attempt 2: 63 - 43 - 5 steps * 2 s - 0.75 = 9.25;
    # attempt 3: 86 - 74 - 0.5 = 11.5.
    assert r.useful_seconds == 47.0
    assert r.goodput == pytest.approx(47.0 / 88.0)
    assert r.final_step == 40
    assert r.cost == 1.5  # 0.5 + 0.75 + 0.25 from attempt_ended
    assert r.on_demand_price == 180.0
    assert r.on_demand_cost == pytest.approx(180.0 * 47.0 / 3600.0)
    assert r.saved == pytest.approx(2.35 - 1.5)


def test_the_wall_time_is_split_into_where_it_went(three_attempts: Path) -> None:
    b = report_of(three_attempts).breakdown
    assert b is not None
    # Start-up: the launch at 0 to attempt 1's run_started at 1, and on to its fresh start at 2; the 11 s from
    # attempt 1's exit to attempt 2's start (no backoff); attempt 2's 2 s to its restore, less the 0.5 s
    # restore; the 10 s from attempt 2's last event to attempt 3's start; attempt 3's 1 s less its restore.
    assert b == Breakdown(wall=88.0, useful=47.0, replayed=10.0, stalls=3.0, restore=1.0, startup=25.0, backoff=0.0,
                          capacity=0.0)  # fmt: skip
    assert b.other == 2.0  # attempt 3's end at 86 to the supervisor's last event at 88
    assert b.controlled == 14.0 and b.goodput == pytest.approx(47.0 / 88.0)
    assert b.goodput_controlled == pytest.approx(47.0 / (88.0 - 25.0))
    rows = dict(report_rows(report_of(three_attempts), None, []))
    assert rows["goodput"] == "53% (useful 47.0 s of 88.0 s); 75% leaving out start-up and waiting for capacity"
    assert rows["  where the time went"] == (
        "useful 47.0 s (53%), replayed 10.0 s (11%), checkpoint stalls 3.0 s (3%), restore 1.0 s (1%), "
        "start-up 25.0 s (28%), other 2.0 s (2%)"
    )
    assert rows["  spotsafe's own losses"] == "15.9% of wall time (stalls, restore, replay)"


def test_backoff_and_waits_for_capacity_are_told_apart_from_start_up(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    write(run_dir, SUPERVISOR, attempt_started(0.0, 1))
    write(run_dir, job(1), started(1.0, run_dir), fresh(1.0), *[progress(1.0 + s, s) for s in range(1, 10)])
    write(run_dir, job(1), exited(10.0, "preempted", 9))
    write(
        run_dir,
        SUPERVISOR,
        attempt_ended(11.0, 1, 0.1),
        ev.RetryDecided(time=11.0, job=RUN_ID, relaunch=True, delay_s=4.0, reason="backoff"),
        attempt_started(15.0, 2),
        ev.AttemptEnded(time=15.5, job=RUN_ID, number=2, pool="spot", machine=None, exit_code=1,
                        exit_class="no_capacity", step_before=9, step_after=9, duration_s=0.5, cost=0.0),
        ev.RetryDecided(time=15.5, job=RUN_ID, relaunch=True, delay_s=20.0, reason="no capacity"),
        attempt_started(35.5, 3),
    )  # fmt: skip
    write(
        run_dir, job(3), started(37.5, run_dir), restored(38.0, 9, 0), progress(39.0, 10), exited(40.0, "finished", 10)
    )
    b = report_of(run_dir).breakdown
    assert b is not None
    assert b.backoff == 4.0 and b.capacity == 20.5  # attempt 2 found none (0.5 s), then 20 s of waiting
    # Start-up: 1 s to attempt 1's start; of the 27.5 s between attempts, what was not waiting (3 s: noticing
    # the exit, launching, the 2 s from attempt 3's launch to its start); attempt 3's 0.5 s to its restore.
    assert b.startup == pytest.approx(1.0 + 3.0 + 0.0)
    assert b.restore == 0.5


def test_interval_choices_are_kept_when_they_change(three_attempts: Path) -> None:
    r = report_of(three_attempts)
    assert [(c.time, c.policy, c.reason, c.interval_steps, c.interval_s) for c in r.intervals] == [
        (2.0, "every 10 steps", "fixed: every 10 steps", 10, None),
        (74.0, "young-daly", YOUNG_DALY, None, 60.0),
    ]


def test_the_on_demand_price_comes_from_on_demand_pools_the_supervisor_used_or_offered(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    write(run_dir, SUPERVISOR, pool_chosen(0.0, "spot", 1.0), attempt_started(0.0, 1, "spot", 1.0))
    write(run_dir, job(1), started(1.0, run_dir), fresh(1.0), progress(2.0, 1), notice(3.0, "azure", 1))
    write(run_dir, job(1), exited(4.0, "preempted", 1))
    write(
        run_dir,
        SUPERVISOR,
        attempt_ended(5.0, 1, 0.125),
        pool_chosen(6.0, "on-demand", 4.0),
        attempt_started(6.0, 2, "on-demand", 4.0),
    )
    write(run_dir, job(2), started(7.0, run_dir), restored(8.0, 1, 0), progress(9.0, 2), exited(10.0, "finished", 2))
    write(run_dir, SUPERVISOR, attempt_ended(11.0, 2, 0.25, "succeeded"))
    r = report_of(run_dir)
    assert r.interruptions_by_source == {"azure": 1}
    assert r.on_demand_price == 4.0  # the spot pool's price is no on-demand price
    assert r.cost == 0.375
    # Useful: 4 - 1 (fresh at 1) + 10 - 8 = 5 s of 11 s.
    assert (r.useful_seconds, r.wall_seconds) == (5.0, 11.0)
    assert r.on_demand_cost == pytest.approx(4.0 * 5.0 / 3600.0)
    assert r.saved == pytest.approx(4.0 * 5.0 / 3600.0 - 0.375)
    given = report_of(run_dir, on_demand_price=2.0)
    assert given.on_demand_price == 2.0  # the argument wins
    assert given.on_demand_cost == pytest.approx(2.0 * 5.0 / 3600.0)


def test_the_cheapest_on_demand_pool_of_the_job_is_the_comparison_even_unused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    chosen = ev.PoolChosen(
        time=0.0, job=RUN_ID, pool="spot", market="spot", price_per_hour=1.0, reason="cheapest", on_demand_per_hour=6.0
    )
    write(run_dir, SUPERVISOR, chosen, attempt_started(0.0, 1, "spot", 1.0))
    write(run_dir, job(1), started(1.0, run_dir), fresh(1.0), progress(2.0, 1), exited(4.0, "finished", 1))
    write(run_dir, SUPERVISOR, attempt_ended(5.0, 1, 0.125, "succeeded"))
    assert report_of(run_dir).on_demand_price == 6.0
    # An on-demand attempt on 3 nodes at 1.5 $/h a node costs 4.5 $/h: the cheaper of the two is compared.
    od = ev.AttemptStarted(
        time=6.0, job=RUN_ID, number=2, pool="od", market="on-demand", price_per_hour=1.5, step_before=1, nodes=3
    )
    write(run_dir, SUPERVISOR, od)
    assert report_of(run_dir).on_demand_price == 4.5


def test_the_on_demand_comparison_price_of_a_job(tmp_path: Path) -> None:
    def config(*pools: Pool, price: float | None = None) -> RunConfig:
        return RunConfig(
            name="j", command=("true",), url=str(tmp_path), store=tmp_path / "s", pools=pools, on_demand_per_hour=price
        )

    spot = Pool(name="s", price_per_hour=1.0)
    assert on_demand_per_hour(config(spot)) is None
    od = (
        Pool(name="a", market="on-demand", price_per_hour=3.0, nodes=2),
        Pool(name="b", market="on-demand", price_per_hour=5.0),
    )
    assert on_demand_per_hour(config(spot, *od)) == 5.0  # the cheapest per hour for the whole job: 5 < 3 x 2
    assert on_demand_per_hour(config(spot, *od, price=2.5)) == 2.5  # as configured (a drill's --on-demand-price)
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ConfigError, match="on-demand price"):
            config(spot, price=bad)


def test_without_supervisor_events_there_is_no_cost(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    write(run_dir, job(1), started(0.0, run_dir), fresh(0.0), progress(1.0, 1), exited(2.0, "finished", 1))
    r = report_of(run_dir)
    assert (r.state, r.attempts, r.supervisor_attempts, r.interruptions) == ("finished", 1, 0, 0)
    assert (r.restarts, r.resume_rate) == (0, None)
    assert (r.cost, r.on_demand_price, r.on_demand_cost, r.saved) == (None, None, None, None)
    assert r.goodput == 1.0
    with_price = report_of(run_dir, on_demand_price=3600.0)
    assert (with_price.on_demand_cost, with_price.saved) == (2.0, None)  # nothing spent is recorded


def test_a_fresh_start_after_a_committed_checkpoint_failed_to_resume(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    write(
        run_dir,
        job(1),
        started(0.0, run_dir),
        fresh(0.0),
        *[progress(float(s), s) for s in range(1, 6)],
        commit(5.5, 5),
        notice(6.0, "SIGTERM", 5),
        exited(6.0, "preempted", 5),
    )
    # The checkpoint at step 5 turned out damaged: attempt 2 skipped it and started from step 0.
    second = (started(10.0, run_dir), fresh(11.0, skipped=1), progress(12.0, 1), exited(20.0, "finished", 9))
    write(run_dir, job(2), *second)
    r = report_of(run_dir)
    assert (r.restarts, r.resumed, r.failed_to_resume) == (1, 0, 1)
    assert r.resume_rate == 0.0
    assert r.interruptions_by_source == {"SIGTERM": 1}
    assert r.recover_seconds == Spread.of([6.0])  # 6 (attempt 1's exit) -> 12 (first progress after the restore)
    assert r.replayed_steps.count == 0  # no restore_completed, so nothing is known replayed
    assert r.final_step == 9


def test_a_fresh_start_with_nothing_committed_is_neither_resumed_nor_failed(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    write(run_dir, job(1), started(0.0, run_dir), fresh(0.0), progress(1.0, 1), exited(2.0, "preempted", 1))
    write(run_dir, job(2), started(3.0, run_dir), fresh(3.0), progress(4.0, 1), exited(5.0, "finished", 2))
    r = report_of(run_dir)
    assert r.restarts == 1
    assert r.failed_to_resume == 0
    assert r.resumed == 0  # "resumed when it restored a checkpoint": there was none to restore


def test_supervisor_events_between_attempts_do_not_extend_the_attempts(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    write(run_dir, job(1), started(0.0, run_dir), fresh(0.0), progress(5.0, 5), exited(10.0, "preempted", 5))
    write(run_dir, SUPERVISOR, attempt_ended(100.0, 1, 0.0), retry(100.0), market(105.0, 1))
    write(
        run_dir,
        job(2),
        started(120.0, run_dir),
        restored(121.0, 5, 0),
        progress(122.0, 6),
        exited(130.0, "finished", 6),
    )
    r = report_of(run_dir)
    assert r.recover_seconds == Spread.of([112.0])  # from 10, not from the supervisor's 100 or 105
    assert r.useful_seconds == 19.0  # 0-10 and 121-130
    assert r.wall_seconds == 130.0
    assert r.interruptions_by_source == {"unannounced": 1}  # the market's interruption is no notice


def write_silent(run_dir: Path) -> None:
    """Attempt 1 (1-11) commits step 5 and is stopped on an AWS notice at step 10; attempt 2 is killed as it
    starts (launched at 13, killed at 14: its process wrote nothing); a launch at 15 finds no capacity; attempt 3
    (launched at 16) restores step 5 (5 replayed) at 18, steps 6-10 at 19-23, and finishes at 24. A drill's
    market interrupted attempts 1 and 2."""
    write(run_dir, SUPERVISOR, attempt_started(0.0, 1))
    write(
        run_dir,
        job(1),
        started(1.0, run_dir),
        fresh(1.0),
        *[progress(1.0 + s, s) for s in range(1, 11)],
        commit(6.5, 5),
        notice(10.5, "aws", 10),
        exited(11.0, "preempted", 10),
    )
    write(run_dir, SUPERVISOR, market(10.5, 1), attempt_ended(12.0, 1, 0.5), retry(12.0), attempt_started(13.0, 2))
    write(run_dir, SUPERVISOR, market(13.5, 2), attempt_ended(14.0, 2, 0.25, "killed"), retry(14.0))
    write(run_dir, SUPERVISOR, attempt_started(15.0, 3), attempt_ended(15.0, 3, 0.0, "no_capacity"), retry(15.0))
    write(run_dir, SUPERVISOR, attempt_started(16.0, 4))
    write(
        run_dir,
        job(4),
        started(17.0, run_dir),
        restored(18.0, 5, 5),
        *[progress(13.0 + s, s) for s in range(6, 11)],
        exited(24.0, "finished", 10),
    )
    write(run_dir, SUPERVISOR, attempt_ended(25.0, 4, 0.75, "succeeded"))


def test_an_attempt_killed_before_it_wrote_anything_is_an_interrupted_attempt(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    write_silent(run_dir)
    r = report_of(run_dir)
    assert (r.state, r.attempts, r.supervisor_attempts) == ("finished", 3, 4)  # the no-capacity launch is none
    assert (r.interruptions, r.interruptions_by_source) == (2, {"aws": 1, "unannounced": 1})
    assert r.interruptions == r.drill_interruptions  # the attempts the market stopped
    # The killed launch is no restart (it never got to restore); the attempt after it resumed.
    assert (r.restarts, r.resumed, r.failed_to_resume) == (1, 1, 0)
    # The work replayed was attempt 1's: 5 steps at its 1 s per step.
    assert r.replayed_steps == Spread.of([5.0]) and r.replayed_seconds == Spread.of([5.0])
    assert r.recover_seconds == Spread.of([5.0])  # from the killed launch's end (14) to step 6 (19)
    assert r.useful_seconds == (11.0 - 1.0 - 5.0) + (24.0 - 18.0) - 0.5  # nothing for the killed launch; a stall
    assert r.cost == 1.5


def test_a_launch_that_wrote_nothing_and_succeeded_is_no_attempt(tmp_path: Path) -> None:
    """A command that writes no spotsafe events and succeeds is not an attempt of the run's log."""
    run_dir = tmp_path / "run"
    write(run_dir, SUPERVISOR, attempt_started(0.0, 1), attempt_ended(5.0, 1, 0.1, "succeeded"))
    assert report_of(run_dir).attempts == 0


def test_interval_choices_are_deduplicated_while_unchanged(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # One policy part whose choice changes (an adaptive policy re-announces it when it moves).
    every = ("young_daly()", "fixed: every 10 steps")
    write(run_dir, job(1), started(0.0, run_dir), fresh(0.0), interval(0.0, *every, steps=10))
    write(run_dir, job(1), interval(5.0, *every, steps=10), exited(6.0, "preempted", 3))
    write(run_dir, job(2), started(7.0, run_dir), interval(7.0, *every, steps=10))
    write(run_dir, job(2), interval(8.0, "young_daly()", "fixed: every 20 steps", steps=20))
    write(run_dir, job(2), interval(9.0, *every, steps=10), exited(10.0, "finished", 4))
    r = report_of(run_dir)
    assert [(c.time, c.reason) for c in r.intervals] == [
        (0.0, "fixed: every 10 steps"),
        (8.0, "fixed: every 20 steps"),
        (9.0, "fixed: every 10 steps"),  # a change back is a change
    ]


def test_unchanged_choices_of_a_two_part_policy_are_not_repeated_at_each_restart(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    steps = ("every 50 steps", "fixed: every 50 steps", 50, None)
    seconds = ("every 600 s", "fixed: every 600 s of work", None, 600.0)
    for attempt in (1, 2, 3):
        t = 10.0 * attempt
        write(
            run_dir,
            job(attempt),
            started(t, run_dir),
            fresh(t) if attempt == 1 else restored(t, attempt, 0),
            interval(t, *steps),
            interval(t, *seconds),
            exited(t + 5, "finished" if attempt == 3 else "preempted", attempt),
        )
    r = report_of(run_dir)
    assert [c.policy for c in r.intervals] == ["every 50 steps", "every 600 s"]


# -- a run that is still going, and a run without events ---------------------------------------------------------


def write_running(run_dir: Path) -> None:
    write(run_dir, SUPERVISOR, attempt_started(0.0, 1))
    write(
        run_dir,
        job(1),
        started(1.0, run_dir),
        fresh(2.0),
        *[progress(2.0 + s, s) for s in range(1, 5)],
        commit(6.5, 4, stall=0.5),
        notice(7.0, "SIGTERM", 4),
        exited(8.0, "preempted", 4),
    )
    write(run_dir, SUPERVISOR, attempt_ended(9.0, 1, 0.25), attempt_started(10.0, 2))
    write(
        run_dir,
        job(2),
        started(11.0, run_dir),
        restored(12.0, 4, 0),
        *[progress(12.0 + s - 4, s) for s in range(5, 9)],  # step 5 at 13 ... step 8 at 16
    )


def test_a_running_attempt_is_not_an_interruption_and_now_extends_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    write_running(run_dir)
    r = report_of(run_dir)
    assert r.state == "running"
    assert (r.attempts, r.interruptions, r.interruptions_by_source) == (2, 1, {"SIGTERM": 1})
    assert (r.restarts, r.resumed, r.failed_to_resume) == (1, 1, 0)
    assert r.recover_seconds == Spread.of([5.0])  # 8 -> 13
    assert r.final_step == 8
    assert r.cost == 0.25
    assert (r.wall_seconds, r.useful_seconds) == (16.0, 6.0 + 4.0 - 0.5)  # 2-8 and 12-16, less a stall

    later = report_of(run_dir, now=40.0)
    assert later.state == "running"
    assert (later.interruptions, later.interruptions_by_source) == (1, {"SIGTERM": 1})
    assert later.last_event == 40.0
    assert later.wall_seconds == 40.0
    assert later.useful_seconds == 6.0 + 28.0 - 0.5  # the running attempt reached ``now``
    assert later.goodput == pytest.approx(33.5 / 40.0)


def test_a_single_running_attempt(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    write(run_dir, job(1), started(0.0, run_dir), fresh(0.0), progress(1.0, 1))
    r = report_of(run_dir, now=10.0)
    assert (r.state, r.attempts, r.interruptions, r.restarts) == ("running", 1, 0, 0)
    assert r.interruptions_by_source == {}
    assert (r.wall_seconds, r.useful_seconds, r.goodput) == (10.0, 10.0, 1.0)


def test_now_does_not_change_a_finished_run(three_attempts: Path) -> None:
    assert report_of(three_attempts, now=10_000.0) == report_of(three_attempts)


def test_a_last_attempt_that_crashed_after_which_the_job_ended_is_not_running(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    write(run_dir, SUPERVISOR, attempt_started(0.0, 1))
    write(run_dir, job(1), started(1.0, run_dir), fresh(1.0), progress(2.0, 1), progress(3.0, 2))  # then a crash
    write(
        run_dir,
        SUPERVISOR,
        attempt_ended(4.0, 1, 0.5, "crashed"),
        ev.RetryDecided(time=4.0, job=RUN_ID, relaunch=False, delay_s=0.0, reason="3 crashed exits in a row"),
        ev.JobFinished(time=4.0, job=RUN_ID, state="failed", reason="3 crashed exits in a row"),
    )
    r = report_of(run_dir, now=86_400.0)  # the report read a day later
    assert r.state == "stopped"
    assert (r.interruptions, r.interruptions_by_source) == (1, {"unannounced": 1})
    assert r.wall_seconds == 4.0
    assert r.useful_seconds == 2.0


def test_a_run_without_events_is_empty(tmp_path: Path) -> None:
    r = build_report("nowhere", [], now=100.0)
    assert (r.state, r.attempts, r.interruptions, r.restarts) == ("empty", 0, 0, 0)
    assert (r.first_event, r.last_event, r.wall_seconds, r.useful_seconds) == (None, None, 0.0, 0.0)
    assert (r.goodput, r.resume_rate, r.cost, r.final_step, r.saved) == (None, None, None, None, None)
    assert r.checkpoints == 0 and r.stall_seconds == Spread(0, None, None, None, None)
    json.dumps(r.to_json(), allow_nan=False)
    assert report_of(tmp_path).state == "empty"  # a folder without events.jsonl


# -- Spread -------------------------------------------------------------------------------------------------------


def test_spread_of_nothing_and_of_one_value() -> None:
    assert Spread.of([]) == Spread(count=0, mean=None, median=None, p95=None, max=None)
    assert Spread.of([2.5]) == Spread(count=1, mean=2.5, median=2.5, p95=2.5, max=2.5)


@pytest.mark.parametrize(("n", "p95"), [(20, 19.0), (100, 95.0), (2, 2.0), (19, 19.0), (21, 20.0)])
def test_spread_p95_is_the_nearest_rank(n: int, p95: float) -> None:
    values = [float(v) for v in range(n, 0, -1)]  # 1..n, in any order
    spread = Spread.of(values)
    assert spread == Spread(count=n, mean=(n + 1) / 2, median=(n + 1) / 2, p95=p95, max=float(n))


def test_spread_median_of_an_even_count_and_repeated_values() -> None:
    assert Spread.of([4.0, 1.0, 3.0, 2.0]).median == 2.5
    assert Spread.of([7.0] * 20) == Spread(count=20, mean=7.0, median=7.0, p95=7.0, max=7.0)


# -- JSON ---------------------------------------------------------------------------------------------------------


def test_to_json_is_serialisable_and_has_the_derived_fields(three_attempts: Path) -> None:
    r = report_of(three_attempts, on_demand_price=180.0)
    doc = json.loads(json.dumps(r.to_json(), allow_nan=False))
    assert doc["resume_rate"] == 1.0
    assert doc["goodput"] == pytest.approx(47.0 / 88.0)
    assert doc["on_demand_cost"] == pytest.approx(2.35)
    assert doc["saved"] == pytest.approx(0.85)
    assert doc["breakdown"]["start-up"] == 25.0 and doc["breakdown"]["goodput_controlled"] == pytest.approx(47 / 63)
    assert doc["attempts"] == 3 and doc["interruptions_by_source"] == {"aws": 1, "unannounced": 1}
    assert doc["replayed_steps"] == {"count": 2, "mean": 2.5, "median": 2.5, "p95": 5.0, "max": 5.0}
    assert [c["policy"] for c in doc["intervals"]] == ["every 10 steps", "young-daly"]
    running = three_attempts.parent / "running"
    write_running(running)
    json.dumps(report_of(running, now=50.0).to_json(), allow_nan=False)


# -- the command line ---------------------------------------------------------------------------------------------


def spotsafe(args: Sequence[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SPOTSAFE_")}
    environ.update(COLUMNS="200", **env)
    return subprocess.run(
        [SPOTSAFE, "report", *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=120, check=False
    )


def expected_json(run_dir: Path, url: str, **kwargs: Any) -> dict[str, Any]:
    built = build_report(url, read_run_events(LocalStorage(run_dir)), **kwargs)
    doc: dict[str, Any] = json.loads(json.dumps(built.to_json(), allow_nan=False))
    return doc


def test_cli_json_and_table_of_a_synthetic_run(three_attempts: Path, tmp_path: Path) -> None:
    url = str(three_attempts)
    done = spotsafe([url, "--json", "--on-demand-price", "180"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert (doc.pop("job"), doc.pop("store_attempts")) == (None, [])  # no store here
    assert doc == expected_json(three_attempts, url, on_demand_price=180.0)
    assert doc["saved"] == pytest.approx(0.85)

    table = spotsafe([url], cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    out = table.stdout
    assert "interruptions" in out and "2 (1 aws, 1 unannounced; 1 delivered by a drill" in out
    assert "goodput" in out and "53% (useful 47.0 s of 88.0 s)" in out
    assert "2 of 2 restarts (100%)" in out
    assert "5 (1 on a notice)" in out
    assert "$1.5000 spent" in out


def test_cli_on_a_folder_without_events(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    done = spotsafe([str(empty)], cwd=tmp_path)
    assert done.returncode == 1
    assert "no events in" in done.stdout and "events.jsonl" in done.stdout


def make_store(path: Path, url: str) -> list[dict[str, Any]]:
    """A job store with a job at ``url`` (two attempts) and another job elsewhere; the first job's attempts."""
    clock = iter(float(t) for t in range(1000, 2000))
    with JobStore(path, clock=lambda: next(clock)) as store:
        store.open_job("other", ["python", "other.py"], url + "-elsewhere")
        store.start_attempt("other", step_before=None)
        store.open_job("train", ["python", "train.py"], url + "/")  # a trailing slash still matches
        first = store.start_attempt("train", step_before=None, pool="spot")
        store.end_attempt("train", first, exit_code=75, exit_class="preempted", step_after=25, cost=0.5)
        second = store.start_attempt("train", step_before=25, pool="spot")
        store.end_attempt("train", second, exit_code=0, exit_class="succeeded", step_after=40, cost=0.25)
        attempts: list[dict[str, Any]] = json.loads(json.dumps([asdict(a) for a in store.attempts("train")]))
    return attempts


def test_cli_reads_the_job_store_given_or_from_the_environment(three_attempts: Path, tmp_path: Path) -> None:
    url = str(three_attempts)
    db = tmp_path / "state" / "jobs.sqlite"
    attempts = make_store(db, url)
    assert [a["number"] for a in attempts] == [1, 2]

    given = spotsafe([url, "--store", str(db), "--json"], cwd=tmp_path)
    assert given.returncode == 0, given.stderr
    doc = json.loads(given.stdout)
    assert doc["job"] == "train"
    assert doc["store_attempts"] == attempts
    assert doc["attempts"] == 3  # the report's own figures still come from the event log

    # No URL and no --store: both from the environment; the table names the job.
    env = spotsafe([], cwd=tmp_path, SPOTSAFE_CHECKPOINT_URL=url, SPOTSAFE_JOB_STORE=str(db))
    assert env.returncode == 0, env.stderr
    assert "job train: 2 in the store" in env.stdout
    assert "attempts (job store)" in env.stdout and "preempted" in env.stdout and "25 -> 40" in env.stdout


def test_cli_without_a_url_is_a_usage_error(tmp_path: Path) -> None:
    done = spotsafe([], cwd=tmp_path)
    assert done.returncode == 2
    assert "SPOTSAFE_CHECKPOINT_URL" in done.stderr


# -- end to end: a real job under the supervisor, preempted twice ---------------------------------------------------


@pytest.mark.e2e
def test_a_supervised_run_preempted_twice(tmp_path: Path) -> None:
    run_dir, db, steps = tmp_path / "run", tmp_path / "jobs.sqlite", 30
    config = RunConfig(
        name="job",
        command=(sys.executable, str(TINY_JOB), str(steps), "--stop", "1:7", "--stop", "2:12", "--sleep", "0.005"),
        url=str(run_dir),
        store=db,
        retry=RelaunchPolicy(initial_s=0.05, max_delay_s=0.2),
        grace_s=5.0,
        pools=(Pool(name="p", price_per_hour=3.6), Pool(name="od", market="on-demand", price_per_hour=4.0, nodes=2)),
    )
    lines: list[str] = []
    assert Supervisor(config, say=lines.append, output=subprocess.DEVNULL).run() == 0, lines
    with JobStore(db) as store:
        attempts = store.attempts("job")
    assert [a.exit_class for a in attempts] == ["preempted", "preempted", "succeeded"]
    assert {a.pool for a in attempts} == {"p"}  # the on-demand pool is never used

    r = report_of(run_dir)
    assert r.state == "finished"
    assert (r.attempts, r.supervisor_attempts) == (3, 3)
    assert (r.interruptions, r.interruptions_by_source) == (2, {"SIGTERM": 2})
    assert (r.restarts, r.resumed, r.failed_to_resume, r.resume_rate) == (2, 2, 0, 1.0)
    assert (r.replayed_steps.count, r.replayed_steps.max) == (2, 0.0)  # each stop saved at its step
    assert r.recover_seconds.count == 2
    assert r.emergency_checkpoints == 2
    assert r.final_step == steps
    assert r.drill_interruptions == 0
    costs = [a.cost for a in attempts]
    assert all(c is not None and c > 0 for c in costs)
    assert r.cost == pytest.approx(sum(c for c in costs if c is not None))
    # The job's on-demand pool (4 $/h x 2 nodes), unused, is the comparison; the spot pool's price is not.
    assert r.on_demand_price == 8.0
    assert r.saved == pytest.approx(8.0 * r.useful_seconds / 3600.0 - r.cost)
    assert r.goodput is not None and 0 < r.goodput <= 1

    done = spotsafe([str(run_dir), "--store", str(db), "--json"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["job"] == "job"
    assert [a["exit_class"] for a in doc.pop("store_attempts")] == ["preempted", "preempted", "succeeded"]
    doc.pop("job")
    assert doc == expected_json(run_dir, str(run_dir))
    assert doc["interruptions_by_source"] == {"SIGTERM": 2} and doc["final_step"] == steps
