"""One attempt of a supervised job, from its launch to what its exit means; and attempts a dead supervisor left.

The supervisor's loop (:mod:`spotsafe.supervisor.run`) runs each attempt in this order::

    env = attempt_env(...)                   # the job contract (JobEnv) for attempt N
    handle = launcher.start(spec)            # any Launcher: a local process, a pool's template, the drill's market
    attempt = RunningAttempt(handle, ...)
    attempt.stop()                           # from a signal handler, at any time: forward SIGTERM now
    code, stalled = attempt.wait(...)        # poll; SIGTERM on a stop or a stall, SIGKILL to the group after grace
    attempt.exit_class(code, ...)            # succeeded, preempted, killed, ..., no_capacity

An attempt may be a launcher standing for several job processes (torchrun and its ranks): torchrun exits 1
when its workers exit 75 after a notice, or 2 on a usage error. Its exit code then says less than the
processes' own ``run_exited`` events, which :meth:`RunningAttempt.exit_class` reads instead (see
:meth:`RunningAttempt.told_by_processes`).

A launcher that must inspect what an attempt left before the next one starts (the chaos run looks for a
half-written save) hands back a :class:`CheckedHandle`, whose exit shows once that inspection is done.

A supervisor started again for a job whose previous supervisor died finds attempts with no recorded end:
:func:`alive` tells whether their process still runs, :func:`stop_session` stops it, :func:`recorded_exit`
reads how it ended from its own ``run_exited`` event.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from spotsafe.jobenv import JobEnv
from spotsafe.reasons import ExitReason
from spotsafe.supervisor.classify import ExitClass, classify
from spotsafe.supervisor.pools import Handle
from spotsafe.supervisor.process import signal_tree
from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import EventTail, RunTail

POLL_S = 0.2


def attempt_env(*, url: str, job: str, number: int, store: Path, pool: str, events_file: Path | None) -> dict[str, str]:
    """What attempt ``number`` of ``job`` finds in its environment. ``events_file``: the local spool its events
    go to (a run on object storage; ``None`` for a local run, whose events go to its own folder)."""
    return JobEnv(
        checkpoint_url=url,
        run_id=job,
        attempt=number,
        job_store=str(store),
        pool=pool,
        events_file=None if events_file is None else str(events_file),
    ).to_env()


class RunningAttempt:
    """A started attempt until it exits.

    :meth:`wait` runs on the supervisor's thread; :meth:`stop` may be called from a signal handler on
    that thread while :meth:`wait` polls. ``tail`` is the event log, read from where this attempt began:
    its events are its signs of progress and name its machine when the launcher does not know it.
    """

    def __init__(
        self,
        handle: Handle,
        *,
        job: str,
        number: int,
        tail: EventTail | RunTail,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        say: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.handle = handle
        self.machine = handle.machine
        self._job, self._number = job, number
        self._tail = tail
        self._clock, self._sleep, self._say = clock, sleep, say
        self._told = False
        self._processes: dict[int, str | None] = {}
        """This attempt's job processes (their ``run_started`` events) and their ``run_exited`` reasons."""

    def stop(self) -> None:
        """Forward a stop to the job now: SIGTERM to its main process (a second call sends another)."""
        self.handle.signal(signal.SIGTERM)
        self._told = True

    def wait(self, *, stopping: Callable[[], bool], grace_s: float, stall_timeout_s: float | None) -> tuple[int, bool]:
        """Poll until the attempt exits; return its exit code and whether it was stopped for lack of progress.

        Once ``stopping()`` (the supervisor is being stopped) the job gets SIGTERM, unless :meth:`stop` sent it
        already; after ``stall_timeout_s`` with no event of its own it gets SIGTERM and counts as stalled. Either
        way its whole process group gets SIGKILL ``grace_s`` later. The group is reaped when this returns.
        """
        handle = self.handle
        stalled = False
        last_sign = self._clock()
        kill_at: float | None = None
        try:
            while (code := handle.poll()) is None:
                now = self._clock()
                if self._read():
                    last_sign = now
                if stopping() and kill_at is None:
                    if not self._told:  # the stop came before the job was known
                        handle.signal(signal.SIGTERM)
                    kill_at = now + grace_s
                if stall_timeout_s is not None and kill_at is None and now - last_sign > stall_timeout_s:
                    stalled = True
                    self._say(f"attempt {self._number}: no progress for {stall_timeout_s:g} s; stopping it")
                    handle.signal(signal.SIGTERM)
                    kill_at = now + grace_s
                if kill_at is not None and now >= kill_at:
                    handle.signal(signal.SIGKILL, group=True)
                self._sleep(POLL_S)
        finally:
            handle.reap_group()
        self._read()  # what the processes wrote as they exited
        return code, stalled

    def _read(self) -> bool:
        """Read this attempt's new events; whether there were any."""
        seen = False
        for logged in self._tail.poll():
            if logged.run_id != self._job or logged.attempt != self._number:
                continue
            seen = True
            event = logged.event
            if isinstance(event, ev.RunStarted):
                self._processes.setdefault(logged.pid, None)
                if self.machine is None:
                    self.machine = event.host
            elif isinstance(event, ev.RunExited):
                self._processes[logged.pid] = event.reason
        return seen

    def told_by_processes(self) -> ExitClass | None:
        """What the job's processes said of their own exits, when the attempt's main process is not one of them
        (a launcher such as torchrun) and every one that started has exited on purpose: a usage error or an
        unusable checkpoint on any of them, preempted on all. ``None`` otherwise (one crashed, or was killed:
        the launcher's exit code stands)."""
        processes = self._processes
        if not processes or self.handle.pid in processes or None in processes.values():
            return None
        reasons = set(processes.values())
        if ExitReason.WORLD_SIZE_MISMATCH in reasons:
            return ExitClass.USAGE
        if ExitReason.NO_USABLE_CHECKPOINT in reasons:
            return ExitClass.NO_USABLE_CHECKPOINT
        # All finished and still a failed exit: something failed after finish() (the launcher's code stands).
        return ExitClass.PREEMPTED if reasons == {ExitReason.PREEMPTED} else None

    def exit_class(self, code: int, *, stalled: bool, stopped: bool, oom_kills: int) -> ExitClass:
        """What exit ``code`` means; ``stopped``: the supervisor stopped the job itself (a signal it was sent);
        ``oom_kills``: OOM kills the memory cgroup counted during the attempt. A launcher's own "no capacity"
        exit counts only when nothing stopped the attempt."""
        if not stalled and not stopped and code != 0 and self.handle.no_capacity(code):
            return ExitClass.NO_CAPACITY
        exit_class = classify(code, oom_kills=oom_kills, stalled=stalled)
        if exit_class is ExitClass.CRASHED:
            return self.told_by_processes() or exit_class
        return exit_class


class CheckedHandle:
    """A started attempt (``inner``) whose exit shows only once ``judge()``, run on a thread of its own from the
    start, has returned: a launcher that inspects what an attempt left (the chaos run) finishes that before the
    supervisor classifies the exit and relaunches. An exception in ``judge`` is raised by :meth:`poll`."""

    def __init__(self, inner: Handle, judge: Callable[[], None]) -> None:
        self._inner = inner
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(judge,), name="spotsafe-judge", daemon=True)
        self._thread.start()

    def _run(self, judge: Callable[[], None]) -> None:
        try:
            judge()
        except BaseException as err:  # noqa: BLE001 - handed to the supervisor's thread by poll()
            self._error = err
        finally:
            self._done.set()

    @property
    def pid(self) -> int | None:
        return self._inner.pid

    @property
    def machine(self) -> str | None:
        return self._inner.machine

    def poll(self) -> int | None:
        if not self._done.is_set():
            return None
        if self._error is not None:
            raise self._error
        return self._inner.poll()

    def signal(self, sig: int, *, group: bool = False) -> None:
        self._inner.signal(sig, group=group)

    def reap_group(self) -> None:
        self._inner.reap_group()

    def no_capacity(self, code: int) -> bool:
        return self._inner.no_capacity(code)


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
        if handle.read().rsplit(")", 1)[-1].split()[0] == "Z":
            return False  # a zombie is dead
    return True


def stop_session(pid: int, grace_s: float, sleep: Callable[[float], None]) -> None:
    """SIGTERM the job's main process, SIGKILL its session and the processes below it after ``grace_s`` (the job
    leads its own session; torchrun's ranks lead theirs: :func:`~spotsafe.supervisor.process.signal_tree`)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while alive(pid) and time.monotonic() < deadline:
        sleep(POLL_S)
    signal_tree(pid, signal.SIGKILL)


def recorded_exit(events_file: Path, pid: int | None) -> ExitClass:
    """How an unsupervised attempt (process ``pid``) ended, from its own ``run_exited`` event (killed: none)."""
    for logged in EventTail(events_file).poll():
        event = logged.event
        if isinstance(event, ev.RunExited) and logged.pid == pid:
            return ExitClass.SUCCEEDED if event.reason == ExitReason.FINISHED else ExitClass.PREEMPTED
    return ExitClass.KILLED
