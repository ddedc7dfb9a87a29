"""An attempt whose main process is a launcher (torchrun) standing for several job processes: its exit is read
from the processes' own ``run_exited`` events (spotsafe.supervisor.attempt), which the supervisor finds in the
ranks' folders (spotsafe.telemetry.log.RunTail). Real event files, a stand-in handle for the launcher."""

from __future__ import annotations

from pathlib import Path

import pytest

from spotsafe.supervisor.attempt import RunningAttempt
from spotsafe.supervisor.classify import ExitClass
from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import EVENTS_FILE, EventLog, RunIdentity, RunTail

LAUNCHER_PID = 100


class Exited:
    """A launcher that has exited with ``code``."""

    def __init__(self, code: int, pid: int = LAUNCHER_PID) -> None:
        self.code, self.pid, self.machine = code, pid, None

    def poll(self) -> int | None:
        return self.code

    def signal(self, sig: int, *, group: bool = False) -> None:
        pass

    def reap_group(self) -> None:
        pass

    def no_capacity(self, code: int) -> bool:
        return False


def write(run: Path, folder: str, pid: int, *events: ev.Event, attempt: int = 2) -> None:
    path = run / folder / EVENTS_FILE if folder else run / EVENTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with EventLog(path, RunIdentity(run_id="job", attempt=attempt, pid=pid)) as log:
        for event in events:
            log.emit(event)


def started(host: str = "node-a") -> ev.RunStarted:
    return ev.RunStarted(time=1.0, url="run", host=host)


def exited(reason: str, code: int) -> ev.RunExited:
    return ev.RunExited(time=2.0, reason=reason, step=20, exit_code=code)


def classify_attempt(run: Path, code: int, *ranks: tuple[ev.Event, ...], launcher_pid: int = LAUNCHER_PID) -> ExitClass:
    tail = RunTail(run / EVENTS_FILE)
    tail.poll()  # the supervisor's first poll: what came before this attempt does not count
    for rank, events in enumerate(ranks):
        write(run, f"rank-{rank:05d}", 200 + rank, *events)
    attempt = RunningAttempt(Exited(code, launcher_pid), job="job", number=2, tail=tail)
    got, stalled = attempt.wait(stopping=lambda: False, grace_s=1.0, stall_timeout_s=None)
    assert (got, stalled) == (code, False)
    assert attempt.machine == ("node-a" if ranks and ranks[0] else None)
    return attempt.exit_class(code, stalled=False, stopped=False, oom_kills=0)


PREEMPTED = (started(), exited("preempted", 75))


@pytest.mark.parametrize(
    ("ranks", "expected"),
    [
        ((PREEMPTED, PREEMPTED), ExitClass.PREEMPTED),  # torchrun's SignalException exit after its workers saved
        ((PREEMPTED, (started(),)), ExitClass.CRASHED),  # rank 1 died without a word
        ((PREEMPTED, (started(), exited("world_size_mismatch", 2))), ExitClass.USAGE),
        (((started(), exited("no_usable_checkpoint", 65)),) * 2, ExitClass.NO_USABLE_CHECKPOINT),
        (((started(), exited("finished", 0)),) * 2, ExitClass.CRASHED),  # failed after finish(): the code stands
        ((), ExitClass.CRASHED),  # no process got as far as a checkpointer
    ],
)
def test_a_launchers_failed_exit_is_read_from_its_processes_events(
    tmp_path: Path, ranks: tuple[tuple[ev.Event, ...], ...], expected: ExitClass
) -> None:
    assert classify_attempt(tmp_path, 1, *ranks) == expected


def test_the_job_process_itself_is_judged_by_its_exit_code(tmp_path: Path) -> None:
    """One process (its pid is the attempt's): exit 1 after writing "preempted" is still a crash."""
    write(tmp_path, "", LAUNCHER_PID)  # the log exists before the attempt
    tail = RunTail(tmp_path / EVENTS_FILE)
    tail.poll()
    write(tmp_path, "", LAUNCHER_PID, *PREEMPTED)
    attempt = RunningAttempt(Exited(1), job="job", number=2, tail=tail)
    attempt.wait(stopping=lambda: False, grace_s=1.0, stall_timeout_s=None)
    assert attempt.exit_class(1, stalled=False, stopped=False, oom_kills=0) is ExitClass.CRASHED


def test_exit_codes_that_say_enough_are_not_second_guessed(tmp_path: Path) -> None:
    assert classify_attempt(tmp_path, -9, PREEMPTED, PREEMPTED) is ExitClass.KILLED


def test_the_run_tail_reads_rank_logs_that_appear_and_skips_what_was_there(tmp_path: Path) -> None:
    write(tmp_path, "", 1, started(), attempt=1)
    write(tmp_path, "rank-00000", 10, started(), attempt=1)  # an earlier attempt's ranks
    tail = RunTail(tmp_path / EVENTS_FILE)
    assert len(tail.poll()) == 2
    write(tmp_path, "rank-00000", 11, started())
    write(tmp_path, "rank-00001", 12, started())  # appears now: read from its beginning
    write(tmp_path, "rank-7", 13, started())  # not a rank folder
    assert sorted(e.pid for e in tail.poll()) == [11, 12]
    assert tail.poll() == []
