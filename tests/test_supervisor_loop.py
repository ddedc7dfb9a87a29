"""The one relaunch loop: what every attempt receives, the stop_after seam, handles judged before relaunch,
and the reference runs and chaos runs that go through it."""

from __future__ import annotations

import json
import random
import sys
import threading
from pathlib import Path

import pytest

from spotsafe.errors import ConfigError
from spotsafe.jobenv import JobEnv
from spotsafe.supervisor.attempt import CheckedHandle, attempt_env
from spotsafe.supervisor.chaos import ChaosLauncher, KillMode
from spotsafe.supervisor.config import RunConfig, events_file
from spotsafe.supervisor.reference import run_reference
from spotsafe.supervisor.retry import RelaunchPolicy
from spotsafe.supervisor.run import Supervisor
from spotsafe.supervisor.store import JobState, JobStore

DUMP_ENV = (
    "import json, os, sys; "
    "json.dump({k: v for k, v in os.environ.items() if k.startswith('SPOTSAFE_')}, "
    "open(sys.argv[1] + '.' + os.environ['SPOTSAFE_ATTEMPT'], 'w')); "
    "sys.exit(int(sys.argv[2]) if os.environ['SPOTSAFE_ATTEMPT'] == '1' else 0)"
)


def quiet(line: str) -> None:
    pass


def test_attempt_env_is_the_job_contract(tmp_path: Path) -> None:
    env = attempt_env(url="s3://b/runs/lm", job="lm", number=4, store=tmp_path / "j.sqlite", pool="p", events_file=None)
    assert JobEnv.from_env(env) == JobEnv(
        checkpoint_url="s3://b/runs/lm", run_id="lm", attempt=4, job_store=str(tmp_path / "j.sqlite"), pool="p"
    )
    spool = tmp_path / "spool.jsonl"
    env = attempt_env(url="s3://b/r", job="r", number=1, store=tmp_path / "j.sqlite", pool="p", events_file=spool)
    assert JobEnv.from_env(env).events_file == str(spool)


def test_every_attempt_receives_the_contract_through_the_loop(tmp_path: Path) -> None:
    dump = tmp_path / "env"
    config = RunConfig(
        name="envjob",
        command=(sys.executable, "-c", DUMP_ENV, str(dump), "75"),
        url=str(tmp_path / "run"),
        store=tmp_path / "jobs.sqlite",
        retry=RelaunchPolicy(initial_s=0.0, max_delay_s=0.0),
    )
    assert Supervisor(config, say=quiet).run() == 0
    for number in (1, 2):
        seen = JobEnv.from_env(json.loads(Path(f"{dump}.{number}").read_text(encoding="utf-8")))
        given = (seen.checkpoint_url, seen.run_id, seen.attempt, seen.job_store, seen.pool, seen.events_file)
        assert given == (str(tmp_path / "run"), "envjob", number, str(tmp_path / "jobs.sqlite"), "local", None)


def test_stop_after_ends_the_job_where_the_budget_would_relaunch(tmp_path: Path) -> None:
    asked: list[int] = []

    def stop_after(number: int) -> str | None:
        asked.append(number)
        return "two attempts are enough" if number >= 2 else None

    config = RunConfig(
        name="crashy",
        command=(sys.executable, "-c", "raise SystemExit(3)"),
        url=str(tmp_path / "run"),
        store=tmp_path / "jobs.sqlite",
        retry=RelaunchPolicy(max_errors=10, initial_s=0.0, max_delay_s=0.0),
    )
    assert Supervisor(config, say=quiet, stop_after=stop_after).run() == 1
    assert asked == [1, 2]
    with JobStore(tmp_path / "jobs.sqlite") as store:
        job = store.job("crashy")
        assert (job.state, job.reason) == (JobState.FAILED, "two attempts are enough")
        assert [a.exit_code for a in store.attempts("crashy")] == [3, 3]


def test_stop_after_is_not_asked_when_the_job_succeeds(tmp_path: Path) -> None:
    config = RunConfig(
        name="ok", command=(sys.executable, "-c", "pass"), url=str(tmp_path / "run"), store=tmp_path / "jobs.sqlite"
    )

    def never(number: int) -> str | None:
        raise AssertionError("asked after a success")

    assert Supervisor(config, say=quiet, stop_after=never).run() == 0


def test_a_reference_run_has_one_attempt_and_reports_the_jobs_exit(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"the reference run failed \(exit 75\)"):
        run_reference((sys.executable, "-c", "raise SystemExit(75)"), tmp_path / "ref")
    assert not (tmp_path / "ref" / "events.jsonl").exists(), "the supervisor's events stay out of the reference"
    seconds = run_reference((sys.executable, "-c", "import time; time.sleep(0.2)"), tmp_path / "ok")
    assert 0.2 <= seconds < 60


class _Exited:
    pid: int | None = 123
    machine: str | None = "here"

    def __init__(self) -> None:
        self.signals: list[tuple[int, bool]] = []
        self.reaped = 0

    def poll(self) -> int | None:
        return 75

    def signal(self, sig: int, *, group: bool = False) -> None:
        self.signals.append((sig, group))

    def reap_group(self) -> None:
        self.reaped += 1

    def no_capacity(self, code: int) -> bool:
        return code == 99


def test_a_checked_handle_shows_the_exit_only_once_judged() -> None:
    inner = _Exited()
    release = threading.Event()

    def judge() -> None:
        release.wait(30)

    handle = CheckedHandle(inner, judge)
    assert handle.poll() is None  # exited, not judged yet
    handle.signal(15, group=True)
    handle.reap_group()
    assert (inner.signals, inner.reaped) == ([(15, True)], 1)
    assert (handle.pid, handle.machine, handle.no_capacity(99), handle.no_capacity(1)) == (123, "here", True, False)
    release.set()
    for _ in range(3000):
        if handle.poll() is not None:
            break
        threading.Event().wait(0.01)
    assert handle.poll() == 75


def test_a_checked_handle_raises_what_its_judge_raised() -> None:
    def judge() -> None:
        raise OSError("the repository could not be listed")

    handle = CheckedHandle(_Exited(), judge)
    with pytest.raises(OSError, match="could not be listed"):
        for _ in range(3000):
            handle.poll()
            threading.Event().wait(0.01)


def test_the_chaos_launcher_ends_the_run_after_its_attempt_limit(tmp_path: Path) -> None:
    launcher = ChaosLauncher(
        [KillMode.SIGTERM],
        url=str(tmp_path / "run"),
        events_file=tmp_path / "run" / "events.jsonl",
        max_attempts=4,
        rng=random.Random(0),
    )
    assert launcher.env() == {}
    assert [launcher.stop_after(n) for n in (1, 2, 3)] == [None, None, None]
    assert launcher.stop_after(4) == "gave up after 4 attempts"
    assert launcher.result.problems == ["gave up after 4 attempts"]


def test_an_events_file_is_for_a_run_on_object_storage(tmp_path: Path) -> None:
    spool = tmp_path / "spool.jsonl"
    with pytest.raises(ConfigError, match="events_file is for object storage"):
        RunConfig(name="j", command=("x",), url=str(tmp_path / "run"), store=tmp_path / "s", events_file=spool)
    remote = RunConfig(name="j", command=("x",), url="s3://b/run", store=tmp_path / "s.sqlite", events_file=spool)
    assert events_file(remote) == spool
    default = RunConfig(name="j", command=("x",), url="s3://b/run", store=tmp_path / "s.sqlite")
    assert events_file(default) == tmp_path / "s.sqlite.j.events.jsonl"
