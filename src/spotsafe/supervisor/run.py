"""``spotsafe run``: launch a job, classify every exit, relaunch until it succeeds or a budget ends it.

Lifecycle of one supervised job (each attempt is a row in the :mod:`job store <spotsafe.supervisor.store>`)::

    claim the job (one supervisor per job) -> recover attempts a dead supervisor left running
    -> loop: record the attempt -> launch with SPOTSAFE_CHECKPOINT_URL, SPOTSAFE_RUN_ID, SPOTSAFE_ATTEMPT
             -> wait (forwarding SIGTERM/SIGINT with a grace period; stopping a job that makes no progress)
             -> classify the exit, read the checkpoint step after it, record it
             -> the retry budget decides: relaunch after a backoff, or end the job (succeeded / failed)

The job runs in a session of its own and gets SIGTERM if the supervisor dies
(``PR_SET_PDEATHSIG``), so it saves and exits instead of running on unsupervised;
a supervisor started again for the same job waits for (or stops) what is left of
it before launching the next attempt, so two copies never run. The attempt's
progress is its checkpoint: the newest committed step before and after it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from spotsafe.errors import ConfigError, SpotsafeError
from spotsafe.exit_codes import EXIT_CRASH, EXIT_PREEMPTED, EXIT_SUCCESS, EXIT_USAGE
from spotsafe.storage.registry import open_storage, protocol_of
from spotsafe.storage.repository import CheckpointRepository
from spotsafe.supervisor.classify import ExitClass, classify, oom_kill_counter
from spotsafe.supervisor.process import Job, describe_exit, launch
from spotsafe.supervisor.retry import Budget, RetryPolicy
from spotsafe.supervisor.store import FAILED, STOPPED, SUCCEEDED, AttemptRecord, JobStore
from spotsafe.telemetry.log import EVENTS_FILE, EventTail

log = logging.getLogger("spotsafe")
POLL_S = 0.2


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One supervised job. ``grace_s``: from a forwarded SIGTERM to SIGKILL. ``stall_timeout_s``: stop
    an attempt that reported no progress for that long (``None``: never)."""

    name: str
    command: tuple[str, ...]
    url: str
    store: Path
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    grace_s: float = 30.0
    stall_timeout_s: float | None = None

    def __post_init__(self) -> None:
        if not self.command:
            raise ConfigError("spotsafe run needs a command after --, e.g. spotsafe run -- python train.py")
        if not self.name or "/" in self.name:
            raise ConfigError(f"a job name must be non-empty and contain no '/', got {self.name!r}")
        if not self.grace_s >= 0:
            raise ConfigError(f"grace must be >= 0 seconds, got {self.grace_s!r}")
        if self.stall_timeout_s is not None and not self.stall_timeout_s > 0:
            raise ConfigError(f"the stall timeout must be > 0 seconds, got {self.stall_timeout_s!r}")


def newest_step(url: str) -> int | None:
    """The newest committed checkpoint's step at ``url`` (``None``: none yet)."""
    refs = CheckpointRepository(open_storage(url)).committed()
    return max(refs).step if refs else None


class Supervisor:
    """Runs one job to the end. :meth:`run` returns the supervisor's own exit code:
    0 succeeded, 1 failed (a budget ended it), 2 usage error, 75 stopped by a signal (run again to go on)."""

    def __init__(
        self,
        config: RunConfig,
        *,
        say: Callable[[str], None] = lambda line: log.warning("spotsafe run: %s", line),
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        oom_kills: Callable[[], int] | None = None,
        steps: Callable[[str], int | None] = newest_step,
        output: int | None = None,
    ) -> None:
        self.config = config
        self.say = say
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._oom = oom_kills or oom_kill_counter()
        self._steps = steps
        self._output = output
        self._stop_signal: int | None = None
        self._job: Job | None = None
        self._told = False
        self._events_file = (
            Path(config.url) / EVENTS_FILE
            if protocol_of(config.url) == "file"
            else config.store.with_name(f"{config.store.name}.{config.name}.events.jsonl")
        )

    # -- signals --------------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        first = self._stop_signal is None
        self._stop_signal = signum
        if self._job is not None:
            self._job.signal(signal.SIGTERM)  # the job saves and exits 75; a second signal is forwarded too
            self._told = True
        if first:
            self.say(f"got {signal.Signals(signum).name}: stopping the job (SIGKILL after {self.config.grace_s:g} s)")

    # -- the loop -------------------------------------------------------------------------------------
    def run(self) -> int:
        config = self.config
        with JobStore(config.store) as store, store.claim(config.name):
            store.open_job(config.name, config.command, config.url)
            self._recover(store)
            history = [(ExitClass(a.exit_class), _progressed(a)) for a in store.attempts(config.name) if a.exit_class]
            budget = Budget.replay(config.retry, history)
            previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
            try:
                return self._loop(store, budget)
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    def _loop(self, store: JobStore, budget: Budget) -> int:
        config = self.config
        while True:
            if self._stop_signal is not None:
                store.finish_job(config.name, STOPPED, "the supervisor was stopped by a signal; run it again to go on")
                return EXIT_PREEMPTED
            before = self._steps(config.url)
            number = store.start_attempt(config.name, step_before=before)
            code, exit_class = self._attempt(store, number)
            after = self._steps(config.url)
            store.end_attempt(config.name, number, exit_code=code, exit_class=exit_class.value, step_after=after)
            progressed = (after if after is not None else -1) > (before if before is not None else -1)
            self.say(
                f"attempt {number}: {describe_exit(code)} -> {exit_class.value}; checkpoint step {before} -> {after}"
            )
            if self._stop_signal is not None:
                store.finish_job(config.name, STOPPED, f"stopped by a signal during attempt {number}")
                return EXIT_PREEMPTED
            verdict = budget.after(exit_class, progressed=progressed, rng=self._rng)
            if not verdict.relaunch:
                state = SUCCEEDED if exit_class is ExitClass.SUCCEEDED else FAILED
                store.finish_job(config.name, state, verdict.reason)
                self.say(f"job {config.name}: {state}: {verdict.reason}")
                if state == SUCCEEDED:
                    return EXIT_SUCCESS
                return EXIT_USAGE if exit_class is ExitClass.USAGE else EXIT_CRASH
            self.say(f"{verdict.reason}; next attempt in {verdict.delay_s:.1f} s")
            self._pause(verdict.delay_s)

    def _pause(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self._stop_signal is None and time.monotonic() < deadline:
            self._sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))

    def _attempt(self, store: JobStore, number: int) -> tuple[int, ExitClass]:
        config = self.config
        env = {
            "SPOTSAFE_CHECKPOINT_URL": config.url,
            "SPOTSAFE_RUN_ID": config.name,
            "SPOTSAFE_ATTEMPT": str(number),
            "SPOTSAFE_JOB_STORE": str(config.store),
        }
        if protocol_of(config.url) != "file":
            env["SPOTSAFE_EVENTS_FILE"] = str(self._events_file)
        tail = EventTail(self._events_file)
        tail.poll()  # only what this attempt writes counts as its progress
        oom_before = self._oom()
        job = launch(
            config.command,
            env=env,
            stdout=self._output,
            stderr=self._output,
            parent_death_signal=signal.SIGTERM,
        )
        self._told = False
        self._job = job
        store.set_pid(config.name, number, job.pid)
        stalled = False
        last_sign = time.monotonic()
        kill_at: float | None = None
        try:
            while (code := job.poll()) is None:
                now = time.monotonic()
                if tail.poll():
                    last_sign = now
                if self._stop_signal is not None and kill_at is None:
                    if not self._told:  # the signal came before the job was known
                        job.signal(signal.SIGTERM)
                    kill_at = now + config.grace_s
                timeout = config.stall_timeout_s
                if timeout is not None and kill_at is None and now - last_sign > timeout:
                    stalled = True
                    self.say(f"attempt {number}: no progress for {timeout:g} s; stopping it")
                    job.signal(signal.SIGTERM)
                    kill_at = now + config.grace_s
                if kill_at is not None and now >= kill_at:
                    job.signal(signal.SIGKILL, group=True)
                self._sleep(POLL_S)
        finally:
            self._job = None
            job.reap_group()
        return code, classify(code, oom_kills=self._oom() - oom_before, stalled=stalled)

    def _recover(self, store: JobStore) -> None:
        """Attempts a dead supervisor left without an end: wait for (or stop) their process, record them."""
        for attempt in store.unfinished(self.config.name):
            alive = attempt.pid is not None and _alive(attempt.pid)
            if alive and attempt.pid is not None:
                self.say(f"attempt {attempt.number} (pid {attempt.pid}) outlived its supervisor: stopping it")
                _stop_group(attempt.pid, self.config.grace_s, self._sleep)
            exit_class = _recorded_exit(self._events_file, attempt)
            store.end_attempt(
                self.config.name,
                attempt.number,
                exit_code=None,
                exit_class=exit_class.value,
                step_after=self._steps(self.config.url),
            )
            self.say(f"attempt {attempt.number} ended while unsupervised: {exit_class.value}")


def _progressed(attempt: AttemptRecord) -> bool:
    before = attempt.step_before if attempt.step_before is not None else -1
    after = attempt.step_after if attempt.step_after is not None else -1
    return after > before


def _alive(pid: int) -> bool:
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


def _stop_group(pid: int, grace_s: float, sleep: Callable[[float], None]) -> None:
    """SIGTERM the job's main process, SIGKILL its session after ``grace_s`` (the job leads its own session)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _alive(pid) and time.monotonic() < deadline:
        sleep(POLL_S)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _recorded_exit(events_file: Path, attempt: AttemptRecord) -> ExitClass:
    """How an unsupervised attempt ended, from its own ``run_exited`` event (killed when it has none)."""
    for logged in EventTail(events_file).poll():
        event = logged.event
        if event.type == "run_exited" and logged.pid == attempt.pid:
            reason = getattr(event, "reason", "")
            return ExitClass.SUCCEEDED if reason == "finished" else ExitClass.PREEMPTED
    return ExitClass.KILLED


def run_job(
    name: str | None,
    command: Sequence[str],
    *,
    url: str | None,
    store: str | None,
    retry: RetryPolicy,
    grace_s: float,
    stall_timeout_s: float | None,
) -> int:
    """What ``spotsafe run`` does: fill in defaults, supervise, return the exit code."""
    url = url or os.environ.get("SPOTSAFE_CHECKPOINT_URL")
    if not url:
        raise ConfigError("spotsafe run needs --url (or $SPOTSAFE_CHECKPOINT_URL): where the job keeps its checkpoints")
    name = name or os.path.basename(url.rstrip("/")) or "job"
    store_path = Path(store or os.environ.get("SPOTSAFE_JOB_STORE") or ".spotsafe/jobs.sqlite")
    config = RunConfig(
        name=name,
        command=tuple(command),
        url=url,
        store=store_path,
        retry=retry,
        grace_s=grace_s,
        stall_timeout_s=stall_timeout_s,
    )
    try:
        return Supervisor(config).run()
    except (OSError, subprocess.SubprocessError) as err:
        raise SpotsafeError(f"could not run {' '.join(command)!r}: {err}") from err
