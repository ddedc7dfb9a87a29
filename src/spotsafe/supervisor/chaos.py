"""Interrupting a job the way a spot market does, and resuming it until it finishes.

Each attempt is launched with the run's checkpoint URL, run id and attempt
number in its environment (``SPOTSAFE_CHECKPOINT_URL``, ``SPOTSAFE_RUN_ID``,
``SPOTSAFE_ATTEMPT``). While kills remain, the attempt is interrupted in one of
the :class:`KillMode` ways at a random moment after it has made progress; then
the next attempt starts and must resume. The last attempt runs to the end.

The job's event log is watched to time kills (after progress, or right after a
save started) and to tell afterwards what each kill hit.

Provider notices (``aws-notice``, ``azure-notice``) go through a
:class:`~spotsafe.notices.emulator.ProviderEmulator` on 127.0.0.1 that every
attempt is pointed at: the notice is posted with a ``notice_window`` deadline,
and the job is killed with SIGKILL when the deadline passes, as the provider would.
"""

from __future__ import annotations

import enum
import random
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from spotsafe.exit_codes import EXIT_PREEMPTED, EXIT_SUCCESS
from spotsafe.notices.emulator import ProviderEmulator
from spotsafe.storage.registry import open_storage, protocol_of
from spotsafe.storage.repository import CheckpointRepository
from spotsafe.supervisor.process import Job, describe_exit, launch
from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import EVENTS_FILE, EventTail, LoggedEvent


class KillMode(enum.Enum):
    """How one interruption is delivered, and what the job must do about it."""

    SIGTERM = "sigterm"
    """SIGTERM to the main process only (Kubernetes, systemd): save and exit 75."""
    SIGTERM_GROUP = "sigterm-group"
    """SIGTERM to every process of the job, workers included (an OS shutdown): save and exit 75."""
    SIGTERM_TWICE = "sigterm-twice"
    """SIGTERM, then SIGTERM again while the emergency save runs: still one clean save, exit 75."""
    SIGKILL = "sigkill"
    """SIGKILL to every process at a random moment (the machine is gone): resume from the last commit."""
    SIGKILL_IN_SAVE = "sigkill-in-save"
    """SIGKILL to every process while a checkpoint is being written: that save must never be used."""
    AWS_NOTICE = "aws-notice"
    """An AWS spot interruption notice on the emulated IMDS, SIGKILL at its deadline: save in time, exit 75."""
    AZURE_NOTICE = "azure-notice"
    """An Azure ``Preempt`` scheduled event, SIGKILL at its ``NotBefore``: save in time, exit 75."""

    @property
    def is_notice(self) -> bool:
        return self in (KillMode.AWS_NOTICE, KillMode.AZURE_NOTICE)

    @property
    def expected_exit(self) -> int:
        return -signal.SIGKILL if self in (KillMode.SIGKILL, KillMode.SIGKILL_IN_SAVE) else EXIT_PREEMPTED


DEFAULT_MODES: tuple[KillMode, ...] = (
    KillMode.SIGTERM,
    KillMode.SIGKILL_IN_SAVE,
    KillMode.AWS_NOTICE,
    KillMode.SIGKILL,
    KillMode.SIGTERM_TWICE,
    KillMode.SIGKILL_IN_SAVE,
    KillMode.AZURE_NOTICE,
    KillMode.SIGTERM_GROUP,
)


@dataclass(frozen=True)
class Interruption:
    attempt: int
    mode: KillMode
    exit_code: int
    step: int | None
    """The last step the attempt reported before the kill (None if it reported none)."""
    in_save: bool
    """The kill left a save folder without a manifest: it landed in the middle of a save."""
    as_expected: bool


@dataclass
class ChaosResult:
    interruptions: list[Interruption] = field(default_factory=list)
    attempts: int = 0
    final_exit: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.final_exit == EXIT_SUCCESS and not self.problems


@dataclass
class _Watch:
    """What the event log says about one attempt."""

    pid: int
    last_step: int | None = None
    saving: set[int] = field(default_factory=set)
    notice_save_started: bool = False
    finished: bool = False

    def feed(self, logged: LoggedEvent) -> None:
        if logged.pid != self.pid:
            return
        event = logged.event
        if isinstance(event, ev.Progress):
            self.last_step = event.step
        elif isinstance(event, ev.SaveStarted):
            self.saving.add(event.step)
            self.notice_save_started |= event.reason == "notice"
        elif isinstance(event, (ev.SaveCommitted, ev.SaveFailed)):
            self.saving.discard(event.step)
        elif isinstance(event, ev.RunExited):
            self.finished |= event.reason == "finished"


class ChaosRun:
    """Runs ``command`` to completion while interrupting it ``len(modes)`` times."""

    def __init__(
        self,
        command: Sequence[str],
        url: str | Path,
        *,
        events_file: str | Path | None = None,
        modes: Sequence[KillMode] = DEFAULT_MODES,
        seed: int = 0,
        max_delay: float = 3.0,
        save_kill_window: float = 0.15,
        notice_window: float = 10.0,
        attempt_timeout: float = 300.0,
        run_id: str = "chaos",
        log: Callable[[str], None] = lambda message: None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        output: int | None = subprocess.DEVNULL,
    ) -> None:
        self.command = list(command)
        self.url = str(url)
        self.modes = list(modes)
        self.rng = random.Random(seed)
        self.max_delay = max_delay
        self.save_kill_window = save_kill_window
        self.notice_window = notice_window
        self.attempt_timeout = attempt_timeout
        self.run_id = run_id
        self.log = log
        self._sleep, self._clock = sleep, clock
        self.output = output
        local = protocol_of(self.url) == "file"
        if events_file is None and not local:
            raise ValueError("a run on object storage needs events_file= (a local file the job mirrors its events to)")
        self.events_file = Path(events_file) if events_file is not None else Path(self.url) / EVENTS_FILE
        self._extra_env = {} if local else {"SPOTSAFE_EVENTS_FILE": str(self.events_file)}
        self._tail = EventTail(self.events_file)
        self._repo = CheckpointRepository(open_storage(self.url))

    def run(self) -> ChaosResult:
        if not any(mode.is_notice for mode in self.modes):
            return self._run()
        with ProviderEmulator() as market:
            self._market = market
            self._extra_env.update(
                {**market.env(), "SPOTSAFE_NOTICES": "aws,azure", "SPOTSAFE_NOTICE_POLL_SECONDS": "0.5"}
            )
            try:
                return self._run()
            finally:
                self._market = None

    _market: ProviderEmulator | None = None

    def _run(self) -> ChaosResult:
        result = ChaosResult()
        pending = list(self.modes)
        max_attempts = len(pending) + 3
        while result.attempts < max_attempts:
            result.attempts += 1
            attempt = result.attempts
            job = launch(
                self.command,
                env={
                    "SPOTSAFE_CHECKPOINT_URL": self.url,
                    "SPOTSAFE_RUN_ID": self.run_id,
                    "SPOTSAFE_ATTEMPT": str(attempt),
                    **self._extra_env,
                },
                stdout=self.output,
                stderr=self.output,
            )
            watch = _Watch(job.pid)
            mode = pending[0] if pending else None
            try:
                if mode is None:
                    code = self._wait_exit(job, watch)
                    job.reap_group()
                    result.final_exit = code
                    self.log(f"attempt {attempt}: ran to the end ({describe_exit(code)})")
                    if code != EXIT_SUCCESS:
                        result.problems.append(f"attempt {attempt}: the final run ended with {describe_exit(code)}")
                    return result
                interruption = self._interrupt(job, watch, attempt, mode)
            finally:
                job.reap_group()
            if interruption is None:
                code = job.wait()
                result.final_exit = code
                self.log(f"attempt {attempt}: finished before it could be interrupted ({describe_exit(code)})")
                return result
            pending.pop(0)
            result.interruptions.append(interruption)
            where = "during a save" if interruption.in_save else f"after step {interruption.step}"
            self.log(
                f"attempt {attempt}: {mode.value} {where} -> {describe_exit(interruption.exit_code)}"
                + ("" if interruption.as_expected else f" (expected {describe_exit(mode.expected_exit)})")
            )
            if not interruption.as_expected:
                result.problems.append(
                    f"attempt {attempt}: {mode.value} gave {describe_exit(interruption.exit_code)}, "
                    f"expected {describe_exit(mode.expected_exit)}"
                )
        result.problems.append(f"gave up after {max_attempts} attempts")
        return result

    # -- one attempt ---------------------------------------------------------
    def _pump(self, watch: _Watch) -> None:
        for logged in self._tail.poll():
            watch.feed(logged)

    def _wait_until(self, job: Job, watch: _Watch, condition: Callable[[], bool]) -> bool:
        """Poll the log until ``condition()`` or the job exits. Returns whether the condition held."""
        deadline = self._clock() + self.attempt_timeout
        while self._clock() < deadline:
            self._pump(watch)
            if condition():
                return True
            if job.poll() is not None:
                self._pump(watch)
                return condition()
            self._sleep(0.002)
        return False

    def _wait_exit(self, job: Job, watch: _Watch, timeout: float | None = None) -> int:
        """Wait for the job to exit; SIGKILL it (the whole group) after ``timeout`` (default: the attempt's)."""
        try:
            code = job.wait(self.attempt_timeout if timeout is None else timeout)
        except subprocess.TimeoutExpired:
            job.signal(signal.SIGKILL, group=True)
            code = job.wait()
        self._pump(watch)
        return code

    def _interrupt(self, job: Job, watch: _Watch, attempt: int, mode: KillMode) -> Interruption | None:
        if not self._wait_until(job, watch, lambda: watch.last_step is not None):
            return None
        if mode is KillMode.SIGKILL_IN_SAVE:
            if not self._wait_until(job, watch, lambda: bool(watch.saving)):
                return None
            self._sleep(self.rng.uniform(0.0, self.save_kill_window))
        else:
            self._sleep(self.rng.uniform(0.0, self.max_delay))
        self._pump(watch)
        if job.poll() is not None:
            return None
        step = watch.last_step
        if mode.is_notice:
            return self._notice(job, watch, attempt, mode)
        if mode in (KillMode.SIGKILL, KillMode.SIGKILL_IN_SAVE):
            job.signal(signal.SIGKILL, group=True)
        elif mode is KillMode.SIGTERM_GROUP:
            job.signal(signal.SIGTERM, group=True)
        else:
            job.signal(signal.SIGTERM)
            if mode is KillMode.SIGTERM_TWICE:
                self._wait_until(job, watch, lambda: watch.notice_save_started)
                job.signal(signal.SIGTERM)
        code = self._wait_exit(job, watch)
        return self._judge(job, watch, attempt, mode, step, code)

    def _notice(self, job: Job, watch: _Watch, attempt: int, mode: KillMode) -> Interruption:
        """Post a provider notice; the provider takes the machine back (SIGKILL) at its deadline."""
        market = self._market
        assert market is not None
        step = watch.last_step
        if mode is KillMode.AWS_NOTICE:
            market.aws_interrupt(in_s=self.notice_window)
        else:
            market.azure_event("Preempt", in_s=self.notice_window)
        code = self._wait_exit(job, watch, self.notice_window)  # the provider takes the machine at the deadline
        market.aws_clear()  # the next attempt runs on a new machine
        market.azure_clear()
        return self._judge(job, watch, attempt, mode, step, code)

    def _judge(
        self, job: Job, watch: _Watch, attempt: int, mode: KillMode, step: int | None, code: int
    ) -> Interruption:
        job.reap_group()
        # Ground truth, not timing: a save folder without a manifest survived the kill.
        in_save = any(not self._repo.is_committed(ref) for ref in self._repo.folders())
        return Interruption(
            attempt=attempt,
            mode=mode,
            exit_code=code,
            step=step,
            in_save=in_save,
            # A signal that lands after the last step, while the final save is written, finds the work
            # done: the job commits the final checkpoint and rightly exits 0.
            as_expected=code == mode.expected_exit or (code == 0 and watch.finished),
        )
