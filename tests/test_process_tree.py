"""A signal to a job's group reaches every process below it, also those in sessions of their own.

torchrun starts each rank in a session of its own (``start_new_session``); before, the supervisor's SIGKILL of a
"lost machine" killed torchrun and left its ranks training on, orphaned, beside the next attempt. Here a real
launcher does the same: it starts a "rank" in its own session, which starts a "data-loader worker" in its group.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from spotsafe.supervisor.attempt import stop_session
from spotsafe.supervisor.process import Job, launch

from .conftest import PROCESS_HANG_S, running, wait_until

WORKER = "import time; time.sleep(600)"
RANK = f"""
import json, os, subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", {WORKER!r}])
with open(sys.argv[1] + ".tmp", "w") as out:
    json.dump({{"rank": os.getpid(), "worker": worker.pid}}, out)
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(600)
"""
LAUNCHER = f"""
import signal, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", {RANK!r}, sys.argv[1]], start_new_session=True)
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a launcher that outlives the grace period (the rank does not)
time.sleep(600)
"""


def started(tmp_path: Path) -> tuple[Job, list[int]]:
    """The launcher as the supervisor starts a job, once its rank and worker run: the job and all three pids."""
    pids = tmp_path / "pids.json"
    job = launch([sys.executable, "-c", LAUNCHER, str(pids)])
    wait_until(pids.exists, "the rank to start its worker", timeout=PROCESS_HANG_S)
    below = json.loads(pids.read_text())
    return job, [job.pid, below["rank"], below["worker"]]


def all_ended(job: Job, pids: list[int]) -> None:
    wait_until(lambda: job.poll() is not None, "the launcher to end", timeout=PROCESS_HANG_S)
    wait_until(lambda: not any(running(p) for p in pids), f"all of {pids} to end", timeout=PROCESS_HANG_S)


@pytest.mark.parametrize(
    "kill",
    [
        pytest.param(lambda job: job.signal(signal.SIGKILL, group=True), id="signal-group"),
        pytest.param(lambda job: job.reap_group(), id="reap-group"),
        pytest.param(lambda job: stop_session(job.pid, 0.0, time.sleep), id="stop-session"),
    ],
)
def test_killing_a_job_kills_what_it_started_in_other_sessions(tmp_path: Path, kill: Callable[[Job], None]) -> None:
    job, pids = started(tmp_path)
    try:
        assert all(running(p) for p in pids)
        kill(job)
        all_ended(job, pids)
    finally:
        for pid in pids:  # a failed test must not leave them running
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        job.poll()


def test_a_group_sigterm_reaches_the_rank_and_its_worker(tmp_path: Path) -> None:
    """A machine that shuts down signals every process (the rank saves; the launcher here ignores it)."""
    job, pids = started(tmp_path)
    try:
        job.signal(signal.SIGTERM, group=True)
        wait_until(lambda: not running(pids[1]) and not running(pids[2]), "the rank and worker to end")
        assert running(pids[0])  # the launcher ignores SIGTERM: it was signalled, not killed
    finally:
        job.reap_group()
        all_ended(job, pids)
