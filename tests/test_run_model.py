"""One reading of the event log: the same run's log, given to every reader, gives the same figures.

The log is a drill-like supervised run written through :class:`EventLog` as the processes would write it:
an attempt preempted by an AWS notice after an emergency save, one killed by the market before it wrote
anything, one stopped by SIGTERM after restoring an older checkpoint past a damaged one (replaying steps),
a wait for a pool, and a last attempt that finishes; with the supervisor's costs and the market's deliveries.
The report (JSON), the timeline, the live status, the drill's and the demo's summaries, the metrics and the
dashboard must agree on every figure they share.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from spotsafe.cli.demo import summarise
from spotsafe.cli.live.state import LiveState
from spotsafe.dashboard.catalog import Catalog
from spotsafe.dashboard.server import Dashboard
from spotsafe.storage.local import LocalStorage
from spotsafe.supervisor.chaos import ChaosResult
from spotsafe.supervisor.drill import JOB_NAME, DrillConfig, _report
from spotsafe.supervisor.store import JobStore
from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import EVENTS_FILE, EventLog, LoggedEvent, RunIdentity
from spotsafe.telemetry.metrics import Metrics
from spotsafe.telemetry.report import Report, build_report, report_of
from spotsafe.telemetry.runmodel import RunModel
from spotsafe.telemetry.store import read_history, read_run_events
from spotsafe.telemetry.timeline import build_timeline

RUN = "r"
HOUR = 3600.0


class Writer:
    """Appends events to a run's log as the process of ``attempt`` (0: the supervisor or the market) would."""

    def __init__(self, run: Path) -> None:
        self.run = run

    def __call__(self, attempt: int, *events: ev.Event) -> None:
        with EventLog(self.run / EVENTS_FILE, RunIdentity(RUN, attempt, 100 + attempt)) as log:
            for event in events:
                log.emit(event)


def _started(number: int, t: float, pool: str = "spot-a", price: float = 1.0) -> ev.AttemptStarted:
    return ev.AttemptStarted(time=t, job=JOB_NAME, number=number, pool=pool, market="spot", price_per_hour=price,
                             step_before=None, nodes=1)  # fmt: skip


def _ended(number: int, t: float, exit_class: str, code: int, duration: float, pool: str = "spot-a") -> ev.AttemptEnded:
    return ev.AttemptEnded(time=t, job=JOB_NAME, number=number, pool=pool, machine="m", exit_code=code,
                           exit_class=exit_class, step_before=None, step_after=None, duration_s=duration,
                           cost=duration / HOUR)  # fmt: skip


def _market(number: int, t: float, interrupted: int | None, mode: str = "aws", killed: bool = False) -> ev.Event:
    return ev.MarketInterruption(time=t, number=number, mode=mode, interrupted=interrupted, window_s=10.0,
                                 capacity_back_in_s=2.0, killed=killed)  # fmt: skip


def _save(t: float, step: int, reason: str) -> ev.SaveCommitted:
    return ev.SaveCommitted(time=t, step=step, checkpoint=f"c{step}", reason=reason, bytes=1000 + step, blobs=2,
                            stall_s=0.01 * step, duration_s=0.1 + 0.01 * step, written_bytes=500)  # fmt: skip


def _progress(first: int, last: int, at: float) -> list[ev.Event]:
    """Steps ``first``..``last``, one a second, step ``first`` at ``at``."""
    return [ev.Progress(time=at + i, step=step, epoch=0) for i, step in enumerate(range(first, last + 1))]


def _restored(t: float, step: int, replayed: int, last_known: int) -> ev.RestoreCompleted:
    return ev.RestoreCompleted(time=t, step=step, epoch=0, checkpoint=f"c{step}", bytes=1000, duration_s=0.3,
                               last_known_step=last_known, replayed_steps=replayed)  # fmt: skip


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """The run's folder, with its log (times from 1000 s)."""
    run = tmp_path / "run"
    w = Writer(run)
    every = ev.IntervalChosen(time=1001.5, policy="every", interval_s=None, interval_steps=5, reason="every 5 steps")
    w(0, ev.PoolChosen(time=1000.0, job=JOB_NAME, pool="spot-a", market="spot", price_per_hour=1.0,
                       reason="cheapest", on_demand_per_hour=3.0), _started(1, 1000.0))  # fmt: skip
    # Attempt 1: from scratch, an interval save, an AWS notice, the emergency save, preempted.
    w(1, ev.RunStarted(time=1001.0, url=str(run), host="m1"), ev.RestoreFresh(time=1001.5, skipped=0), every,
      *_progress(1, 10, 1002.0), ev.SaveStarted(time=1006.1, step=5, reason="interval"), _save(1006.5, 5, "interval"),
      ev.NoticeReceived(time=1011.5, source="aws", count=1, step=10, deadline=1030.0, detail="terminate"),
      ev.EmergencyPlanned(time=1011.6, step=10, source="aws", deadline=1030.0, time_left_s=15.0,
                          choice="incremental", estimate_s=0.4, options={"incremental": 0.4, "full": None},
                          reason="fits"),
      ev.SaveStarted(time=1011.6, step=10, reason="notice"), _save(1012.0, 10, "notice"),
      ev.EmergencyFinished(time=1012.1, step=10, choice="incremental", committed=True, deadline=1030.0,
                           before_deadline=True, margin_s=5.0, duration_s=0.5),
      ev.RunExited(time=1012.2, reason="preempted", step=10, exit_code=75))  # fmt: skip
    w(0, _market(1, 1011.4, 1), _ended(1, 1013.0, "preempted", 75, 13.0),
      ev.RetryDecided(time=1013.0, job=JOB_NAME, relaunch=True, delay_s=2.0, reason="preempted"),
      # Attempt 2: the market kills it as it starts, before it writes anything.
      _started(2, 1015.0), _market(2, 1015.5, 2, mode="kill", killed=True), _ended(2, 1016.0, "killed", -9, 1.0),
      ev.RetryDecided(time=1016.0, job=JOB_NAME, relaunch=True, delay_s=1.0, reason="killed"),
      _market(3, 1017.0, None), _started(3, 1018.0))  # fmt: skip
    # Attempt 3: the newest checkpoint is damaged; restores step 5 (5 steps replayed); SIGTERM after step 15.
    w(3, ev.RunStarted(time=1019.0, url=str(run), host="m2"), ev.PartialRemoved(time=1019.1, path="c12.partial"),
      ev.CheckpointSkipped(time=1019.2, checkpoint="c10", step=10, reason="blob fails its checksum"),
      _restored(1019.5, 5, replayed=5, last_known=10), every,
      *_progress(6, 15, 1020.0), _save(1024.5, 10, "interval"),
      ev.NoticeReceived(time=1026.0, source="aws", count=1, step=12, deadline=None, kind="warning"),
      ev.SaveFailed(time=1027.5, step=12, reason="warning", error="disk full"), _save(1029.5, 15, "interval"),
      ev.NoticeReceived(time=1030.0, source="SIGTERM", count=1, step=15, deadline=None, detail="SIGTERM"),
      ev.RunExited(time=1030.5, reason="preempted", step=15, exit_code=75))  # fmt: skip
    w(0, _market(4, 1029.9, 3, mode="sigterm"), _ended(3, 1031.0, "preempted", 75, 13.0),
      ev.RetryDecided(time=1031.0, job=JOB_NAME, relaunch=True, delay_s=0.0, reason="preempted"),
      ev.NoPoolAvailable(time=1031.0, job=JOB_NAME, wait_s=2.0, reason="spot-a is cooling down"),
      _started(4, 1033.0, pool="spot-b", price=1.2))  # fmt: skip
    # Attempt 4: resumes at step 15 and finishes.
    w(4, ev.RunStarted(time=1034.0, url=str(run), host="m3"), _restored(1034.5, 15, replayed=0, last_known=15),
      *_progress(16, 20, 1035.0), ev.SaveStarted(time=1039.2, step=20, reason="final"), _save(1039.5, 20, "final"),
      ev.RunExited(time=1039.6, reason="finished", step=20, exit_code=0))  # fmt: skip
    w(0, _ended(4, 1040.0, "succeeded", 0, 7.0, pool="spot-b"),
      ev.RetryDecided(time=1040.0, job=JOB_NAME, relaunch=False, delay_s=0.0, reason="the job succeeded"),
      ev.JobFinished(time=1040.0, job=JOB_NAME, state="succeeded", reason="the job succeeded"))  # fmt: skip
    return run


def events_of(run: Path) -> list[LoggedEvent]:
    return list(read_run_events(LocalStorage(run)))


@pytest.fixture
def report(run: Path) -> Report:
    return build_report(str(run), events_of(run))


def test_the_report_has_the_runs_figures(report: Report) -> None:
    """The figures the others must agree with, known from the log."""
    assert (report.state, report.attempts, report.supervisor_attempts) == ("finished", 4, 4)
    assert report.interruptions == report.drill_interruptions == 3
    assert report.interruptions_by_source == {"aws": 1, "unannounced": 1, "SIGTERM": 1}
    assert (report.checkpoints, report.emergency_checkpoints) == (5, 1)
    assert (report.restarts, report.resumed, report.failed_to_resume) == (2, 2, 0)
    assert report.replayed_steps.count == 2 and report.replayed_steps.max == 5.0
    assert report.cost == pytest.approx(34.0 / HOUR)
    assert report.on_demand_price == 3.0 and report.saved is not None and report.saved > 0
    assert report.final_step == 20 and report.goodput is not None and 0 < report.goodput < 1


def test_the_fold_fed_one_event_at_a_time_is_the_fold_of_the_whole_log(run: Path, report: Report) -> None:
    model = RunModel()
    for logged in events_of(run):
        model.apply(logged)
    assert report_of(str(run), model).to_json() == report.to_json()


def test_the_timeline_agrees(run: Path, report: Report) -> None:
    t = build_timeline(str(run), events_of(run), report)
    assert len(t.attempts) == report.attempts
    assert len(t.interruptions) == report.interruptions
    assert Counter(m.kind for m in t.interruptions) == Counter(report.interruptions_by_source)
    assert len(t.market) == report.drill_interruptions
    assert len(t.checkpoints) == report.checkpoints
    assert sum(1 for m in t.checkpoints if m.kind == "notice") == report.emergency_checkpoints
    assert len(t.restores) == report.resumed
    assert t.cost[-1][1] == pytest.approx(report.cost)
    assert max(step for series in t.progress for _, step in series) == report.final_step


def test_the_live_status_agrees(run: Path, report: Report) -> None:
    state = LiveState()
    for logged in events_of(run):
        state.apply(logged)
    assert state.interruptions == report.interruptions == report.drill_interruptions
    assert state.step == state.checkpoint_step == report.final_step
    assert (state.done, state.ok) == (True, True)


def test_the_metrics_agree(run: Path, report: Report) -> None:
    metrics = Metrics()
    for logged in events_of(run):
        metrics.on_event(logged.event)
    get = metrics.registry.get_sample_value
    by_reason = {reason: get("spotsafe_checkpoints_total", {"reason": reason}) or 0.0
                 for reason in ("interval", "notice", "final")}  # fmt: skip
    assert sum(by_reason.values()) == report.checkpoints
    assert by_reason["notice"] == report.emergency_checkpoints
    assert get("spotsafe_replayed_steps_total") == report.replayed_steps.count * (report.replayed_steps.mean or 0)
    assert get("spotsafe_restore_seconds_count") == report.resumed
    assert get("spotsafe_checkpoints_skipped_total") == 1
    assert get("spotsafe_drill_interruptions_total") == report.drill_interruptions
    stopped = sum(
        get("spotsafe_attempts_total", {"pool": "spot-a", "exit_class": c}) or 0 for c in ("preempted", "killed")
    )
    assert stopped == report.interruptions
    cost = sum(get("spotsafe_cost_dollars_total", {"pool": pool}) or 0.0 for pool in ("spot-a", "spot-b"))
    assert cost == pytest.approx(report.cost)
    assert get("spotsafe_step") == report.final_step


def test_the_drill_summary_agrees(run: Path, report: Report, tmp_path: Path) -> None:
    (tmp_path / "reference").mkdir()
    with JobStore(tmp_path / "jobs.sqlite") as store:
        store.open_job(JOB_NAME, ["job"], str(run))
    config = DrillConfig(command=("job",), workdir=tmp_path, reference=tmp_path / "reference")
    market = SimpleNamespace(delivered=3, interruptions=[])
    drill = _report(config, "a test", 0, 1.0, True, 40.0, run, tmp_path / "jobs.sqlite", market)  # type: ignore[arg-type]
    assert drill.checkpoints_committed == report.checkpoints
    assert drill.emergency_saves == report.emergency_checkpoints
    assert drill.steps_replayed == report.replayed_steps.count * (report.replayed_steps.mean or 0)
    assert drill.goodput == report.goodput
    assert drill.interruptions == report.drill_interruptions


def test_the_demo_summary_agrees(run: Path, report: Report, tmp_path: Path) -> None:
    (tmp_path / "reference").mkdir()
    demo = summarise(run, ChaosResult(), 1.0, 40.0, tmp_path / "reference")
    assert demo.checkpoints_committed == report.checkpoints
    assert demo.emergency_saves == report.emergency_checkpoints
    assert demo.steps_replayed == report.replayed_steps.count * (report.replayed_steps.mean or 0)
    assert (demo.fallbacks, demo.partial_saves_removed) == (1, 1)


def test_the_dashboard_agrees(run: Path, report: Report) -> None:
    catalog = Catalog([str(run)], [])
    [entry] = catalog.runs()
    doc: dict[str, Any] = Dashboard(catalog).run_json(entry)
    assert doc["report"] == build_report(entry.shown, events_of(run)).to_json()
    assert (doc["attempts"], doc["interruptions"], doc["final_step"]) == (4, 3, 20)
    assert doc["goodput"] == report.goodput and doc["cost"] == pytest.approx(report.cost)
    assert doc["report"]["saved"] == pytest.approx(report.saved)
    assert doc["report"]["emergency_checkpoints"] == report.emergency_checkpoints
    assert len(doc["timeline"]["interruptions"]) == report.interruptions


def test_the_checkpointers_history_agrees(run: Path, report: Report) -> None:
    history = read_history(LocalStorage(run))
    assert history.attempts == report.attempts - 1  # the silent attempt wrote nothing to learn from
    assert history.interruptions == report.interruptions - 1
    assert len(history.saves) == report.checkpoints
    assert history.last_step == report.final_step
