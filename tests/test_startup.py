"""Start-up protection: a stop that arrives before the Checkpointer is ready is held, handed over, and ends the
job with 75 having saved nothing new; ``import spotsafe`` is cheap enough to come before the heavy imports.

The jobs are real subprocesses and the stops real signals. A job "in start-up" waits for a ``go`` file that the
test writes once it has sent the signal, standing in for 5-20 s of framework imports and set-up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from spotsafe.exit_codes import EXIT_PREEMPTED
from spotsafe.startup import DEFAULT_SIGNALS, StartupGuard
from spotsafe.storage.registry import open_storage
from spotsafe.storage.repository import CheckpointRepository
from spotsafe.supervisor.classify import ExitClass, classify
from spotsafe.supervisor.retry import RelaunchBudget, RelaunchPolicy
from spotsafe.supervisor.store import JobStore
from spotsafe.telemetry.log import EVENTS_FILE, LoggedEvent, read_events

from .conftest import PROCESS_HANG_S, wait_until

JOB = """
import json, os, signal, sys, time
here = os.path.dirname(os.path.abspath(__file__))
if os.environ.get("PROTECT") == "1":
    import spotsafe
    spotsafe.protect_startup()            # the one early line
    assert "torch" not in sys.modules
with open(os.path.join(here, "ready.tmp"), "w") as f:
    f.write(str(os.getpid()))
os.replace(os.path.join(here, "ready.tmp"), os.path.join(here, "ready"))
while not os.path.exists(os.path.join(here, "go")):  # the slow imports and set-up; the test says when they end
    time.sleep(0.01)
import torch, spotsafe
torch.manual_seed(0)
model = torch.nn.Linear(4, 4)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
ckpt = spotsafe.Checkpointer(model=model, optimizer=opt, policy=spotsafe.every(steps=5), progress_interval=0)
ckpt.restore()
while ckpt.step < int(sys.argv[1]):
    opt.zero_grad()
    model(torch.ones(4)).sum().backward()
    opt.step()
    ckpt.step_done()
ckpt.finish()
handlers = {s.name: repr(signal.getsignal(s)) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
with open(os.path.join(here, "handlers.json"), "w") as f:
    json.dump(handlers, f)
"""

UNPROTECTED_HANDLERS = {
    "SIGTERM": repr(signal.SIG_DFL),
    "SIGINT": repr(signal.default_int_handler),
    "SIGUSR1": repr(signal.SIG_DFL),
}


@pytest.fixture
def job(tmp_path: Path) -> Path:
    script = tmp_path / "job.py"
    script.write_text(JOB)
    return script


def start(script: Path, run: Path, steps: int, *, protect: bool) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SPOTSAFE_CHECKPOINT_URL": str(run), "PROTECT": "1" if protect else "0"}
    with open(script.parent / "stderr.txt", "ab") as err:
        return subprocess.Popen(
            [sys.executable, str(script), str(steps)], env=env, stdout=subprocess.DEVNULL, stderr=err
        )


def signal_in_startup(script: Path, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Wait until the job is in its start-up (it wrote ``ready``), send ``sig``, then let the start-up end."""
    ready = script.parent / "ready"

    def is_ready() -> bool:
        assert proc.poll() is None, f"the job ended before its start-up: {proc.returncode}"
        return ready.exists()

    wait_until(is_ready, "the job to start")
    os.kill(int(ready.read_text()), sig)
    (script.parent / "go").touch()


def events(run: Path, attempt: int | None = None) -> list[LoggedEvent]:
    return [e for e in read_events(run / EVENTS_FILE) if attempt is None or e.attempt == attempt]


def types(logged: list[LoggedEvent]) -> list[str]:
    return [e.event.type for e in logged]


def committed(run: Path) -> list[str]:
    return sorted(ref.name for ref in CheckpointRepository(open_storage(str(run))).committed())


def one(logged: list[LoggedEvent], kind: str) -> Any:
    (found,) = [e.event for e in logged if e.event.type == kind]
    return found


# -- import spotsafe is cheap ---------------------------------------------------------------------------------------


def test_import_spotsafe_does_not_import_torch_and_every_public_name_works() -> None:
    code = (
        "import sys, spotsafe\n"
        "spotsafe.protect_startup()\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'urllib3'))\n"
        "assert not heavy, heavy\n"
        "from spotsafe import Checkpointer, ResumableLoader, every, protect_startup\n"
        "assert 'torch' in sys.modules\n"
        "missing = [n for n in spotsafe.__all__ if getattr(spotsafe, n, None) is None]\n"
        "assert not missing, missing\n"
        "assert set(spotsafe.__all__) <= set(dir(spotsafe))\n"
        "from spotsafe.engine.checkpointer import Checkpointer as Real\n"
        "assert Checkpointer is Real and spotsafe.Checkpointer is Real\n"
        "try:\n"
        "    spotsafe.NoSuchThing\n"
        "except AttributeError as err:\n"
        "    assert 'NoSuchThing' in str(err)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=PROCESS_HANG_S)
    assert done.returncode == 0, done.stderr


# -- the job: held, handed over, exit 75 with nothing new -----------------------------------------------------------


def test_a_sigterm_during_startup_ends_the_job_with_75_and_no_checkpoint(tmp_path: Path, job: Path) -> None:
    run = tmp_path / "run"
    proc = start(job, run, 20, protect=True)
    signal_in_startup(job, proc)
    assert proc.wait(timeout=PROCESS_HANG_S) == EXIT_PREEMPTED
    # Interrupted in its very first start-up, the job had nothing to save: it saved nothing.
    assert committed(run) == []
    logged = events(run)
    assert "save_started" not in types(logged)
    notice = one(logged, "notice_received")
    assert (notice.source, notice.kind, notice.step) == ("SIGTERM", "stop", 0)
    planned = one(logged, "emergency_planned")
    assert (planned.choice, planned.step, planned.reason) == ("already-saved", 0, "nothing trained yet")
    exited = one(logged, "run_exited")
    assert (exited.reason, exited.step, exited.exit_code) == ("preempted", 0, EXIT_PREEMPTED)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "SIGTERM during start-up: held until the checkpointer is ready" in stderr


def test_a_stop_during_startup_after_earlier_checkpoints_resumes_nothing_new(tmp_path: Path, job: Path) -> None:
    run = tmp_path / "run"
    (tmp_path / "go").touch()
    first = start(job, run, 12, protect=False)
    assert first.wait(timeout=PROCESS_HANG_S) == 0
    before = committed(run)
    assert before  # steps 5, 10 and the final 12
    (tmp_path / "go").unlink()
    (tmp_path / "ready").unlink()

    second = start(job, run, 30, protect=True)
    signal_in_startup(job, second)
    assert second.wait(timeout=PROCESS_HANG_S) == EXIT_PREEMPTED
    assert committed(run) == before  # nothing new, nothing removed
    logged = events(run, attempt=2)
    assert not [t for t in types(logged) if t.startswith("save_")]
    assert one(logged, "restore_completed").step == 12
    assert (one(logged, "notice_received").step, one(logged, "emergency_planned").choice) == (12, "already-saved")
    exited = one(logged, "run_exited")
    assert (exited.reason, exited.step, exited.exit_code) == ("preempted", 12, EXIT_PREEMPTED)


def test_without_the_early_line_the_same_sigterm_kills_the_job(tmp_path: Path, job: Path) -> None:
    """Why the line matters: before the Checkpointer installs its handlers, SIGTERM's default action ends the
    process at once (the supervisor then sees -15: killed, counted as a preemption, and no event says why)."""
    run = tmp_path / "run"
    proc = start(job, run, 20, protect=False)
    signal_in_startup(job, proc)
    assert proc.wait(timeout=PROCESS_HANG_S) == -signal.SIGTERM
    assert not (run / EVENTS_FILE).exists()


# -- a stop that no Checkpointer takes is not swallowed ---------------------------------------------------------------

NO_CHECKPOINTER = """
import os, sys, time
import spotsafe
spotsafe.protect_startup(exit_after_s={exit_after_s})
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "ready.tmp"), "w") as f:
    f.write(str(os.getpid()))
os.replace(os.path.join(here, "ready.tmp"), os.path.join(here, "ready"))
while not os.path.exists(os.path.join(here, "go")):
    time.sleep(0.01)
if sys.argv[1] == "crash":
    raise RuntimeError("the set-up failed")
while True:  # a set-up that never creates a Checkpointer
    time.sleep(0.01)
"""


@pytest.mark.parametrize(
    ("mode", "exit_after_s", "why"),
    [
        ("crash", "None", "the process ended before a checkpointer took it"),
        ("hang", "0.5", "no checkpointer took it within 0.5 s"),
    ],
)
def test_a_held_stop_that_no_checkpointer_takes_still_ends_the_job_with_75(
    tmp_path: Path, mode: str, exit_after_s: str, why: str
) -> None:
    script = tmp_path / "setup.py"
    script.write_text(NO_CHECKPOINTER.format(exit_after_s=exit_after_s))
    with open(tmp_path / "stderr.txt", "wb") as err:
        proc = subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.DEVNULL, stderr=err)
    signal_in_startup(script, proc)
    assert proc.wait(timeout=PROCESS_HANG_S) == EXIT_PREEMPTED
    stderr = (tmp_path / "stderr.txt").read_text()
    assert f"SIGTERM arrived during start-up and {why}: exiting with 75" in stderr
    assert ("RuntimeError: the set-up failed" in stderr) == (mode == "crash")


def test_ctrl_c_twice_during_startup_stops_at_once(tmp_path: Path) -> None:
    script = tmp_path / "setup.py"
    script.write_text(NO_CHECKPOINTER.format(exit_after_s="None"))
    with open(tmp_path / "stderr.txt", "wb") as err:
        proc = subprocess.Popen([sys.executable, str(script), "hang"], stdout=subprocess.DEVNULL, stderr=err)
    ready = tmp_path / "ready"
    wait_until(lambda: ready.exists() or proc.poll() is not None, "the job to start")
    os.kill(proc.pid, signal.SIGINT)
    wait_until(lambda: "Ctrl-C again" in (tmp_path / "stderr.txt").read_text(), "the first Ctrl-C to be held")
    os.kill(proc.pid, signal.SIGINT)
    # Ctrl-C again (and again, as a user would, should the machine swallow one): each one after the first stops it.
    deadline = time.monotonic() + PROCESS_HANG_S
    while True:
        try:
            code = proc.wait(timeout=5)
            break
        except subprocess.TimeoutExpired:
            assert time.monotonic() < deadline, "the job did not stop on Ctrl-C"
            os.kill(proc.pid, signal.SIGINT)
    assert code == EXIT_PREEMPTED
    assert "KeyboardInterrupt" in (tmp_path / "stderr.txt").read_text()


# -- the supervisor: relaunched, counted as a preemption ------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize(("protect", "first_exit", "first_class"), [(True, 75, "preempted"), (False, -15, "killed")])
def test_a_job_stopped_in_startup_under_spotsafe_run_is_relaunched_as_a_preemption(
    tmp_path: Path, job: Path, protect: bool, first_exit: int, first_class: str
) -> None:
    command = [str(Path(sys.executable).with_name("spotsafe")), "run", "--name", "job", "--url", str(tmp_path / "run")]
    command += ["--store", str(tmp_path / "jobs.sqlite"), "--backoff", "0.05", "--", sys.executable, str(job), "12"]
    env = {**os.environ, "PROTECT": "1" if protect else "0"}
    supervisor = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        signal_in_startup(job, supervisor)  # the stop comes from outside (the machine), straight to the job
        assert supervisor.wait(timeout=PROCESS_HANG_S) == 0
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
    attempts = JobStore(tmp_path / "jobs.sqlite").attempts("job")
    assert [(a.exit_code, a.exit_class) for a in attempts] == [(first_exit, first_class), (0, "succeeded")]
    assert [(a.step_before, a.step_after) for a in attempts] == [(None, None), (None, 12)]
    history = [(ExitClass(a.exit_class), False) for a in attempts[:1] if a.exit_class]
    budget = RelaunchBudget.replay(RelaunchPolicy(), history)
    assert (budget.preemptions, budget.errors_in_a_row) == (1, 0)
    # Once the Checkpointer is closed, the handlers are the ones from before protect_startup().
    assert json.loads((tmp_path / "handlers.json").read_text()) == UNPROTECTED_HANDLERS


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (EXIT_PREEMPTED, ExitClass.PREEMPTED),
        (-signal.SIGTERM, ExitClass.KILLED),
        (-signal.SIGUSR1, ExitClass.KILLED),
        (128 + signal.SIGTERM, ExitClass.KILLED),
        (128 + signal.SIGINT, ExitClass.KILLED),
        (128 + signal.SIGHUP, ExitClass.KILLED),
        (128 + signal.SIGSEGV, ExitClass.CRASHED),
        (-signal.SIGABRT, ExitClass.CRASHED),
    ],
)
def test_stops_from_outside_count_as_preemptions(code: int, expected: ExitClass) -> None:
    assert classify(code) is expected
    assert classify(code).is_preemption == (expected is not ExitClass.CRASHED)


# -- the guard's own rules, with injected signal installation --------------------------------------------------------


class FakeSignals:
    def __init__(self) -> None:
        self.table: dict[int, Any] = {int(s): signal.SIG_DFL for s in DEFAULT_SIGNALS}
        self.table[signal.SIGINT] = signal.default_int_handler

    def install(self, sig: int, handler: Any) -> Any:
        previous, self.table[int(sig)] = self.table.get(int(sig)), handler
        return previous

    def get(self, sig: int) -> Any:
        return self.table.get(int(sig))

    def guard(self, exits: list[int] | None = None) -> StartupGuard:
        hooks: list[Callable[[], None]] = []
        return StartupGuard(
            install=self.install,
            getsignal=self.get,
            exit=(exits if exits is not None else []).append,
            write=lambda text: None,
            at_exit=hooks.append,
        )


def test_the_guard_holds_stops_and_hands_them_over_once() -> None:
    fake = FakeSignals()
    before = dict(fake.table)
    guard = fake.guard()
    assert guard.protect(exit_after_s=None) and guard.armed
    assert guard.protect(exit_after_s=None)  # idempotent
    assert all(guard.is_handler(h) for h in fake.table.values())
    guard._handle(signal.SIGTERM, None)
    guard._handle(signal.SIGUSR1, None)
    assert [s.name for s in guard.pending()] == ["SIGTERM", "SIGUSR1"]
    stops = guard.take()
    assert [s.name for s in stops] == ["SIGTERM", "SIGUSR1"] and not guard.armed
    assert fake.table == before  # the handlers from before are back
    assert guard.take() == []


def test_a_signal_the_process_ignores_stays_ignored() -> None:
    """``cmd &`` in a shell script starts the job with SIGINT ignored: the guard leaves it so."""
    fake = FakeSignals()
    fake.table[signal.SIGINT] = signal.SIG_IGN
    guard = fake.guard()
    assert guard.protect(exit_after_s=None)
    assert fake.table[signal.SIGINT] == signal.SIG_IGN and guard.is_handler(fake.table[signal.SIGTERM])
    assert signal.SIGINT not in guard.signals
    guard.take()
    assert fake.table[signal.SIGINT] == signal.SIG_IGN and fake.table[signal.SIGTERM] == signal.SIG_DFL


def test_the_guard_is_main_thread_only() -> None:
    guard = FakeSignals().guard()
    errors: list[BaseException] = []
    results: list[bool] = []

    def off_main() -> None:
        try:
            guard.protect(exit_after_s=None)
        except RuntimeError as err:
            errors.append(err)
        results.append(guard.protect(exit_after_s=None, strict=False))

    thread = threading.Thread(target=off_main)
    thread.start()
    thread.join()
    assert "must run in the main thread" in str(errors[0])
    assert results == [False] and not guard.armed


def test_a_watchdog_ends_a_stop_nobody_takes() -> None:
    exits: list[int] = []
    guard = FakeSignals().guard(exits)
    guard.protect(exit_after_s=0.01)
    guard._handle(signal.SIGTERM, None)
    wait_until(lambda: exits, "the watchdog to exit")
    assert exits == [EXIT_PREEMPTED]


def test_held_stops_are_handed_to_the_source_that_watches_their_signal(monkeypatch: pytest.MonkeyPatch) -> None:
    from spotsafe import startup
    from spotsafe.notices.base import NoticeBoard
    from spotsafe.notices.signals import SignalNotices
    from spotsafe.notices.slurm import SlurmNotices

    fake = FakeSignals()
    guard = fake.guard()
    monkeypatch.setattr(startup, "GUARD", guard)
    guard.protect(exit_after_s=None)
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        guard._handle(sig, None)
    when = {s.name: s.received_at for s in guard.pending()}
    requeued: list[list[str]] = []

    def scontrol(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        requeued.append(command)
        return subprocess.CompletedProcess(command, 0, "", "")

    slurm = SlurmNotices(job_id="7", requeue=True, run=scontrol, install=fake.install)
    kubernetes = SignalNotices([signal.SIGTERM], grace_seconds=30, source="kubernetes", install=fake.install)
    board = NoticeBoard()
    for source in (slurm, kubernetes):
        source.start(board)
    assert [s.name for s in startup.hand_over([slurm, kubernetes], board)] == ["SIGUSR1", "SIGTERM", "SIGINT"]
    posted = {n.detail or n.source: n for n in board.drain()}
    assert (posted["SIGUSR1"].source, posted["SIGUSR1"].received_at) == ("slurm", when["SIGUSR1"])
    assert (posted["SIGTERM"].source, posted["SIGTERM"].deadline) == ("kubernetes", when["SIGTERM"] + 30)
    assert (posted["SIGINT"].source, posted["SIGINT"].deadline) == ("SIGINT", None)  # nobody watches it: plain
    assert board.pending() and not guard.armed
    slurm.after_stop(True)  # the Slurm warning caused the stop: the job is requeued
    assert requeued == [["scontrol", "requeue", "7"]]
    for source in (slurm, kubernetes):
        source.stop()
    assert fake.table[signal.SIGTERM] == signal.SIG_DFL  # the handlers from before protect(), not the guard's
    assert fake.table[signal.SIGINT] == signal.default_int_handler
