"""``spotsafe run``: launch a job, classify every exit, relaunch until it succeeds or a budget ends it.

Lifecycle of one supervised job (each attempt is a row in the :mod:`job store <spotsafe.supervisor.store>`)::

    claim the job (one supervisor per job) -> recover attempts a dead supervisor left running
    -> loop: health from the attempts so far -> choose a pool (planner: cheapest healthy spot pool,
             on-demand when the deadline is at risk; or wait for a cool-down to end)
             -> record the attempt -> launch in the pool with SPOTSAFE_CHECKPOINT_URL, SPOTSAFE_RUN_ID,
                SPOTSAFE_ATTEMPT
             -> wait (forwarding SIGTERM/SIGINT with a grace period; stopping a job that makes no progress)
             -> classify the exit, read the checkpoint step after it, record it with its machine and cost
             -> the retry budget decides: relaunch after a backoff, or end the job (succeeded / failed)

Every decision is a typed event with its reason (``pool_chosen``, ``excluded``,
``escalated``, ``no_pool_available``, ``attempt_started``, ``attempt_ended``,
``retry_decided``, ``job_finished``) in the run's event log.

The job runs in a session of its own and gets SIGTERM if the supervisor dies
(``PR_SET_PDEATHSIG``), so it saves and exits instead of running on unsupervised;
a supervisor started again for the same job waits for (or stops) what is left of
it before launching the next attempt, so two copies never run. The attempt's
progress is its checkpoint: the newest committed step before and after it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from spotsafe.errors import ConfigError, SpotsafeError
from spotsafe.exit_codes import EXIT_CRASH, EXIT_NO_USABLE_CHECKPOINT, EXIT_PREEMPTED, EXIT_SUCCESS, EXIT_USAGE
from spotsafe.storage.registry import open_storage, protocol_of
from spotsafe.storage.repository import CheckpointRepository
from spotsafe.supervisor.classify import ExitClass, classify, oom_kill_counter
from spotsafe.supervisor.health import FailoverPolicy, Health, Outcome
from spotsafe.supervisor.planner import choose, measure, project
from spotsafe.supervisor.pools import LOCAL_POOL, Handle, Launcher, LaunchSpec, Pool, PoolLauncher
from spotsafe.supervisor.process import describe_exit
from spotsafe.supervisor.retry import Budget, RetryPolicy
from spotsafe.supervisor.store import FAILED, STOPPED, SUCCEEDED, AttemptRecord, JobStore
from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import EVENTS_FILE, EventLog, EventSink, EventTail, RunIdentity
from spotsafe.telemetry.metrics import Metrics

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
    pools: tuple[Pool, ...] = (LOCAL_POOL,)
    failover: FailoverPolicy = field(default_factory=FailoverPolicy)
    deadline: float | None = None
    """Unix time the job should be done by; needs ``total_steps`` to project the finish."""
    total_steps: int | None = None
    on_demand_per_hour: float | None = None
    """What the job would pay an hour on demand, for the report's comparison (``None``: its cheapest on-demand
    pool's price x nodes, if it has one)."""

    def __post_init__(self) -> None:
        if self.on_demand_per_hour is not None and not 0 <= self.on_demand_per_hour < math.inf:
            raise ConfigError(f"the on-demand price must be >= 0 dollars an hour, got {self.on_demand_per_hour!r}")
        if not self.pools:
            raise ConfigError("a job needs at least one pool")
        names = [p.name for p in self.pools]
        if len(set(names)) != len(names):
            raise ConfigError(f"pool names must be unique, got {names}")
        if self.deadline is not None and self.total_steps is None:
            raise ConfigError(
                "a deadline needs total_steps (how many steps the job runs) to project when it will finish"
            )
        if self.total_steps is not None and (
            isinstance(self.total_steps, bool) or not isinstance(self.total_steps, int) or self.total_steps < 1
        ):
            raise ConfigError(f"total_steps must be an integer >= 1, got {self.total_steps!r}")
        if not self.command:
            raise ConfigError("spotsafe run needs a command after --, e.g. spotsafe run -- python train.py")
        if not self.name or "/" in self.name:
            raise ConfigError(f"a job name must be non-empty and contain no '/', got {self.name!r}")
        if not self.grace_s >= 0:
            raise ConfigError(f"grace must be >= 0 seconds, got {self.grace_s!r}")
        if self.stall_timeout_s is not None and not self.stall_timeout_s > 0:
            raise ConfigError(f"the stall timeout must be > 0 seconds, got {self.stall_timeout_s!r}")


def on_demand_per_hour(config: RunConfig) -> float | None:
    """The hourly price the job's cost is compared with: as configured, else its cheapest on-demand pool's."""
    if config.on_demand_per_hour is not None:
        return config.on_demand_per_hour
    return min((pool.cost(3600.0) for pool in config.pools if not pool.spot), default=None)


def events_file(config: RunConfig) -> Path:
    """The local event log the supervisor writes: the run's own ``events.jsonl`` for a local run, else a
    spool file beside the job store (jobs launched on this machine append to it too)."""
    if protocol_of(config.url) == "file":
        return Path(config.url) / EVENTS_FILE
    return config.store.with_name(f"{config.store.name}.{config.name}.events.jsonl")


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
        launcher: Launcher | None = None,
        clock: Callable[[], float] = time.time,
        events: EventSink | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.say = say
        self._sleep = sleep
        self._clock = clock
        self._launcher = launcher or PoolLauncher()
        self._events = events
        self._metrics = metrics
        self._announced: set[tuple[str, str | None, float]] = set()
        self._rng = rng or random.Random()
        self._oom = oom_kills or oom_kill_counter()
        self._steps = steps
        self._output = output
        self._stop_signal: int | None = None
        self._job: Handle | None = None
        self._told = False
        self._events_file = events_file(config)

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
    def _emit(self, cls: type[ev.Event], **fields: object) -> None:
        event = cls(time=self._clock(), job=self.config.name, **fields)  # type: ignore[call-arg]
        if self._events is not None:
            self._events.emit(event)
        if self._metrics is not None:
            self._metrics.on_event(event)

    def run(self) -> int:
        config = self.config
        with contextlib.ExitStack() as stack:
            store = stack.enter_context(JobStore(config.store, clock=self._clock))
            stack.enter_context(store.claim(config.name))
            if self._events is None:
                identity = RunIdentity(run_id=config.name, attempt=0, pid=os.getpid())
                self._events = stack.enter_context(EventLog(self._events_file, identity))
            return self._run(store)

    def _run(self, store: JobStore) -> int:
        config = self.config
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

    def _health(self, store: JobStore, now: float) -> Health:
        """Scores from the attempts so far; announces each new exclusion once as an event."""
        health = Health(self.config.failover)
        health.extend(
            Outcome(a.ended, a.pool, a.machine, ExitClass(a.exit_class))
            for a in store.attempts(self.config.name)
            if a.ended is not None and a.exit_class
        )
        for pool in self.config.pools:
            for ex in [health.pool_exclusion(pool.name, now), *health.machine_exclusions(pool.name, now)]:
                key = (ex.pool, ex.machine, ex.until)
                if ex.until > now and key not in self._announced:
                    self._announced.add(key)
                    what = f"machine {ex.machine} of pool {ex.pool}" if ex.machine else f"pool {ex.pool}"
                    self.say(f"excluding {what} for {ex.until - now:.0f} s: {ex.reason}")
                    self._emit(
                        ev.Excluded, pool=ex.pool, machine=ex.machine, until=ex.until, score=ex.score, reason=ex.reason
                    )
        return health

    def _loop(self, store: JobStore, budget: Budget) -> int:
        config = self.config
        while True:
            if self._stop_signal is not None:
                return self._finish(store, STOPPED, "the supervisor was stopped by a signal; run it again to go on")
            now = self._clock()
            health = self._health(store, now)
            before = self._steps(config.url)
            projection = None
            if config.deadline is not None and config.total_steps is not None:
                rates = measure(store.attempts(config.name), now, before)
                projection = project(
                    deadline=config.deadline,
                    total_steps=config.total_steps,
                    rates=rates,
                    now=now,
                    slack=config.failover.deadline_slack,
                )
            decision = choose(
                config.pools,
                health,
                now=now,
                policy=config.failover,
                projection=projection,
                escalated=store.job(config.name).escalated,
            )
            if decision.newly_escalated and projection is not None:
                store.set_escalated(config.name)
                self.say(f"escalating to on-demand: {decision.reason}")
                self._emit(
                    ev.Escalated,
                    reason=decision.reason,
                    deadline=projection.deadline,
                    spot_finish=_finite(projection.spot_finish),
                    on_demand_finish=_finite(projection.on_demand_finish),
                )
            if decision.pool is None:
                self.say(f"no pool to run in: {decision.reason}; waiting {decision.wait_s:.0f} s")
                self._emit(ev.NoPoolAvailable, wait_s=decision.wait_s, reason=decision.reason)
                self._pause(decision.wait_s)
                continue
            pool = decision.pool
            self._emit(
                ev.PoolChosen,
                pool=pool.name,
                market=pool.market,
                price_per_hour=pool.price_per_hour,
                reason=decision.reason,
                escalated=decision.escalated,
                excluded=[e.pool for e in decision.excluded],
                deadline=config.deadline,
                spot_finish=_finite(projection.spot_finish) if projection else None,
                on_demand_finish=_finite(projection.on_demand_finish) if projection else None,
                on_demand_per_hour=on_demand_per_hour(config),
            )
            exclude = health.excluded_machines(pool.name, now)
            number = store.start_attempt(config.name, step_before=before, pool=pool.name)
            self._emit(
                ev.AttemptStarted,
                number=number,
                pool=pool.name,
                market=pool.market,
                price_per_hour=pool.price_per_hour,
                step_before=before,
                exclude=list(exclude),
                nodes=pool.nodes,
            )
            started = self._clock()
            code, exit_class, machine = self._attempt(store, number, pool, exclude)
            duration = self._clock() - started
            after = self._steps(config.url)
            cost = 0.0 if exit_class is ExitClass.NO_CAPACITY else pool.cost(duration)
            store.end_attempt(
                config.name,
                number,
                exit_code=code,
                exit_class=exit_class.value,
                step_after=after,
                cost=cost,
                machine=machine,
            )
            self._emit(
                ev.AttemptEnded,
                number=number,
                pool=pool.name,
                machine=machine,
                exit_code=code,
                exit_class=exit_class.value,
                step_before=before,
                step_after=after,
                duration_s=duration,
                cost=cost,
            )
            progressed = (after if after is not None else -1) > (before if before is not None else -1)
            self.say(
                f"attempt {number} in {pool.name}: {describe_exit(code)} -> {exit_class.value}; "
                f"checkpoint step {before} -> {after}; ${cost:.4f}"
            )
            if self._stop_signal is not None:
                return self._finish(store, STOPPED, f"stopped by a signal during attempt {number}")
            verdict = budget.after(exit_class, progressed=progressed, rng=self._rng)
            self._emit(ev.RetryDecided, relaunch=verdict.relaunch, delay_s=verdict.delay_s, reason=verdict.reason)
            if not verdict.relaunch:
                state = SUCCEEDED if exit_class is ExitClass.SUCCEEDED else FAILED
                self._finish(store, state, verdict.reason)
                if state == SUCCEEDED:
                    return EXIT_SUCCESS
                if exit_class is ExitClass.NO_USABLE_CHECKPOINT:
                    return EXIT_NO_USABLE_CHECKPOINT
                return EXIT_USAGE if exit_class is ExitClass.USAGE else EXIT_CRASH
            self.say(f"{verdict.reason}; next attempt in {verdict.delay_s:.1f} s")
            self._pause(verdict.delay_s)

    def _finish(self, store: JobStore, state: str, reason: str) -> int:
        store.finish_job(self.config.name, state, reason)
        self._emit(ev.JobFinished, state=state, reason=reason)
        self.say(f"job {self.config.name}: {state}: {reason}")
        return EXIT_PREEMPTED

    def _pause(self, seconds: float) -> None:
        deadline = self._clock() + seconds
        while self._stop_signal is None and self._clock() < deadline:
            self._sleep(min(POLL_S, max(0.0, deadline - self._clock())))

    def _attempt(
        self, store: JobStore, number: int, pool: Pool, exclude: tuple[str, ...]
    ) -> tuple[int, ExitClass, str | None]:
        config = self.config
        env = {
            "SPOTSAFE_CHECKPOINT_URL": config.url,
            "SPOTSAFE_RUN_ID": config.name,
            "SPOTSAFE_ATTEMPT": str(number),
            "SPOTSAFE_JOB_STORE": str(config.store),
            "SPOTSAFE_POOL": pool.name,
        }
        if protocol_of(config.url) != "file":
            env["SPOTSAFE_EVENTS_FILE"] = str(self._events_file)
        tail = EventTail(self._events_file)
        tail.poll()  # only what this attempt writes counts as its progress
        oom_before = self._oom()
        spec = LaunchSpec(
            job=config.name,
            attempt=number,
            url=config.url,
            command=config.command,
            env=env,
            pool=pool,
            exclude=exclude,
            output=self._output,
        )
        job = self._launcher.start(spec)
        self._told = False
        self._job = job
        if job.pid is not None:
            store.set_pid(config.name, number, job.pid)
        machine = job.machine
        stalled = False
        last_sign = self._clock()
        kill_at: float | None = None
        try:
            while (code := job.poll()) is None:
                now = self._clock()
                for logged in tail.poll():
                    if logged.run_id == config.name and logged.attempt == number:
                        last_sign = now
                        if machine is None and isinstance(logged.event, ev.RunStarted):
                            machine = logged.event.host
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
        if not stalled and self._stop_signal is None and code != 0 and job.no_capacity(code):
            return code, ExitClass.NO_CAPACITY, machine
        return code, classify(code, oom_kills=self._oom() - oom_before, stalled=stalled), machine

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


def _finite(value: float | None) -> float | None:
    return value if value is not None and value < float("inf") else None


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


def run_config(config: RunConfig, *, metrics_port: int | None = None, metrics_addr: str = "0.0.0.0") -> int:
    """What ``spotsafe run`` does once its configuration is known: supervise, return the exit code.
    ``metrics_port``: serve the supervisor's Prometheus metrics there while it runs."""
    metrics = None
    if metrics_port is not None:
        metrics = Metrics()
        try:
            port = metrics.serve(metrics_port, metrics_addr)
        except OSError as err:
            raise ConfigError(f"cannot serve metrics on {metrics_addr}:{metrics_port}: {err.strerror or err}") from None
        log.warning("spotsafe run: metrics on http://%s:%d/metrics", metrics_addr, port)
    try:
        return Supervisor(config, metrics=metrics).run()
    except (OSError, subprocess.SubprocessError) as err:
        raise SpotsafeError(f"could not run {' '.join(config.command)!r}: {err}") from err
    finally:
        if metrics is not None:
            metrics.close()
