"""Interrupting a job the way a spot market does, while the supervisor resumes it until it finishes.

:class:`ChaosRun` runs the job under the :class:`~spotsafe.supervisor.run.Supervisor` (the one relaunch
loop) with a :class:`ChaosLauncher`: while kills remain, each attempt is interrupted in one of the
:class:`~spotsafe.supervisor.kills.KillMode` ways at a random moment after it has made progress (timed
from its event log: after progress, or right after a save started); the next attempt must resume. The
last one runs to the end. Afterwards the checkpoint folders tell what each kill hit.

Provider notices (``aws-notice``, ``azure-notice``) go through a
:class:`~spotsafe.notices.emulator.ProviderEmulator` on 127.0.0.1 that every attempt is pointed at:
the notice is posted with a ``notice_window`` deadline, and the job is killed with SIGKILL when the
deadline passes, as the provider would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from spotsafe.exit_codes import EXIT_SUCCESS
from spotsafe.jobenv import JobEnv
from spotsafe.notices.emulator import ProviderEmulator
from spotsafe.reasons import ExitReason, SaveReason
from spotsafe.storage.registry import open_storage, protocol_of
from spotsafe.storage.repository import CheckpointRepository
from spotsafe.supervisor.attempt import CheckedHandle
from spotsafe.supervisor.config import RunConfig
from spotsafe.supervisor.kills import DEFAULT_MODES, ChaosResult, Interruption, KillMode
from spotsafe.supervisor.pools import Handle, Launcher, LaunchSpec, PoolLauncher
from spotsafe.supervisor.process import describe_exit
from spotsafe.supervisor.retry import RelaunchPolicy
from spotsafe.supervisor.run import Supervisor
from spotsafe.supervisor.store import JobStore
from spotsafe.telemetry.log import EVENTS_FILE, EventTail, LoggedEvent
from spotsafe.telemetry.runmodel import RunModel

EXIT_POLL_S = 0.01


@dataclass
class _Watch:
    """What the event log says about one attempt (the process ``pid``): its events' run model."""

    pid: int
    model: RunModel = field(default_factory=lambda: RunModel(series=False))

    def feed(self, logged: LoggedEvent) -> None:
        if logged.pid == self.pid:
            self.model.apply(logged)

    @property
    def last_step(self) -> int | None:
        """The step of the attempt's last ``progress`` (None before its first)."""
        span = self.model.attempts[-1].progress_span if self.model.attempts else None
        return span[1][1] if span is not None else None

    @property
    def saving(self) -> set[int]:
        """Steps whose save started and has not ended."""
        return self.model.writing

    @property
    def notice_save_started(self) -> bool:
        return any(s.event.reason == SaveReason.NOTICE for s in self.model.save_starts)

    @property
    def finished(self) -> bool:
        return any(a.exited == ExitReason.FINISHED for a in self.model.attempts)


class ChaosRun:
    """Runs ``command`` to completion under the supervisor's loop while interrupting it ``len(modes)`` times.

    The :class:`~spotsafe.supervisor.run.Supervisor` launches, classifies and relaunches every attempt, as
    ``spotsafe run`` does; a :class:`ChaosLauncher` starts each one and interrupts it as the schedule says.
    ``store``: the job store the supervisor keeps (default: a scratch one, removed afterwards).
    """

    def __init__(
        self,
        command: Sequence[str],
        url: str | Path,
        *,
        events_file: str | Path | None = None,
        store: str | Path | None = None,
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
        self.run_id = run_id
        self.output = output
        self.store = Path(store) if store is not None else None
        local = protocol_of(self.url) == "file"
        if events_file is None and not local:
            raise ValueError("a run on object storage needs events_file= (a local file the job mirrors its events to)")
        self._spool = Path(events_file) if events_file is not None and not local else None
        self.max_attempts = len(self.modes) + 3
        self.launcher = ChaosLauncher(
            self.modes,
            url=self.url,
            events_file=self._spool if self._spool is not None else Path(self.url) / EVENTS_FILE,
            max_attempts=self.max_attempts,
            rng=random.Random(seed),
            max_delay=max_delay,
            save_kill_window=save_kill_window,
            notice_window=notice_window,
            attempt_timeout=attempt_timeout,
            log=log,
            sleep=sleep,
            clock=clock,
        )

    def run(self) -> ChaosResult:
        """Supervise the job until it finishes, or the schedule or a budget ends it; what happened."""
        launcher = self.launcher
        with contextlib.ExitStack() as stack:
            if any(mode.is_notice for mode in self.modes):
                launcher.market = stack.enter_context(ProviderEmulator())
            scratch = None if self.store else stack.enter_context(tempfile.TemporaryDirectory(prefix="spotsafe-chaos-"))
            store = self.store or Path(str(scratch)) / "jobs.sqlite"
            config = RunConfig(
                name=self.run_id,
                command=tuple(self.command),
                url=self.url,
                store=store,
                # Every attempt is relaunched at once; the schedule (stop_after) decides when the run is over.
                retry=RelaunchPolicy(
                    max_preemptions=self.max_attempts, max_errors=self.max_attempts, initial_s=0.0, max_delay_s=0.0
                ),
                events_file=self._spool,
            )
            supervisor = Supervisor(
                config, launcher=launcher, output=self.output, say=lambda line: None, stop_after=launcher.stop_after
            )
            try:
                supervisor.run()
            finally:
                launcher.market = None
            if launcher.result.final_exit is None:  # the supervisor ended the job before the schedule did
                with JobStore(store) as jobs:
                    job = jobs.job(self.run_id)
                if job.reason not in launcher.result.problems:
                    launcher.result.problems.append(f"the supervisor ended the job ({job.state}): {job.reason}")
        return launcher.result


class ChaosLauncher:
    """A :class:`~spotsafe.supervisor.pools.Launcher` that starts each attempt through ``inner`` (default: a
    local process) and interrupts it as ``modes`` say, in order; the attempt after the last runs to the end.

    Call sequence, for each attempt ``N`` (the supervisor's loop)::

        start(spec)      -> the attempt runs; a thread of its own times the kill from the event log
        handle.poll()    -> None until the thread has judged the interruption (so the next attempt never
                            starts before the damage is seen), then the exit code
        stop_after(N)    -> a reason once the schedule is done (or ``max_attempts`` are spent), else None

    :attr:`result` is what happened. A notice mode needs :attr:`market` (a running
    :class:`~spotsafe.notices.emulator.ProviderEmulator`) set before the first attempt.
    """

    def __init__(
        self,
        modes: Sequence[KillMode],
        *,
        url: str,
        events_file: Path,
        max_attempts: int,
        rng: random.Random,
        max_delay: float = 3.0,
        save_kill_window: float = 0.15,
        notice_window: float = 10.0,
        attempt_timeout: float = 300.0,
        log: Callable[[str], None] = lambda message: None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        inner: Launcher | None = None,
    ) -> None:
        self.pending = list(modes)
        self.result = ChaosResult()
        self.market: ProviderEmulator | None = None
        self.max_attempts = max_attempts
        self.rng = rng
        self.max_delay = max_delay
        self.save_kill_window = save_kill_window
        self.notice_window = notice_window
        self.attempt_timeout = attempt_timeout
        self.log = log
        self._sleep, self._clock = sleep, clock
        self._inner = inner or PoolLauncher()
        self._tail = EventTail(events_file)
        self._repo = CheckpointRepository(open_storage(url))
        self._over: str | None = None

    def env(self) -> dict[str, str]:
        """What every attempt finds in its environment besides the job contract: where notices come from."""
        if self.market is None:
            return {}
        return {**self.market.env(), **JobEnv(notices="aws,azure", notice_poll_s=0.5).to_env()}

    def start(self, spec: LaunchSpec) -> Handle:
        handle = self._inner.start(dataclasses.replace(spec, env={**spec.env, **self.env()}))
        self.result.attempts += 1
        mode = self.pending[0] if self.pending else None
        return CheckedHandle(handle, lambda: self._attempt(handle, spec.attempt, mode))

    def stop_after(self, number: int) -> str | None:
        """Why no attempt follows attempt ``number`` (``None``: the schedule goes on)."""
        if self._over is None and number >= self.max_attempts:
            self._over = f"gave up after {self.max_attempts} attempts"
            self.result.problems.append(self._over)
        return self._over

    # -- one attempt, on its own thread ----------------------------------------------------------------------
    def _attempt(self, handle: Handle, attempt: int, mode: KillMode | None) -> None:
        result = self.result
        watch = _Watch(handle.pid if handle.pid is not None else -1)
        if mode is None:
            code = self._wait_exit(handle, watch)
            handle.reap_group()
            result.final_exit = code
            self._over = "the schedule is done: the last attempt ran to the end"
            self.log(f"attempt {attempt}: ran to the end ({describe_exit(code)})")
            if code != EXIT_SUCCESS:
                result.problems.append(f"attempt {attempt}: the final run ended with {describe_exit(code)}")
            return
        try:
            interruption = self._interrupt(handle, watch, attempt, mode)
        finally:
            handle.reap_group()
        if interruption is None:
            code = self._wait(handle)
            result.final_exit = code
            self._over = "the job finished before it could be interrupted"
            self.log(f"attempt {attempt}: finished before it could be interrupted ({describe_exit(code)})")
            return
        self.pending.pop(0)
        result.interruptions.append(interruption)
        if interruption.exit_code == EXIT_SUCCESS:  # the kill found the work done: the supervisor ends the job
            result.final_exit = EXIT_SUCCESS
            self._over = "the job finished"
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

    def _pump(self, watch: _Watch) -> None:
        for logged in self._tail.poll():
            watch.feed(logged)

    def _wait_until(self, handle: Handle, watch: _Watch, condition: Callable[[], bool]) -> bool:
        """Poll the log until ``condition()`` or the job exits. Returns whether the condition held."""
        deadline = self._clock() + self.attempt_timeout
        while self._clock() < deadline:
            self._pump(watch)
            if condition():
                return True
            if handle.poll() is not None:
                self._pump(watch)
                return condition()
            self._sleep(0.002)
        return False

    def _wait(self, handle: Handle) -> int:
        while (code := handle.poll()) is None:
            self._sleep(EXIT_POLL_S)
        return code

    def _wait_exit(self, handle: Handle, watch: _Watch, timeout: float | None = None) -> int:
        """Wait for the job to exit; SIGKILL it (the whole group) after ``timeout`` (default: the attempt's)."""
        deadline = self._clock() + (self.attempt_timeout if timeout is None else timeout)
        while (code := handle.poll()) is None and self._clock() < deadline:
            self._sleep(EXIT_POLL_S)
        if code is None:
            handle.signal(signal.SIGKILL, group=True)
            code = self._wait(handle)
        self._pump(watch)
        return code

    def _interrupt(self, handle: Handle, watch: _Watch, attempt: int, mode: KillMode) -> Interruption | None:
        if not self._wait_until(handle, watch, lambda: watch.last_step is not None):
            return None
        if mode is KillMode.SIGKILL_IN_SAVE:
            if not self._wait_until(handle, watch, lambda: bool(watch.saving)):
                return None
            self._sleep(self.rng.uniform(0.0, self.save_kill_window))
        else:
            self._sleep(self.rng.uniform(0.0, self.max_delay))
        self._pump(watch)
        if handle.poll() is not None:
            return None
        step = watch.last_step
        if mode.is_notice:
            return self._notice(handle, watch, attempt, mode)
        if mode in (KillMode.SIGKILL, KillMode.SIGKILL_IN_SAVE):
            handle.signal(signal.SIGKILL, group=True)
        elif mode is KillMode.SIGTERM_GROUP:
            handle.signal(signal.SIGTERM, group=True)
        else:
            handle.signal(signal.SIGTERM)
            if mode is KillMode.SIGTERM_TWICE:
                self._wait_until(handle, watch, lambda: watch.notice_save_started)
                handle.signal(signal.SIGTERM)
        code = self._wait_exit(handle, watch)
        return self._judge(handle, watch, attempt, mode, step, code)

    def _notice(self, handle: Handle, watch: _Watch, attempt: int, mode: KillMode) -> Interruption:
        """Post a provider notice; the provider takes the machine back (SIGKILL) at its deadline."""
        market = self.market
        if market is None:
            raise ValueError(f"{mode.value} needs the provider emulator (ChaosLauncher.market)")
        step = watch.last_step
        if mode is KillMode.AWS_NOTICE:
            market.aws_interrupt(in_s=self.notice_window)
        else:
            market.azure_event("Preempt", in_s=self.notice_window)
        code = self._wait_exit(handle, watch, self.notice_window)  # the provider takes the machine at the deadline
        market.aws_clear()  # the next attempt runs on a new machine
        market.azure_clear()
        return self._judge(handle, watch, attempt, mode, step, code)

    def _judge(
        self, handle: Handle, watch: _Watch, attempt: int, mode: KillMode, step: int | None, code: int
    ) -> Interruption:
        handle.reap_group()
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


__all__ = ["DEFAULT_MODES", "ChaosLauncher", "ChaosResult", "ChaosRun", "Interruption", "KillMode"]
