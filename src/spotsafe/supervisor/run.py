"""``spotsafe run``: launch a job, classify every exit, relaunch until it succeeds or a budget ends it.

Lifecycle of one supervised job (each attempt is a row in the :mod:`job store <spotsafe.supervisor.store>`)::

    claim the job (one supervisor per job) -> recover attempts a dead supervisor left running
    -> loop: health from the attempts so far -> choose a pool (planner: cheapest healthy spot pool,
             on-demand when the deadline is at risk; or wait for a cool-down to end)
             -> record the attempt -> launch it through the Launcher, in the pool, with the job contract
                (:class:`~spotsafe.jobenv.JobEnv`: checkpoint URL, run id, attempt number, job store, pool)
             -> wait (forwarding SIGTERM/SIGINT with a grace period; stopping a job that makes no progress)
             -> classify the exit, read the checkpoint step after it, record it with its machine and cost
             -> the relaunch budget decides (and ``stop_after``, when given): relaunch after a backoff,
                or end the job (:class:`~spotsafe.supervisor.store.JobState`: succeeded / failed)

One attempt (its environment, the wait, the classification) is :mod:`spotsafe.supervisor.attempt`.
Every launch of a job in spotsafe goes through this loop: ``spotsafe run``, the drill
(:class:`~spotsafe.supervisor.drill.DrillLauncher`), the demo's chaos run
(:class:`~spotsafe.supervisor.chaos.ChaosLauncher`) and their reference runs
(:mod:`spotsafe.supervisor.reference`).

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
import dataclasses
import logging
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from types import FrameType

from spotsafe.errors import ConfigError, SpotsafeError
from spotsafe.exit_codes import EXIT_CRASH, EXIT_NO_USABLE_CHECKPOINT, EXIT_PREEMPTED, EXIT_SUCCESS, EXIT_USAGE
from spotsafe.storage.registry import protocol_of
from spotsafe.supervisor.attempt import POLL_S, RunningAttempt, alive, attempt_env, recorded_exit, stop_session
from spotsafe.supervisor.classify import ExitClass, oom_kill_counter
from spotsafe.supervisor.config import RunConfig, events_file, on_demand_per_hour
from spotsafe.supervisor.health import Health, Outcome
from spotsafe.supervisor.nodes import NodeSizer
from spotsafe.supervisor.planner import choose, measure, project
from spotsafe.supervisor.pools import Launcher, LaunchSpec, Pool, PoolLauncher
from spotsafe.supervisor.process import describe_exit
from spotsafe.supervisor.retry import RelaunchBudget
from spotsafe.supervisor.steps import newest_step
from spotsafe.supervisor.store import AttemptRecord, JobState, JobStore
from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import EventLog, EventSink, RunIdentity, RunTail
from spotsafe.telemetry.metrics import Metrics

log = logging.getLogger("spotsafe")


class Supervisor:
    """Runs one job to the end. :meth:`run` returns the supervisor's own exit code:
    0 succeeded, 1 failed (a budget ended it), 2 usage error, 75 stopped by a signal (run again to go on).

    ``stop_after(number)`` is asked after attempt ``number`` when the budget would relaunch: a reason ends the
    job there, as failed (a reference run has one attempt; a chaos run ends when its schedule does)."""

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
        stop_after: Callable[[int], str | None] | None = None,
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
        self._stop_after = stop_after
        self._stop_signal: int | None = None
        self._running: RunningAttempt | None = None
        self._events_file = events_file(config)
        self._sizer = NodeSizer(config.command)

    # -- signals --------------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        first = self._stop_signal is None
        self._stop_signal = signum
        if self._running is not None:
            self._running.stop()  # the job saves and exits 75; a second signal is forwarded too
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
        budget = RelaunchBudget.replay(config.retry, history)
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
            if a.ended is not None and a.exit_class and a.number not in self._sizer.probes
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

    def _loop(self, store: JobStore, budget: RelaunchBudget) -> int:
        config = self.config
        while True:
            if self._stop_signal is not None:
                return self._finish(
                    store, JobState.STOPPED, "the supervisor was stopped by a signal; run it again to go on"
                )
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
            nodes = self._sizer.ask(pool)
            number = store.start_attempt(config.name, step_before=before, pool=pool.name)
            self._emit(
                ev.AttemptStarted,
                number=number,
                pool=pool.name,
                market=pool.market,
                price_per_hour=pool.price_per_hour,
                step_before=before,
                exclude=list(exclude),
                nodes=nodes,
            )
            started = self._clock()
            code, exit_class, machine = self._attempt(store, number, pool, exclude, nodes)
            duration = self._clock() - started
            after = self._steps(config.url)
            cost = 0.0 if exit_class is ExitClass.NO_CAPACITY else pool.cost(duration, nodes)
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
            where = pool.name if nodes == 1 else f"{pool.name} on {nodes} nodes"
            self.say(
                f"attempt {number} in {where}: {describe_exit(code)} -> {exit_class.value}; "
                f"checkpoint step {before} -> {after}; ${cost:.4f}"
            )
            if self._stop_signal is not None:
                return self._finish(store, JobState.STOPPED, f"stopped by a signal during attempt {number}")
            verdict = budget.after(exit_class, progressed=progressed, rng=self._rng)
            fewer = self._sizer.after(pool, nodes, exit_class is ExitClass.NO_CAPACITY, number)
            if fewer and verdict.relaunch:
                verdict = dataclasses.replace(verdict, delay_s=0.0, reason=fewer)  # fewer nodes rather than waiting
            if verdict.relaunch and self._stop_after is not None and (enough := self._stop_after(number)):
                verdict = dataclasses.replace(verdict, relaunch=False, delay_s=0.0, reason=enough)
            self._emit(ev.RetryDecided, relaunch=verdict.relaunch, delay_s=verdict.delay_s, reason=verdict.reason)
            if not verdict.relaunch:
                state = JobState.SUCCEEDED if exit_class is ExitClass.SUCCEEDED else JobState.FAILED
                self._finish(store, state, verdict.reason)
                if state is JobState.SUCCEEDED:
                    return EXIT_SUCCESS
                if exit_class is ExitClass.NO_USABLE_CHECKPOINT:
                    return EXIT_NO_USABLE_CHECKPOINT
                return EXIT_USAGE if exit_class is ExitClass.USAGE else EXIT_CRASH
            self.say(f"{verdict.reason}; next attempt in {verdict.delay_s:.1f} s")
            self._pause(verdict.delay_s)

    def _finish(self, store: JobStore, state: JobState, reason: str) -> int:
        store.finish_job(self.config.name, state, reason)
        self._emit(ev.JobFinished, state=state, reason=reason)
        self.say(f"job {self.config.name}: {state}: {reason}")
        return EXIT_PREEMPTED

    def _pause(self, seconds: float) -> None:
        deadline = self._clock() + seconds
        while self._stop_signal is None and self._clock() < deadline:
            self._sleep(min(POLL_S, max(0.0, deadline - self._clock())))

    def _attempt(
        self, store: JobStore, number: int, pool: Pool, exclude: tuple[str, ...], nodes: int
    ) -> tuple[int, ExitClass, str | None]:
        config = self.config
        spool = self._events_file if protocol_of(config.url) != "file" else None
        env = attempt_env(
            url=config.url, job=config.name, number=number, store=config.store, pool=pool.name, events_file=spool
        )
        tail = RunTail(self._events_file)
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
            nodes=nodes,
        )
        attempt = RunningAttempt(
            self._launcher.start(spec),
            job=config.name,
            number=number,
            tail=tail,
            clock=self._clock,
            sleep=self._sleep,
            say=self.say,
        )
        self._running = attempt
        if attempt.handle.pid is not None:
            store.set_pid(config.name, number, attempt.handle.pid)
        try:
            code, stalled = attempt.wait(
                stopping=lambda: self._stop_signal is not None,
                grace_s=config.grace_s,
                stall_timeout_s=config.stall_timeout_s,
            )
        finally:
            self._running = None
        stopped = self._stop_signal is not None
        exit_class = attempt.exit_class(code, stalled=stalled, stopped=stopped, oom_kills=self._oom() - oom_before)
        return code, exit_class, attempt.machine

    def _recover(self, store: JobStore) -> None:
        """Attempts a dead supervisor left without an end: wait for (or stop) their process, record them."""
        for attempt in store.unfinished(self.config.name):
            if attempt.pid is not None and alive(attempt.pid):
                self.say(f"attempt {attempt.number} (pid {attempt.pid}) outlived its supervisor: stopping it")
                stop_session(attempt.pid, self.config.grace_s, self._sleep)
            exit_class = recorded_exit(self._events_file, attempt.pid)
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


__all__ = ["RunConfig", "Supervisor", "events_file", "newest_step", "on_demand_per_hour", "run_config"]
