"""``spotsafe run`` against real job subprocesses: success, preemptions, crash loops, progress, restarts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from spotsafe.supervisor.retry import RelaunchPolicy
from spotsafe.supervisor.run import RunConfig, Supervisor
from spotsafe.supervisor.store import JobState, JobStore
from spotsafe.telemetry.log import EVENTS_FILE, read_events

from .conftest import HANG_S, StallClock, running, wait_until

pytestmark = pytest.mark.e2e

JOB = """
import os, signal, sys, time
import torch, spotsafe

mode, steps = sys.argv[1], int(sys.argv[2])
attempt = int(os.environ["SPOTSAFE_ATTEMPT"])
hold = int(os.environ.get("HOLD_AT", "-1"))  # attempt 1 holds after this step until it is told to stop
torch.manual_seed(0)
model = torch.nn.Linear(4, 4)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
ckpt = spotsafe.Checkpointer(model=model, optimizer=opt, policy=spotsafe.every(steps=5), progress_interval=0)
ckpt.restore()
if mode == "usage":
    sys.exit(2)
if mode == "crash-at-start":
    raise RuntimeError("broken before any step")
while ckpt.step < steps:
    opt.zero_grad()
    model(torch.ones(4)).sum().backward()
    opt.step()
    ckpt.step_done()
    time.sleep(0.005)
    if attempt == 1 and ckpt.step == hold:
        open(os.path.join(os.path.dirname(__file__), "held"), "w").close()
        while not ckpt.stop_requested:  # the test, not the machine's speed, decides when this attempt ends
            time.sleep(0.01)
    if mode == "preempt" and attempt <= 3 and ckpt.step == 5 * attempt + 2:
        os.kill(os.getpid(), signal.SIGTERM)  # saves at this step and exits 75
    if mode == "crash-after-progress" and attempt <= 4 and ckpt.step == 10 * attempt + 3:
        raise RuntimeError("a rare crash, after a checkpoint")
    if mode == "hang" and ckpt.step == 3:
        open(os.path.join(os.path.dirname(__file__), f"hung-{os.getpid()}"), "w").close()
        time.sleep(3600)
ckpt.finish()
"""


@pytest.fixture
def job_script(tmp_path: Path) -> Path:
    script = tmp_path / "job.py"
    script.write_text(JOB)
    return script


def supervise(
    tmp_path: Path,
    script: Path,
    mode: str,
    steps: int = 30,
    *,
    clock: Callable[[], float] = time.time,
    **kwargs: object,
) -> tuple[int, JobStore]:
    retry = kwargs.pop("retry", RelaunchPolicy(initial_s=0.05, max_delay_s=0.2))
    config = RunConfig(
        name="job",
        command=(sys.executable, str(script), mode, str(steps)),
        url=str(tmp_path / "run"),
        store=tmp_path / "jobs.sqlite",
        retry=retry,  # type: ignore[arg-type]
        grace_s=kwargs.pop("grace_s", 5.0),  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )
    lines: list[str] = []
    code = Supervisor(config, say=lines.append, output=subprocess.DEVNULL, clock=clock).run()
    return code, JobStore(tmp_path / "jobs.sqlite")


def classes(store: JobStore) -> list[str | None]:
    return [a.exit_class for a in store.attempts("job")]


def test_a_job_that_succeeds_runs_once(tmp_path: Path, job_script: Path) -> None:
    code, store = supervise(tmp_path, job_script, "succeed")
    assert code == 0
    assert classes(store) == ["succeeded"]
    (attempt,) = store.attempts("job")
    assert (attempt.step_before, attempt.step_after, attempt.exit_code) == (None, 30, 0)
    assert attempt.pid is not None and attempt.ended is not None and attempt.ended >= attempt.started
    assert (store.job("job").state, store.job("job").reason) == (JobState.SUCCEEDED, "the job succeeded")
    started = [e for e in read_events(tmp_path / "run" / EVENTS_FILE) if e.event.type == "run_started"]
    assert [(e.run_id, e.attempt, e.pid) for e in started] == [("job", 1, attempt.pid)]


def test_a_job_preempted_three_times_is_resumed_until_it_finishes(tmp_path: Path, job_script: Path) -> None:
    code, store = supervise(tmp_path, job_script, "preempt")
    assert code == 0
    assert classes(store) == ["preempted", "preempted", "preempted", "succeeded"]
    # Each SIGTERM lands after step 5n + 2; the job stops at the next step boundary and saves there.
    assert [(a.step_before, a.step_after) for a in store.attempts("job")] == [(None, 8), (8, 13), (13, 18), (18, 30)]
    logged = read_events(tmp_path / "run" / EVENTS_FILE)
    restored = [e.event.step for e in logged if e.event.type == "restore_completed"]  # type: ignore[attr-defined]
    assert restored == [8, 13, 18]


def test_a_crash_loop_without_progress_stops_after_max_errors(tmp_path: Path, job_script: Path) -> None:
    retry = RelaunchPolicy(max_errors=3, initial_s=0.05, max_delay_s=0.2)
    code, store = supervise(tmp_path, job_script, "crash-at-start", retry=retry)
    assert code == 1
    assert classes(store) == ["crashed"] * 3
    job = store.job("job")
    assert job.state == JobState.FAILED and "3 crashed exits in a row without the checkpoint advancing" in job.reason


def test_rare_crashes_after_progress_do_not_spend_the_error_budget(tmp_path: Path, job_script: Path) -> None:
    retry = RelaunchPolicy(max_errors=1, initial_s=0.05, max_delay_s=0.2)
    code, store = supervise(tmp_path, job_script, "crash-after-progress", steps=60, retry=retry)
    assert code == 0
    assert classes(store) == ["crashed"] * 4 + ["succeeded"]
    assert [a.step_after for a in store.attempts("job")] == [10, 20, 30, 40, 60]


def test_a_usage_error_is_not_retried(tmp_path: Path, job_script: Path) -> None:
    code, store = supervise(tmp_path, job_script, "usage")
    assert code == 2
    assert classes(store) == ["usage"] and store.job("job").state == JobState.FAILED


def test_a_job_without_progress_is_stopped_and_counts_as_an_error(tmp_path: Path, job_script: Path) -> None:
    retry = RelaunchPolicy(max_errors=2, initial_s=0.05, max_delay_s=0.2)

    # The stall clock runs from the launch, and on a busy machine the job may import torch for longer than a short
    # stall timeout (its SIGTERM would then end it before it could ignore it). So the timeout is long, and the
    # supervisor's clock jumps past it once the job hangs (it left a hung-PID file and that process runs).
    def hanging() -> bool:
        return any(running(int(mark.name.removeprefix("hung-"))) for mark in tmp_path.glob("hung-*"))

    clock = StallClock(hanging)
    code, store = supervise(tmp_path, job_script, "hang", retry=retry, stall_timeout_s=HANG_S, grace_s=0.5, clock=clock)
    assert code == 1
    assert classes(store) == ["no_progress", "no_progress"]
    assert [a.exit_code for a in store.attempts("job")] == [-signal.SIGKILL] * 2


def spotsafe_run(
    tmp_path: Path, script: Path, mode: str, steps: int, *, hold_at: int | None = None
) -> subprocess.Popen[str]:
    """``spotsafe run`` of the job; with ``hold_at``, its attempt 1 holds after that step until it gets SIGTERM
    (see :func:`wait_held`)."""
    return subprocess.Popen(
        [
            str(Path(sys.executable).with_name("spotsafe")),
            "run",
            "--name",
            "job",
            "--url",
            str(tmp_path / "run"),
            "--store",
            str(tmp_path / "jobs.sqlite"),
            "--backoff",
            "0.05",
            "--",
            sys.executable,
            str(script),
            mode,
            str(steps),
        ],
        env={**os.environ, **({"HOLD_AT": str(hold_at)} if hold_at is not None else {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_held(tmp_path: Path, proc: subprocess.Popen[str]) -> None:
    """Wait until the job holds after its ``hold_at`` step: a stop now takes effect at the step after it."""

    def held() -> bool:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        return (tmp_path / "held").exists()

    wait_until(held, "the job to hold at its step")


def test_the_supervisor_killed_and_started_again_continues_the_same_job(tmp_path: Path, job_script: Path) -> None:
    first = spotsafe_run(tmp_path, job_script, "succeed", 40, hold_at=20)
    wait_held(tmp_path, first)
    second = spotsafe_run(tmp_path, job_script, "succeed", 40)  # the same job: refused while supervised
    _, err = second.communicate(timeout=HANG_S)
    assert second.returncode == 2 and "already being supervised" in err

    os.kill(first.pid, signal.SIGKILL)  # the supervisor dies; the job gets SIGTERM (parent-death signal)
    first.wait()
    again = spotsafe_run(tmp_path, job_script, "succeed", 40)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    store = JobStore(tmp_path / "jobs.sqlite")
    attempts = store.attempts("job")
    assert [a.exit_class for a in attempts] == ["preempted", "succeeded"]
    assert (attempts[0].step_before, attempts[0].step_after) == (None, 21)  # held at 20, saved at the next step
    assert (attempts[1].step_before, attempts[1].step_after) == (21, 40)
    assert store.job("job").state == JobState.SUCCEEDED
    # Never two copies: the second attempt started after the first one had exited.
    logged = list(read_events(tmp_path / "run" / EVENTS_FILE))
    exited = next(e.event.time for e in logged if e.event.type == "run_exited" and e.pid == attempts[0].pid)
    started = next(e.event.time for e in logged if e.event.type == "run_started" and e.pid == attempts[1].pid)
    assert exited <= started


def test_sigterm_to_the_supervisor_stops_the_job_cleanly_and_a_rerun_finishes_it(
    tmp_path: Path, job_script: Path
) -> None:
    first = spotsafe_run(tmp_path, job_script, "succeed", 40, hold_at=10)
    wait_held(tmp_path, first)
    os.kill(first.pid, signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 75, err
    store = JobStore(tmp_path / "jobs.sqlite")
    assert store.job("job").state == JobState.STOPPED
    assert [(a.exit_class, a.step_after) for a in store.attempts("job")] == [("preempted", 11)]
    rerun = spotsafe_run(tmp_path, job_script, "succeed", 40)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert [a.exit_class for a in store.attempts("job")] == ["preempted", "succeeded"]
