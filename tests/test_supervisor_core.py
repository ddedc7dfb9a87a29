"""The supervisor's parts: exit classes, retry budgets and backoff, the SQLite job store and its lock."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spotsafe.errors import ConfigError
from spotsafe.supervisor.classify import ExitClass, classify, oom_kill_counter
from spotsafe.supervisor.retry import RelaunchBudget, RelaunchPolicy
from spotsafe.supervisor.store import JobBusyError, JobState, JobStore

# -- exit classes ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "oom", "stalled", "expected"),
    [
        (0, 0, False, ExitClass.SUCCEEDED),
        (75, 0, False, ExitClass.PREEMPTED),
        (2, 0, False, ExitClass.USAGE),
        (1, 0, False, ExitClass.CRASHED),
        (-signal.SIGSEGV, 0, False, ExitClass.CRASHED),
        (-signal.SIGKILL, 0, False, ExitClass.KILLED),
        (137, 0, False, ExitClass.KILLED),
        (-signal.SIGKILL, 1, False, ExitClass.OUT_OF_MEMORY),
        (137, 2, False, ExitClass.OUT_OF_MEMORY),
        (-signal.SIGTERM, 0, False, ExitClass.KILLED),
        (75, 0, True, ExitClass.NO_PROGRESS),
        (-signal.SIGKILL, 0, True, ExitClass.NO_PROGRESS),
    ],
)
def test_exit_classes(code: int, oom: int, stalled: bool, expected: ExitClass) -> None:
    assert classify(code, oom_kills=oom, stalled=stalled) is expected


def test_which_budget_each_class_uses() -> None:
    assert {c for c in ExitClass if c.is_preemption} == {ExitClass.PREEMPTED, ExitClass.KILLED}
    assert {c for c in ExitClass if c.is_error} == {ExitClass.OUT_OF_MEMORY, ExitClass.NO_PROGRESS, ExitClass.CRASHED}


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_oom_kill_counter_reads_the_memory_cgroup(tmp_path: Path, version: str) -> None:
    proc = tmp_path / "cgroup"
    if version == "v2":
        proc.write_text("0::/job.slice/x\n")
        events = tmp_path / "fs" / "job.slice" / "x" / "memory.events"
        line = "low 0\nhigh 0\nmax 3\noom 2\noom_kill {}\n"
    else:
        proc.write_text("9:name=systemd:/\n4:memory:/docker/abc\n3:cpuset:/\n")
        events = tmp_path / "fs" / "memory" / "docker" / "abc" / "memory.oom_control"
        line = "oom_kill_disable 0\nunder_oom 0\noom_kill {}\n"
    events.parent.mkdir(parents=True)
    events.write_text(line.format(0))
    read = oom_kill_counter(str(proc), str(tmp_path / "fs"))
    assert read() == 0
    events.write_text(line.format(5))
    assert read() == 5


def test_oom_kill_counter_is_zero_where_the_system_does_not_say(tmp_path: Path) -> None:
    assert oom_kill_counter(str(tmp_path / "missing"), str(tmp_path))() == 0
    (tmp_path / "cgroup").write_text("0::/\n")
    assert oom_kill_counter(str(tmp_path / "cgroup"), str(tmp_path / "nothing"))() == 0


# -- budgets and backoff ---------------------------------------------------------------------------------------------


def run(budget: RelaunchBudget, *attempts: tuple[ExitClass, bool], seed: int = 0) -> list[tuple[bool, float, str]]:
    rng = random.Random(seed)
    out = []
    for exit_class, progressed in attempts:
        verdict = budget.after(exit_class, progressed=progressed, rng=rng)
        out.append((verdict.relaunch, verdict.delay_s, verdict.reason))
    return out


def test_a_crash_loop_without_progress_stops_after_max_errors() -> None:
    verdicts = run(RelaunchBudget(RelaunchPolicy(max_errors=3)), *[(ExitClass.CRASHED, False)] * 3)
    assert [v[0] for v in verdicts] == [True, True, False]
    assert "3 crashed exits in a row without the checkpoint advancing (max_errors=3)" in verdicts[-1][2]


def test_a_job_that_crashes_rarely_but_makes_progress_keeps_going() -> None:
    history = [(ExitClass.CRASHED, True), (ExitClass.OUT_OF_MEMORY, True)] * 20
    verdicts = run(RelaunchBudget(RelaunchPolicy(max_errors=1)), *history)
    assert all(v[0] for v in verdicts)
    assert all(v[1] == 0.0 for v in verdicts), "after progress the relaunch is immediate"
    # Progress resets the count: two errors without progress after progress stop a max_errors=2 job only then.
    verdicts = run(
        RelaunchBudget(RelaunchPolicy(max_errors=2)),
        (ExitClass.CRASHED, False),
        (ExitClass.CRASHED, True),
        (ExitClass.CRASHED, False),
        (ExitClass.NO_PROGRESS, False),
    )
    assert [v[0] for v in verdicts] == [True, True, True, False]


def test_preemptions_have_their_own_budget_and_do_not_spend_the_error_budget() -> None:
    budget = RelaunchBudget(RelaunchPolicy(max_preemptions=3, max_errors=1))
    verdicts = run(budget, *[(ExitClass.PREEMPTED, False)] * 3, (ExitClass.KILLED, True))
    assert [v[0] for v in verdicts] == [True, True, True, False]
    assert verdicts[-1][2] == "preemption budget spent (3 preemptions)"
    assert budget.errors_in_a_row == 0


def test_success_and_usage_errors_end_the_job() -> None:
    assert run(RelaunchBudget(RelaunchPolicy()), (ExitClass.SUCCEEDED, True))[0][:2] == (False, 0.0)
    [(relaunch, _, reason)] = run(RelaunchBudget(RelaunchPolicy()), (ExitClass.USAGE, False))
    assert not relaunch and "retrying cannot help" in reason


def test_backoff_is_exponential_with_full_jitter_and_capped() -> None:
    policy = RelaunchPolicy(initial_s=1.0, max_delay_s=10.0)
    rng = random.Random(7)
    for failures, cap in ((1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0), (40, 10.0)):
        delays = [policy.backoff.delay(failures, rng) for _ in range(300)]
        assert all(0.0 <= d <= cap for d in delays)
        assert max(delays) > 0.8 * cap and min(delays) < 0.2 * cap  # spread over the whole range
    assert policy.backoff.delay(0, rng) == 0.0
    # Failures without progress grow the delay; the bound doubles per failure in a row.
    verdicts = run(
        RelaunchBudget(RelaunchPolicy(max_errors=10, initial_s=1.0, max_delay_s=1e9)), *[(ExitClass.CRASHED, False)] * 6
    )
    assert all(v[1] <= 2 ** (i) for i, v in enumerate(verdicts))


def test_budgets_replay_from_history() -> None:
    policy = RelaunchPolicy(max_errors=3, max_preemptions=5)
    history = [(ExitClass.PREEMPTED, True), (ExitClass.CRASHED, False), (ExitClass.CRASHED, False)]
    budget = RelaunchBudget.replay(policy, history)
    assert (budget.preemptions, budget.errors_in_a_row) == (1, 2)
    verdict = budget.after(ExitClass.CRASHED, progressed=False, rng=random.Random(0))
    assert not verdict.relaunch, "the third error in a row across a supervisor restart still ends the job"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_errors": -1},
        {"max_preemptions": 1.5},
        {"max_errors": True},
        {"initial_s": -1},
        {"max_delay_s": float("inf")},
    ],
)
def test_bad_retry_settings_are_config_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        RelaunchPolicy(**kwargs)  # type: ignore[arg-type]


# -- the job store ---------------------------------------------------------------------------------------------------


def test_jobs_and_attempts_survive_reopening(tmp_path: Path) -> None:
    db = tmp_path / "jobs.sqlite"
    with JobStore(db) as store:
        job = store.open_job("lm", ["python", "train.py"], "runs/lm")
        assert (job.state, job.command, job.url) == (JobState.RUNNING, ["python", "train.py"], "runs/lm")
        first = store.start_attempt("lm", step_before=None)
        store.set_pid("lm", first, 4242)
        store.end_attempt("lm", first, exit_code=75, exit_class="preempted", step_after=40, cost=0.12)
        second = store.start_attempt("lm", step_before=40, pool="spot-a")
    assert (first, second) == (1, 2)
    with JobStore(db) as store:
        attempts = store.attempts("lm")
        assert [(a.number, a.pid, a.exit_code, a.exit_class, a.step_before, a.step_after) for a in attempts] == [
            (1, 4242, 75, "preempted", None, 40),
            (2, None, None, None, 40, None),
        ]
        assert attempts[1].pool == "spot-a" and attempts[0].cost == pytest.approx(0.12)
        assert [a.number for a in store.unfinished("lm")] == [2]
        store.finish_job("lm", JobState.SUCCEEDED, "the job succeeded")
        assert (store.job("lm").state, store.job("lm").reason) == (JobState.SUCCEEDED, "the job succeeded")
        # Opening it again (a new supervisor for the same job) keeps the attempts and numbering.
        store.open_job("lm", ["python", "train.py"], "runs/lm")
        assert store.job("lm").state == JobState.RUNNING
        assert store.start_attempt("lm", step_before=80) == 3


def test_a_job_name_cannot_be_reused_for_another_command(tmp_path: Path) -> None:
    with JobStore(tmp_path / "jobs.sqlite") as store:
        store.open_job("lm", ["python", "a.py"], "runs/lm")
        with pytest.raises(ConfigError, match="use another --name"):
            store.open_job("lm", ["python", "b.py"], "runs/lm")
        with pytest.raises(ConfigError, match="use another --name"):
            store.open_job("lm", ["python", "a.py"], "runs/other")
        with pytest.raises(ConfigError, match="no job named"):
            store.job("missing")
        with pytest.raises(ValueError, match="not 'running'"):
            store.finish_job("lm", JobState.RUNNING, "")
        store.finish_job("lm", JobState.FAILED, "budget spent")
        assert [j.name for j in store.jobs()] == ["lm"]


HOLD = """
import sys, time
from spotsafe.supervisor.store import JobStore
store = JobStore(sys.argv[1])
claim = store.claim(sys.argv[2])
print("held", flush=True)
time.sleep(60)
"""


def test_only_one_supervisor_holds_a_job_and_a_dead_holder_releases_it(tmp_path: Path) -> None:
    db = tmp_path / "jobs.sqlite"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(db), "lm"], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with JobStore(db) as store:
            with pytest.raises(JobBusyError, match=f"pid {holder.pid}"):
                store.claim("lm")
            other = store.claim("another-job")  # other jobs are free
            other.release()
            os.kill(holder.pid, signal.SIGKILL)  # the supervisor dies without cleaning up
            holder.wait()
            deadline = time.monotonic() + 10
            while True:
                try:
                    claim = store.claim("lm")
                    break
                except JobBusyError:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            with pytest.raises(JobBusyError):
                JobStore(db).claim("lm")  # a second claim, even from this process, is refused
            claim.release()
            store.claim("lm").release()
    finally:
        if holder.poll() is None:
            holder.kill()
