"""A drill counts each attempt its market stopped once, and its table, ``spotsafe report`` and the dashboard agree.

The drills run a real job (a few seconds of torch) under the real supervisor, with the market on a fake clock
that the test moves only once the job is where it should be (holding in attempt 1, or a relaunched attempt
started): every outage lands on a known state of the run, whatever the machine's speed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from spotsafe.cli.drill_report import print_drill
from spotsafe.dashboard.catalog import Catalog
from spotsafe.dashboard.server import Dashboard
from spotsafe.supervisor.drill import JOB_NAME, DrillConfig, DrillReport
from spotsafe.supervisor.reference import ensure_reference
from spotsafe.supervisor.store import JobStore
from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import EVENTS_FILE, LoggedEvent, read_events
from spotsafe.telemetry.report import build_report
from spotsafe.telemetry.rows import report_rows
from spotsafe.telemetry.timeline import build_timeline

from .test_drill import SPOTSAFE, Drill, launched, wait_for, write_trace

STEPS = 40
HOLD_AT = 10
JOB = f"""
import os, random, signal, time
from pathlib import Path
import numpy as np
import torch
import spotsafe

random.seed(0)
np.random.seed(0)
torch.manual_seed(0)
model = torch.nn.Linear(4, 4)
ckpt = spotsafe.Checkpointer(model=model, policy=spotsafe.every(steps=5), progress_interval=0)
ckpt.restore()
# The drill's first attempt holds at step {HOLD_AT} until the market takes its machine; SIGTERM does not stop it.
hold = os.environ["SPOTSAFE_RUN_ID"] != "reference" and os.environ["SPOTSAFE_ATTEMPT"] == "1"
while ckpt.step < {STEPS}:
    with torch.no_grad():
        model.weight.mul_(0.99)
    ckpt.step_done()
    if hold and ckpt.step == {HOLD_AT}:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        (Path(os.environ["SPOTSAFE_CHECKPOINT_URL"]).parent / "holding").write_text("attempt 1")
        while True:
            time.sleep(0.05)
ckpt.finish()
"""


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[tuple[str, ...], Path]:
    """The job's command, and its reference run (shared: each drill reuses it)."""
    folder = tmp_path_factory.mktemp("drill-counts")
    script = folder / "holding_job.py"
    script.write_text(JOB, encoding="utf-8")
    command = (sys.executable, str(script))
    ensure_reference(command, folder / "reference", lambda line: None)
    return command, folder / "reference"


def market_events(run: Path) -> list[ev.MarketInterruption]:
    return [e.event for e in read_events(run / EVENTS_FILE) if isinstance(e.event, ev.MarketInterruption)]


def check_counts_agree(report: DrillReport, workdir: Path) -> int:
    """The drill's table, ``spotsafe report`` (the command, as JSON and as its table) and the dashboard give the
    same count of interruptions: the attempts the job store records as stopped. Returns it."""
    run, store = workdir / "run", workdir / "jobs.sqlite"
    with JobStore(store) as jobs:
        attempts = jobs.attempts(JOB_NAME)
    stopped = sum(1 for a in attempts if a.exit_class in ("preempted", "killed"))
    assert report.interruptions == stopped, report

    shown = Console(record=True, width=200)
    print_drill(report, shown)
    assert f"{stopped} of running attempts (" in shown.export_text()

    done = subprocess.run(
        [str(SPOTSAFE), "report", str(run), "--store", str(store), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["interruptions"] == doc["drill_interruptions"] == stopped, doc
    logged: list[LoggedEvent] = list(read_events(run / EVENTS_FILE))
    built = build_report(str(run), logged)
    rows = dict(report_rows(built, JOB_NAME, attempts))
    assert rows["interruptions"].startswith(f"{stopped} ("), rows["interruptions"]
    assert f"; {stopped} delivered by a drill's emulated market)" in rows["interruptions"]
    assert len(build_timeline(str(run), logged, built).interruptions) == stopped

    board = Dashboard(Catalog([str(workdir)], []))
    (summary,) = [r for r in board.runs_json() if r["job"] == JOB_NAME]
    assert summary["interruptions"] == stopped
    entry = board.catalog.entry(summary["id"])
    assert entry is not None
    tile = re.search(r'<div class="n">(\d+)</div><div class="l">interruptions</div>', board.run_page(entry))
    assert tile is not None and int(tile.group(1)) == stopped
    return stopped


@pytest.mark.e2e
def test_outages_inside_a_window_are_not_counted_again(tmp_path: Path, job: tuple[tuple[str, ...], Path]) -> None:
    command, reference = job
    # One tick per drill second: outages at 1 (capacity back at 2), 3 (back at 4) and 5 (back at 7).
    trace = write_trace(tmp_path / "zone.json", [1, 0, 1, 0, 1, 0, 0] + [1] * 20)
    workdir = tmp_path / "drill"
    config = DrillConfig(
        command=command,
        workdir=workdir,
        reference=reference,
        trace=str(trace),
        trace_start_s=0,
        time_scale=60.0,
        mode="sigterm",
        window_s=10.0,
    )

    def driver(drill: Drill) -> None:
        wait_for(lambda: (workdir / "holding").exists(), "attempt 1 to hold", timeout=120)
        drill.clock.set(1.0)
        drill.wait_events(1)  # SIGTERM: ignored, so the attempt runs on through its window (1 to 11)
        drill.clock.set(5.5)  # two more outages inside the window
        drill.clock.set(11.0)  # the window ends: SIGKILL
        drill.wait_events(3)

    drill = Drill(config)
    report = drill.run(driver)

    assert report.exit_code == 0 and report.final_step_drill == STEPS, drill.lines
    assert (report.interruptions, report.interruptions_idle, report.killed_at_window_end) == (1, 2, 1)
    assert [(m.number, m.interrupted, m.killed) for m in market_events(workdir / "run")] == [
        (1, 1, True),
        (2, None, False),
        (3, None, False),
    ]
    assert check_counts_agree(report, workdir) == 1


@pytest.mark.e2e
def test_kill_kills_at_once_and_counts_each_attempt_killed(tmp_path: Path, job: tuple[tuple[str, ...], Path]) -> None:
    command, reference = job
    # Outages at 1 (capacity back at 2) and 3 (back at 4). The market's clock stops at each outage's instant: a
    # kill that waited for the (long) window would never come.
    trace = write_trace(tmp_path / "zone.json", [1, 0, 1, 0] + [1] * 20)
    workdir = tmp_path / "drill"
    store = workdir / "jobs.sqlite"
    config = DrillConfig(
        command=command,
        workdir=workdir,
        reference=reference,
        trace=str(trace),
        trace_start_s=0,
        time_scale=60.0,
        mode="kill",
        window_s=600.0,
    )

    def driver(drill: Drill) -> None:
        wait_for(lambda: (workdir / "holding").exists(), "attempt 1 to hold", timeout=120)
        drill.clock.set(1.0)
        drill.wait_events(1)
        wait_for(lambda: drill.market.interruptions[0].killed, "the kill")
        drill.clock.set(2.0)  # capacity is back: the supervisor relaunches
        wait_for(lambda: launched(store, after=1), "the next attempt's process", timeout=120)
        drill.clock.set(3.0)  # killed as it starts (most likely before it writes its first event)
        drill.wait_events(2)
        drill.clock.set(4.0)

    drill = Drill(config)
    report = drill.run(driver)

    assert report.exit_code == 0 and report.final_step_drill == STEPS, drill.lines
    assert (report.interruptions, report.interruptions_idle, report.killed_at_window_end) == (2, 0, 2)
    assert any("interruption 1 (kill) of attempt 1: SIGKILL, no warning" in line for line in drill.lines)
    logged = list(read_events(workdir / "run" / EVENTS_FILE))
    # No warning of any kind: no notice, no exit of its own; SIGKILL while the market's clock stood at the outage.
    assert not any(isinstance(e.event, ev.NoticeReceived) for e in logged)
    first = [e for e in logged if e.attempt == 1 and e.event.type not in ev.SUPERVISOR_TYPES]
    assert first and not any(isinstance(e.event, ev.RunExited) for e in first)
    ended = [e.event for e in logged if isinstance(e.event, ev.AttemptEnded) and e.event.exit_class != "no_capacity"]
    assert [(a.exit_code, a.exit_class) for a in ended] == [(-9, "killed"), (-9, "killed"), (0, "succeeded")]
    assert [(m.interrupted, m.killed, m.window_s) for m in market_events(workdir / "run")] == [
        (1, True, 0.0),
        (ended[1].number, True, 0.0),
    ]
    shown = Console(record=True, width=200)
    print_drill(report, shown)
    assert "2 of running attempts (kill: SIGKILL at once, no notice)" in shown.export_text()
    assert check_counts_agree(report, workdir) == 2
