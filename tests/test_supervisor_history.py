"""The supervisor's events share the run's log with the job's; the job's own history must not count them."""

from __future__ import annotations

from pathlib import Path

from spotsafe.storage.local import LocalStorage
from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import EVENTS_FILE, EventLog, RunIdentity
from spotsafe.telemetry.store import read_history


def test_supervisor_events_between_attempts_count_as_neither_run_time_nor_restart(tmp_path: Path) -> None:
    path = tmp_path / EVENTS_FILE
    job1, job2 = RunIdentity("r", 1, 101), RunIdentity("r", 2, 102)
    sup = RunIdentity("r", 0, 100)
    with EventLog(path, job1) as log:
        log.emit(ev.RunStarted(time=0.0, url=str(tmp_path), host="m1"))
        log.emit(ev.RestoreFresh(time=1.0, skipped=0))
        log.emit(ev.Progress(time=10.0, step=50, epoch=0))
        log.emit(ev.RunExited(time=10.0, reason="preempted", step=50, exit_code=75))
    with EventLog(path, sup) as log:
        common = {"job": "r", "pool": "p", "machine": "m1", "exit_code": 75, "exit_class": "preempted"}
        log.emit(ev.AttemptEnded(time=100.0, number=1, step_before=None, step_after=50, duration_s=10.0, cost=0.1,
                                 **common))  # fmt: skip
        log.emit(ev.RetryDecided(time=100.0, job="r", relaunch=True, delay_s=0.0, reason="preempted"))
        log.emit(ev.MarketInterruption(time=105.0, number=1, mode="aws", interrupted=1, window_s=10.0,
                                       capacity_back_in_s=5.0, killed=False))  # fmt: skip
    with EventLog(path, job2) as log:
        log.emit(ev.RunStarted(time=120.0, url=str(tmp_path), host="m2"))
        log.emit(ev.RestoreCompleted(time=121.0, step=50, epoch=0, checkpoint="c", bytes=1, duration_s=1.0,
                                     last_known_step=50, replayed_steps=0))  # fmt: skip
        log.emit(ev.RunExited(time=130.0, reason="finished", step=60, exit_code=0))
    history = read_history(LocalStorage(tmp_path))
    assert history.attempts == 2
    assert history.run_s == 20.0  # 0-10 and 120-130; not the supervisor's 10-105
    assert history.restart_s == [111.0]  # from the first attempt's last event (10 s) to the restore (121 s)
    assert history.interruptions == 1 and history.unnoticed == 1  # no commit at step 50 in this log
