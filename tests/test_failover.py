"""Capacity-pool failover and on-demand escalation, driven by an injected clock and a fake launcher.

No real processes run here: :class:`FakeLauncher` hands the supervisor handles whose exit code and
duration (in fake seconds) are scripted per pool, and advances the job's "newest committed step" as
attempts end. The supervisor's ``sleep`` advances :class:`FakeClock`, so hours of simulated time take
milliseconds.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from spotsafe.errors import ConfigError
from spotsafe.supervisor.classify import ExitClass
from spotsafe.supervisor.health import PRESETS, FailoverPolicy, Health, Outcome, preset, with_overrides
from spotsafe.supervisor.planner import Rates, choose, measure, project
from spotsafe.supervisor.pools import ON_DEMAND, LaunchSpec, Pool
from spotsafe.supervisor.retry import RelaunchPolicy
from spotsafe.supervisor.run import RunConfig, Supervisor
from spotsafe.supervisor.store import AttemptRecord, JobRecord, JobState, JobStore
from spotsafe.telemetry import events as ev

T0 = 1_000_000.0
NO_BACKOFF = RelaunchPolicy(initial_s=0.0, max_delay_s=0.0)
STANDARD = PRESETS["standard"].failover
NO_CAPACITY_CODE = 3
E = TypeVar("E", bound=ev.Event)


# -- the fake world ---------------------------------------------------------------------------------


class Runaway(Exception):
    """The simulation went on far longer than any test needs (a loop that never ends)."""


class FakeClock:
    def __init__(self, start: float = T0, limit_s: float = 30 * 86400.0) -> None:
        self.t = start
        self._limit = start + limit_s

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0, seconds
        self.t += seconds
        if self.t > self._limit:
            raise Runaway(f"fake clock ran past {self._limit}")


@dataclass(frozen=True)
class Script:
    """One attempt's fate: exit ``code`` after ``after`` fake seconds on ``machine``.

    When it ends the checkpoint advances by ``gain`` steps (or is set to ``to``). ``no_capacity``: the
    handle says the exit code means the pool had no machine."""

    code: int
    after: float = 100.0
    machine: str | None = None
    gain: int = 0
    to: int | None = None
    no_capacity: bool = False


def reclaimed(after: float = 100.0, gain: int = 10, machine: str | None = None) -> Script:
    return Script(75, after, machine, gain=gain)


def succeeds(after: float = 100.0, to: int | None = None, machine: str | None = None) -> Script:
    return Script(0, after, machine, to=to)


def no_capacity(after: float = 30.0) -> Script:
    return Script(NO_CAPACITY_CODE, after, None, no_capacity=True)


Behaviour = Callable[[LaunchSpec, int], Script]
"""(the launch spec, how many attempts this pool had before) -> the attempt's script."""


class FakeHandle:
    def __init__(self, launcher: FakeLauncher, script: Script) -> None:
        self._launcher = launcher
        self._script = script
        self._started = launcher.clock.now()
        self._code: int | None = None
        self.signals: list[tuple[int, bool]] = []

    @property
    def pid(self) -> int | None:
        return None

    @property
    def machine(self) -> str | None:
        return self._script.machine

    def poll(self) -> int | None:
        if self._code is None and self._launcher.clock.now() - self._started >= self._script.after - 1e-6:
            self._launcher.advance(self._script)
            self._code = self._script.code
        return self._code

    def signal(self, sig: int, *, group: bool = False) -> None:
        self.signals.append((sig, group))

    def reap_group(self) -> None:
        pass

    def no_capacity(self, code: int) -> bool:
        return self._script.no_capacity and code == self._script.code


class FakeLauncher:
    """Starts scripted attempts. ``plan``: per pool, the scripts of its attempts in order (the last one
    repeats), or a :data:`Behaviour`."""

    def __init__(
        self,
        clock: FakeClock,
        plan: Mapping[str, Sequence[Script]] | Behaviour,
        *,
        step: int | None = None,
        max_attempts: int = 60,
    ) -> None:
        self.clock = clock
        self.plan = plan
        self.step = step
        self.specs: list[LaunchSpec] = []
        self.handles: list[FakeHandle] = []
        self.started_at: list[float] = []
        self._per_pool: Counter[str] = Counter()
        self._max = max_attempts

    def start(self, spec: LaunchSpec) -> FakeHandle:
        if len(self.specs) >= self._max:
            raise Runaway(f"more than {self._max} attempts")
        name = spec.pool.name
        index = self._per_pool[name]
        self._per_pool[name] += 1
        if callable(self.plan):
            script = self.plan(spec, index)
        else:
            scripts = self.plan[name]
            script = scripts[min(index, len(scripts) - 1)]
        self.specs.append(spec)
        self.started_at.append(self.clock.now())
        handle = FakeHandle(self, script)
        self.handles.append(handle)
        return handle

    def advance(self, script: Script) -> None:
        if script.to is not None:
            self.step = script.to
        elif script.gain:
            self.step = (self.step if self.step is not None else 0) + script.gain

    def steps(self, url: str) -> int | None:
        return self.step

    @property
    def pools(self) -> list[str]:
        return [s.pool.name for s in self.specs]


class Sink:
    def __init__(self) -> None:
        self.events: list[ev.Event] = []

    def emit(self, event: ev.Event) -> None:
        self.events.append(event)

    def of(self, cls: type[E]) -> list[E]:
        return [e for e in self.events if isinstance(e, cls)]

    @property
    def types(self) -> list[str]:
        return [e.type for e in self.events]


@dataclass
class Result:
    code: int
    launcher: FakeLauncher
    sink: Sink
    lines: list[str]
    attempts: list[AttemptRecord]
    job: JobRecord
    clock: FakeClock
    began: float


def supervise(
    tmp_path: Path,
    pools: Sequence[Pool],
    plan: Mapping[str, Sequence[Script]] | Behaviour,
    *,
    failover: FailoverPolicy = STANDARD,
    retry: RelaunchPolicy = NO_BACKOFF,
    deadline_in: float | None = None,
    total_steps: int | None = None,
    clock: FakeClock | None = None,
    step: int | None = None,
    command: tuple[str, ...] = ("x",),
) -> Result:
    """Run one job to its end in the fake world; ``deadline_in``: seconds from the clock's now."""
    clock = clock or FakeClock()
    began = clock.now()
    launcher = FakeLauncher(clock, plan, step=step)
    sink = Sink()
    lines: list[str] = []
    config = RunConfig(
        name="job",
        command=command,
        url=str(tmp_path / "run"),
        store=tmp_path / "jobs.sqlite",
        pools=tuple(pools),
        failover=failover,
        retry=retry,
        deadline=None if deadline_in is None else began + deadline_in,
        total_steps=total_steps,
    )
    supervisor = Supervisor(
        config,
        launcher=launcher,
        clock=clock.now,
        sleep=clock.sleep,
        steps=launcher.steps,
        rng=random.Random(0),
        oom_kills=lambda: 0,
        events=sink,
        say=lines.append,
    )
    code = supervisor.run()
    with JobStore(config.store, clock=clock.now) as store:
        attempts = store.attempts("job")
        job = store.job("job")
    return Result(code, launcher, sink, lines, attempts, job, clock, began)


def spot(name: str, price: float, nodes: int = 1) -> Pool:
    return Pool(name=name, price_per_hour=price, nodes=nodes)


def on_demand(name: str, price: float, nodes: int = 1) -> Pool:
    return Pool(name=name, market=ON_DEMAND, price_per_hour=price, nodes=nodes)


# -- 1. the first pool ------------------------------------------------------------------------------


def test_starts_in_the_cheapest_spot_pool_by_price_times_nodes(tmp_path: Path) -> None:
    pools = [on_demand("od", 0.5), spot("wide", 1.0, nodes=2), spot("narrow", 1.5), spot("dear", 3.0)]
    plan = {p.name: [succeeds(10)] for p in pools}
    r = supervise(tmp_path, pools, plan)
    assert r.code == 0
    assert r.launcher.pools == ["narrow"]  # 1.5 x 1 < 1.0 x 2 < 3.0; on-demand is not a candidate
    (chosen,) = r.sink.of(ev.PoolChosen)
    assert chosen.pool == "narrow" and chosen.market == "spot" and not chosen.escalated
    assert "cheapest healthy spot pool" in chosen.reason
    assert r.job.state == JobState.SUCCEEDED and not r.job.escalated
    assert r.launcher.specs[0].env["SPOTSAFE_POOL"] == "narrow"


# -- 2, 3. reclaims ---------------------------------------------------------------------------------


def test_a_pool_reclaimed_too_often_is_left_for_the_next_cheapest_and_used_again_after_the_cooldown(
    tmp_path: Path,
) -> None:
    pools = [spot("cheap", 1.0), spot("dear", 2.0), on_demand("od", 5.0)]
    plan = {
        "cheap": [reclaimed(100), reclaimed(100), reclaimed(100), succeeds(100, to=99)],
        "dear": [reclaimed(2000)],  # runs past the cheap pool's cool-down (30 min after its 3rd reclaim)
        "od": [succeeds(10)],
    }
    r = supervise(tmp_path, pools, plan)
    assert r.code == 0
    assert r.launcher.pools == ["cheap", "cheap", "cheap", "dear", "cheap"]

    (excluded,) = r.sink.of(ev.Excluded)
    assert excluded.pool == "cheap" and excluded.machine is None
    assert "reclaimed 3 times within an hour" in excluded.reason
    assert excluded.score == 0.0
    assert excluded.until == pytest.approx(r.began + 300 + STANDARD.cooldown_s, abs=1e-3)

    chosen = r.sink.of(ev.PoolChosen)
    assert [c.pool for c in chosen] == r.launcher.pools
    assert chosen[3].excluded == ["cheap"]
    assert "cheap excluded for 30.0 min" in chosen[3].reason and "reclaimed 3 times" in chosen[3].reason
    assert chosen[4].excluded == [] and "cheap excluded" not in chosen[4].reason
    assert r.launcher.started_at[4] == pytest.approx(r.began + 2300, abs=1e-3)
    # the excluded event comes before the pool that replaces it is chosen
    assert r.sink.events.index(excluded) < r.sink.events.index(chosen[3])
    assert not r.sink.of(ev.NoPoolAvailable) and not r.sink.of(ev.Escalated)


@pytest.mark.parametrize("with_on_demand", [False, True], ids=["spot-only", "with-on-demand"])
def test_the_only_spot_pool_keeps_the_job_when_reclaimed_over_and_over(tmp_path: Path, with_on_demand: bool) -> None:
    pools = [spot("only", 1.0)] + ([on_demand("od", 4.0)] if with_on_demand else [])
    plan = {"only": [reclaimed(100)] * 6 + [succeeds(100, to=99)], "od": [succeeds(10)]}
    r = supervise(tmp_path, pools, plan)
    assert r.code == 0 and r.job.state == JobState.SUCCEEDED
    assert r.launcher.pools == ["only"] * 7
    assert not r.sink.of(ev.NoPoolAvailable)
    assert r.clock.now() == pytest.approx(r.began + 700, abs=1e-3)  # no waiting at all
    assert any(e.pool == "only" for e in r.sink.of(ev.Excluded))
    stays = r.sink.of(ev.PoolChosen)[3]
    assert "staying in only" in stays.reason and stays.excluded == ["only"]


# -- 4. no capacity ---------------------------------------------------------------------------------


def test_no_capacity_uses_no_budget_costs_nothing_and_is_waited_for(tmp_path: Path) -> None:
    pools = [spot("only", 2.0)]
    plan = {"only": [no_capacity(30), no_capacity(30), succeeds(360)]}
    # one preemption or one error would end the job: no capacity must count as neither
    strict = RelaunchPolicy(max_preemptions=0, max_errors=1, initial_s=0.0, max_delay_s=0.0)
    r = supervise(tmp_path, pools, plan, retry=strict)
    assert r.code == 0 and r.job.state == JobState.SUCCEEDED
    assert r.launcher.pools == ["only"] * 3
    assert [a.exit_class for a in r.attempts] == ["no_capacity", "no_capacity", "succeeded"]
    assert [a.exit_code for a in r.attempts] == [NO_CAPACITY_CODE, NO_CAPACITY_CODE, 0]
    assert [a.cost for a in r.attempts] == [0.0, 0.0, pytest.approx(2.0 * 360 / 3600)]
    ended = r.sink.of(ev.AttemptEnded)
    assert [e.exit_class for e in ended] == ["no_capacity", "no_capacity", "succeeded"]
    assert [e.cost for e in ended][:2] == [0.0, 0.0]
    retries = r.sink.of(ev.RetryDecided)
    assert [d.relaunch for d in retries] == [True, True, False]

    (excluded,) = r.sink.of(ev.Excluded)
    assert excluded.pool == "only" and "no capacity twice in a row" in excluded.reason
    (waited,) = r.sink.of(ev.NoPoolAvailable)
    assert waited.wait_s == pytest.approx(STANDARD.cooldown_s, abs=1e-3)
    assert "out of capacity" in waited.reason
    # the third attempt started after the cool-down: 2 x 30 s of attempts + 30 min of waiting
    assert r.launcher.started_at[2] == pytest.approx(r.began + 60 + STANDARD.cooldown_s, abs=1e-3)
    types = r.sink.types
    assert types.index("no_pool_available") < len(types) - 1 - types[::-1].index("attempt_started")


def test_no_capacity_in_a_row_moves_the_job_to_the_next_spot_pool(tmp_path: Path) -> None:
    pools = [spot("cheap", 1.0), spot("dear", 2.0)]
    r = supervise(tmp_path, pools, {"cheap": [no_capacity(10)], "dear": [succeeds(50)]})
    assert r.code == 0
    assert r.launcher.pools == ["cheap", "cheap", "dear"]
    assert not r.sink.of(ev.NoPoolAvailable)
    assert [e.pool for e in r.sink.of(ev.Excluded)] == ["cheap"]


def test_a_non_capacity_exit_code_is_not_no_capacity(tmp_path: Path) -> None:
    # the handle says "no capacity" only for its own code; an ordinary crash stays a crash
    pools = [spot("only", 1.0)]
    crash = Script(1, 10.0, "m1", gain=5)
    r = supervise(tmp_path, pools, {"only": [crash, succeeds(10, to=99)]})
    assert [a.exit_class for a in r.attempts] == ["crashed", "succeeded"]
    assert r.attempts[0].cost == pytest.approx(10 / 3600)


# -- 5. machine health ------------------------------------------------------------------------------


def test_a_machine_that_keeps_crashing_is_excluded_from_the_next_launch(tmp_path: Path) -> None:
    def behaviour(spec: LaunchSpec, index: int) -> Script:
        if "m1" not in spec.exclude:
            return Script(1, 20.0, "m1")  # a bad machine: crashes without progress
        return succeeds(50, to=99, machine="m2")

    pools = [spot("only", 1.0)]
    r = supervise(tmp_path, pools, behaviour)  # max_errors=3: a third crash on m1 would end the job
    assert r.code == 0 and r.job.state == JobState.SUCCEEDED
    assert [s.exclude for s in r.launcher.specs] == [(), (), ("m1",)]
    assert [a.machine for a in r.attempts] == ["m1", "m1", "m2"]
    (excluded,) = r.sink.of(ev.Excluded)
    assert excluded.pool == "only" and excluded.machine == "m1"
    assert excluded.score == 0.0 and "2 failed attempts (crashed, crashed)" in excluded.reason
    assert [e.exclude for e in r.sink.of(ev.AttemptStarted)] == [[], [], ["m1"]]
    # a machine's errors do not exclude its pool
    assert all(not c.excluded for c in r.sink.of(ev.PoolChosen))


# -- 6, 7. deadlines --------------------------------------------------------------------------------

SLOW_SPOT = {
    # no machine for 50 s, then reclaimed after only 10 steps in 100 s: ~15 steps per 150 s overall
    "cheap": [no_capacity(50), reclaimed(100, gain=10), reclaimed(100, gain=10), succeeds(100, to=199)],
    # on-demand: a crash after progress, then done
    "od": [Script(1, 100.0, "od-1", gain=100), succeeds(100, to=199, machine="od-2")],
}


def test_slow_spot_progress_escalates_to_on_demand_and_stays_there(tmp_path: Path) -> None:
    pools = [spot("cheap", 1.0), on_demand("od", 4.0)]
    r = supervise(tmp_path, pools, SLOW_SPOT, deadline_in=2500, total_steps=200)
    assert r.code == 0 and r.job.state == JobState.SUCCEEDED
    assert r.launcher.pools == ["cheap", "cheap", "od", "od"]
    assert r.job.escalated

    (escalated,) = r.sink.of(ev.Escalated)
    # at +150 s: 10 steps in 150 s overall (0.0667/s), 10 in 100 s held (0.1/s); 189 steps left
    assert escalated.deadline == pytest.approx(r.began + 2500)
    assert escalated.spot_finish == pytest.approx(r.began + 150 + 189 * 15, abs=1e-2)
    assert escalated.on_demand_finish == pytest.approx(r.began + 150 + 1890, abs=1e-2)
    assert "deadline at risk" in escalated.reason
    chosen = r.sink.of(ev.PoolChosen)
    assert [c.escalated for c in chosen] == [False, False, True, True]
    assert r.sink.events.index(escalated) < r.sink.events.index(chosen[2])
    # after the crash on on-demand the projection is comfortable again, but escalation is sticky
    assert "escalated earlier" in chosen[3].reason
    assert chosen[3].spot_finish is not None and chosen[3].spot_finish < r.began + 2500


def test_escalation_survives_a_new_supervisor(tmp_path: Path) -> None:
    pools = [spot("cheap", 1.0), on_demand("od", 4.0)]
    first = supervise(tmp_path, pools, SLOW_SPOT, deadline_in=2500, total_steps=200)
    assert first.job.escalated
    # the same job again, even without a deadline: it stays on on-demand
    again = supervise(
        tmp_path,
        pools,
        {"cheap": [succeeds(10, to=199)], "od": [succeeds(10, to=199)]},
        clock=first.clock,
        step=first.launcher.step,
    )
    assert again.code == 0
    assert again.launcher.pools == ["od"]
    (chosen,) = again.sink.of(ev.PoolChosen)
    assert chosen.escalated and "escalated earlier" in chosen.reason
    assert not again.sink.of(ev.Escalated)
    assert again.job.escalated


def test_fast_spot_progress_does_not_escalate(tmp_path: Path) -> None:
    pools = [spot("cheap", 1.0), on_demand("od", 4.0)]
    plan = {
        "cheap": [reclaimed(100, gain=80), reclaimed(100, gain=80), succeeds(100, to=199)],
        "od": [succeeds(10, to=199)],
    }
    r = supervise(tmp_path, pools, plan, deadline_in=2500, total_steps=200)
    assert r.code == 0
    assert r.launcher.pools == ["cheap"] * 3
    assert not r.sink.of(ev.Escalated) and not r.job.escalated
    chosen = r.sink.of(ev.PoolChosen)
    assert all(not c.escalated and "deadline at risk" not in c.reason for c in chosen)
    later = chosen[1]
    assert later.deadline == pytest.approx(r.began + 2500)
    assert later.spot_finish is not None and later.spot_finish < r.began + 2500


def test_opportunistic_never_escalates_but_says_the_deadline_is_at_risk(tmp_path: Path) -> None:
    pools = [spot("cheap", 1.0), on_demand("od", 4.0)]
    failover = PRESETS["opportunistic"].failover
    r = supervise(tmp_path, pools, SLOW_SPOT, failover=failover, deadline_in=2500, total_steps=200)
    assert r.code == 0
    assert r.launcher.pools == ["cheap"] * 4
    assert not r.sink.of(ev.Escalated) and not r.job.escalated
    chosen = r.sink.of(ev.PoolChosen)
    assert not any(c.escalated for c in chosen)
    risky = [c for c in chosen if "deadline at risk" in c.reason]
    assert risky, [c.reason for c in chosen]
    assert all("not escalating: this job is opportunistic" in c.reason for c in risky)


def test_standard_without_an_on_demand_pool_says_so(tmp_path: Path) -> None:
    r = supervise(tmp_path, [spot("cheap", 1.0)], SLOW_SPOT, deadline_in=2500, total_steps=200)
    assert r.code == 0 and not r.sink.of(ev.Escalated) and not r.job.escalated
    assert any("no on-demand pool to use" in c.reason for c in r.sink.of(ev.PoolChosen))


def test_critical_runs_on_demand_while_every_spot_pool_is_excluded(tmp_path: Path) -> None:
    critical = PRESETS["critical"].failover  # leaves a pool after 2 reclaims, for 2 hours
    pools = [spot("cheap", 1.0), on_demand("od", 4.0)]
    plan = {
        "cheap": [reclaimed(100), reclaimed(100), succeeds(100, to=99)],
        "od": [Script(1, 7300.0, "od-1", gain=10)],  # outlasts the cool-down, then crashes after progress
    }
    r = supervise(tmp_path, pools, plan, failover=critical)
    assert r.code == 0
    assert r.launcher.pools == ["cheap", "cheap", "od", "cheap"]
    chosen = r.sink.of(ev.PoolChosen)
    assert "runs on-demand rather than wait" in chosen[2].reason and chosen[2].excluded == ["cheap"]
    assert not chosen[2].escalated  # not a deadline escalation: not sticky
    assert not r.sink.of(ev.Escalated) and not r.job.escalated
    assert not r.sink.of(ev.NoPoolAvailable)


def test_critical_runs_on_demand_when_spot_has_no_capacity(tmp_path: Path) -> None:
    pools = [spot("cheap", 1.0), on_demand("od", 4.0)]
    plan = {"cheap": [no_capacity(10)], "od": [succeeds(10)]}
    r = supervise(tmp_path, pools, plan, failover=PRESETS["critical"].failover)
    assert r.launcher.pools == ["cheap", "od"]  # capacity_failures=1
    assert not r.sink.of(ev.NoPoolAvailable)


# -- 8. cost ----------------------------------------------------------------------------------------


def test_cost_per_attempt_is_price_times_nodes_times_hours(tmp_path: Path) -> None:
    pools = [spot("flaky", 0.5), spot("main", 2.0, nodes=3)]
    plan = {
        "flaky": [no_capacity(30)],
        "main": [reclaimed(600, machine="a"), succeeds(1200, to=99, machine="b")],
    }
    r = supervise(tmp_path, pools, plan)
    assert r.code == 0
    assert [a.pool for a in r.attempts] == ["flaky", "flaky", "main", "main"]
    assert [a.machine for a in r.attempts] == [None, None, "a", "b"]
    expected = [0.0, 0.0, 2.0 * 3 * 600 / 3600, 2.0 * 3 * 1200 / 3600]  # $1 and $2
    assert [a.cost for a in r.attempts] == pytest.approx(expected, abs=1e-6)
    ended = r.sink.of(ev.AttemptEnded)
    assert [e.cost for e in ended] == pytest.approx(expected, abs=1e-6)
    assert [e.duration_s for e in ended] == pytest.approx([30, 30, 600, 1200], abs=1e-3)
    assert [e.machine for e in ended] == [None, None, "a", "b"]
    durations = [a.ended - a.started for a in r.attempts if a.ended is not None]
    assert durations == pytest.approx([30, 30, 600, 1200], abs=1e-3)
    started = r.sink.of(ev.AttemptStarted)
    assert [(s.pool, s.price_per_hour, s.market) for s in started][2:] == [("main", 2.0, "spot")] * 2


# -- 9. planner and health, pure --------------------------------------------------------------------


def attempt(
    number: int,
    started: float,
    ended: float | None,
    exit_class: str | None,
    before: int | None,
    after: int | None,
    pool: str = "p",
) -> AttemptRecord:
    return AttemptRecord("job", number, pool, "host", None, started, ended, None, exit_class, before, after, None)


def test_measure_counts_held_time_and_whole_life() -> None:
    attempts = [
        attempt(1, 0.0, 100.0, "preempted", None, 10),
        attempt(2, 110.0, 210.0, "preempted", 10, 30),
        attempt(3, 220.0, 230.0, "no_capacity", 30, 30),  # no machine held: not in the step rate
    ]
    rates = measure(attempts, 300.0, 30)
    assert rates.step_rate == pytest.approx(30 / 200)
    assert rates.effective_rate == pytest.approx(30 / 300)
    assert rates.done == 30


def test_measure_without_finished_attempts_measures_nothing() -> None:
    assert measure([], 10.0, None) == Rates(None, None, None)
    assert measure([attempt(1, 0.0, None, None, None, None)], 10.0, 5) == Rates(None, None, 5)
    only_no_capacity = [attempt(1, 0.0, 10.0, "no_capacity", None, None)]
    assert measure(only_no_capacity, 20.0, None) == Rates(None, None, None)


def test_measure_ignores_a_checkpoint_that_went_backwards() -> None:
    attempts = [attempt(1, 0.0, 100.0, "crashed", 50, 40), attempt(2, 100.0, 200.0, "preempted", 40, 60)]
    rates = measure(attempts, 200.0, 60)
    assert rates.step_rate == pytest.approx(20 / 200)
    assert rates.effective_rate == pytest.approx(10 / 200)


def test_project_against_the_deadline_with_slack() -> None:
    rates = Rates(step_rate=0.15, effective_rate=0.1, done=30)
    ok = project(deadline=2300.0, total_steps=131, rates=rates, now=300.0, slack=0.1)
    assert ok.remaining == 100
    assert ok.limit == pytest.approx(2100.0)
    assert ok.spot_finish == pytest.approx(1300.0)
    assert ok.on_demand_finish == pytest.approx(300.0 + 100 / 0.15)
    assert not ok.at_risk and "before the limit" in ok.reason

    tight = project(deadline=1350.0, total_steps=131, rates=rates, now=300.0, slack=0.1)
    assert tight.limit == pytest.approx(1245.0) and tight.at_risk and "after the limit" in tight.reason
    no_slack = project(deadline=1350.0, total_steps=131, rates=rates, now=300.0, slack=0.0)
    assert no_slack.limit == pytest.approx(1350.0) and not no_slack.at_risk


def test_project_edge_cases() -> None:
    done = project(deadline=10.0, total_steps=100, rates=Rates(0.1, 0.1, 99), now=50.0, slack=0.1)
    assert done.remaining == 0 and not done.at_risk and done.reason == "the work is done"
    unmeasured = Rates(None, None, None)
    early = project(deadline=1000.0, total_steps=100, rates=unmeasured, now=0.0, slack=0.5)
    assert early.remaining == 100 and early.spot_finish is None and not early.at_risk
    late = project(deadline=1000.0, total_steps=100, rates=unmeasured, now=1001.0, slack=0.5)
    assert late.at_risk
    stuck = project(deadline=1000.0, total_steps=100, rates=Rates(0.0, 0.0, 5), now=0.0, slack=0.1)
    assert stuck.spot_finish == math.inf and stuck.on_demand_finish is None and stuck.at_risk


def test_choose_breaks_ties_by_total_price_then_name() -> None:
    health = Health(STANDARD)
    pools = [on_demand("od", 0.1), spot("b", 1.0, nodes=2), spot("a", 2.0), spot("c", 0.7, nodes=3)]
    d = choose(pools, health, now=0.0, policy=STANDARD, projection=None, escalated=False)
    assert d.pool is not None and d.pool.name == "a"  # a and b both $2/h: by name; c is $2.1/h
    assert not d.escalated and not d.newly_escalated and d.excluded == []
    ods = [on_demand("z", 3.0), on_demand("y", 1.5, nodes=2), spot("s", 0.1)]
    e = choose(ods, health, now=0.0, policy=STANDARD, projection=None, escalated=True)
    assert e.pool is not None and e.pool.name == "y" and e.escalated and not e.newly_escalated


def test_choose_escalates_only_when_at_risk_and_allowed() -> None:
    health = Health(STANDARD)
    pools = [spot("s", 1.0), on_demand("od", 4.0)]
    risky = project(deadline=100.0, total_steps=1000, rates=Rates(0.1, 0.1, 0), now=0.0, slack=0.1)
    assert risky.at_risk
    d = choose(pools, health, now=0.0, policy=STANDARD, projection=risky, escalated=False)
    assert d.pool is not None and d.pool.name == "od" and d.escalated and d.newly_escalated
    never = with_overrides(STANDARD, escalate=False)
    n = choose(pools, health, now=0.0, policy=never, projection=risky, escalated=False)
    assert n.pool is not None and n.pool.name == "s" and not n.escalated and "not escalating" in n.reason


def test_health_scores_and_pool_exclusion_by_reclaims() -> None:
    health = Health(STANDARD)  # 3 reclaims within an hour, cool-down 30 min
    fresh = health.pool_exclusion("p", 0.0)
    assert fresh.score == 1.0 and fresh.until == -math.inf and fresh.reason == ""
    health.add(Outcome(0.0, "p", "m", ExitClass.PREEMPTED))
    assert health.pool_exclusion("p", 1.0).score == pytest.approx(2 / 3)
    health.add(Outcome(10.0, "p", "m", ExitClass.KILLED))
    health.add(Outcome(15.0, "p", "m", ExitClass.SUCCEEDED))  # does not count
    health.add(Outcome(20.0, "q", "m", ExitClass.PREEMPTED))  # another pool
    assert health.pool_exclusion("p", 21.0).score == pytest.approx(1 / 3)
    health.add(Outcome(30.0, "p", "m", ExitClass.PREEMPTED))
    out = health.pool_exclusion("p", 31.0)
    assert out.score == 0.0 and out.until == 30.0 + 1800.0 and not out.no_capacity
    assert out.key == ("p", None) and "3 times" in out.reason
    assert health.pool_exclusion("p", 1830.0 - 1e-6).until > 1830.0 - 1e-6
    assert health.pool_exclusion("p", 1830.0).until <= 1830.0  # cool-down over
    # the window slides: at +3600.5 the first reclaim (t=0) has left it
    later = health.pool_exclusion("p", 3600.5)
    assert later.score == pytest.approx(1 / 3) and later.until == -math.inf
    assert health.pool_exclusion("q", 31.0).score == pytest.approx(2 / 3)


def test_health_capacity_failures_count_in_a_row_only() -> None:
    health = Health(STANDARD)  # 2 without capacity in a row
    health.add(Outcome(0.0, "p", None, ExitClass.NO_CAPACITY))
    assert health.pool_exclusion("p", 1.0).score == pytest.approx(0.5)
    health.add(Outcome(5.0, "q", None, ExitClass.SUCCEEDED))  # another pool does not break the run
    health.add(Outcome(10.0, "p", None, ExitClass.NO_CAPACITY))
    out = health.pool_exclusion("p", 11.0)
    assert out.score == 0.0 and out.no_capacity and out.until == 10.0 + 1800.0
    assert out.reason == "no capacity twice in a row"
    health.add(Outcome(20.0, "p", "m", ExitClass.PREEMPTED))  # the pool gave a machine: the run is over
    reset = health.pool_exclusion("p", 21.0)
    assert reset.until == -math.inf and not reset.no_capacity
    assert reset.score == pytest.approx(2 / 3)  # one reclaim of three
    health.add(Outcome(30.0, "p", None, ExitClass.NO_CAPACITY))
    assert health.pool_exclusion("p", 31.0).score == pytest.approx(0.5)


def test_health_machine_errors() -> None:
    health = Health(STANDARD)  # 2 errors within an hour exclude a machine for 30 min
    health.add(Outcome(0.0, "p", "m1", ExitClass.CRASHED))
    health.add(Outcome(1.0, "p", "m2", ExitClass.PREEMPTED))  # not an error
    health.add(Outcome(2.0, "q", "m1", ExitClass.CRASHED))  # another pool's machine
    (one,) = health.machine_exclusions("p", 3.0)
    assert one.machine == "m1" and one.score == pytest.approx(0.5) and one.until == -math.inf
    assert health.excluded_machines("p", 3.0) == ()
    health.add(Outcome(10.0, "p", "m1", ExitClass.OUT_OF_MEMORY))
    (two,) = health.machine_exclusions("p", 11.0)
    assert two.score == 0.0 and two.until == 10.0 + 1800.0 and "crashed, out_of_memory" in two.reason
    assert health.excluded_machines("p", 11.0) == ("m1",)
    assert health.excluded_machines("q", 11.0) == ()
    assert health.excluded_machines("p", 1810.0) == ()  # cooled down
    assert health.pool_exclusion("p", 11.0).score == pytest.approx(2 / 3)  # errors do not hurt the pool


# -- 10. presets and validation ---------------------------------------------------------------------


def test_presets_are_ordered_by_criticality() -> None:
    assert list(PRESETS) == ["critical", "standard", "opportunistic"]
    c, s, o = (PRESETS[n].failover for n in ("critical", "standard", "opportunistic"))
    assert c.reclaims < s.reclaims < o.reclaims
    assert c.capacity_failures < s.capacity_failures < o.capacity_failures
    assert c.machine_errors < s.machine_errors < o.machine_errors
    assert c.deadline_slack > s.deadline_slack >= o.deadline_slack
    assert c.escalate and s.escalate and not o.escalate
    assert c.on_demand_when_spot_exhausted and not s.on_demand_when_spot_exhausted
    assert not o.on_demand_when_spot_exhausted
    assert PRESETS["standard"].failover == FailoverPolicy()
    for name, p in PRESETS.items():
        assert preset(name) is p and p.name == name and p.summary


def test_unknown_preset_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="critical, standard, opportunistic") as info:
        preset("bogus")
    assert "'bogus'" in str(info.value)


@pytest.mark.parametrize(
    "changes",
    [
        {"reclaims": 0},
        {"reclaims": True},
        {"reclaims": 1.5},
        {"capacity_failures": 0},
        {"machine_errors": -1},
        {"window_s": -1.0},
        {"window_s": math.inf},
        {"window_s": math.nan},
        {"cooldown_s": "10"},
        {"cooldown_s": False},
        {"deadline_slack": 1.0},
        {"deadline_slack": -0.1},
        {"deadline_slack": True},
        {"deadline_slack": math.nan},
    ],
)
def test_failover_policy_rejects_bad_values(changes: dict[str, Any]) -> None:
    (name,) = changes
    with pytest.raises(ConfigError, match=name):
        FailoverPolicy(**changes)
    with pytest.raises(ConfigError, match=name):
        with_overrides(STANDARD, **changes)


def test_failover_policy_accepts_edges() -> None:
    p = FailoverPolicy(reclaims=1, window_s=0, cooldown_s=0.0, deadline_slack=0.0)
    assert p.reclaims == 1 and p.window_s == 0


# -- bugs these tests found (fixed) ------------------------------------------------------------------


def test_capacity_failures_older_than_the_window_do_not_count() -> None:
    health = Health(STANDARD)  # window 1 h, 2 without capacity in a row
    health.add(Outcome(0.0, "p", None, ExitClass.NO_CAPACITY))
    assert health.pool_exclusion("p", 7200.0).score == 1.0  # the failure left the window
    health.add(Outcome(7200.0, "p", None, ExitClass.NO_CAPACITY))
    out = health.pool_exclusion("p", 7201.0)
    assert out.until <= 7201.0 and out.score == pytest.approx(0.5)


def test_a_stale_no_capacity_attempt_does_not_make_a_restarted_supervisor_wait(tmp_path: Path) -> None:
    with JobStore(tmp_path / "jobs.sqlite", clock=lambda: T0) as store:
        store.open_job("job", ("x",), str(tmp_path / "run"))
        number = store.start_attempt("job", step_before=None, pool="p")
        store.end_attempt("job", number, exit_code=NO_CAPACITY_CODE, exit_class="no_capacity", step_after=None)
    clock = FakeClock(start=T0 + 7200)  # two hours later: outside the one-hour window
    r = supervise(tmp_path, [spot("p", 1.0)], {"p": [no_capacity(10), succeeds(10)]}, clock=clock)
    assert r.code == 0
    assert not r.sink.of(ev.Excluded) and not r.sink.of(ev.NoPoolAvailable)
    assert r.clock.now() == pytest.approx(T0 + 7200 + 20, abs=1e-3)


def test_an_on_demand_only_job_waits_for_the_cooldown_in_one_go(tmp_path: Path) -> None:
    r = supervise(tmp_path, [on_demand("od", 3.0)], {"od": [no_capacity(10), no_capacity(10), succeeds(10)]})
    assert r.code == 0
    assert r.launcher.pools == ["od"] * 3
    waits = r.sink.of(ev.NoPoolAvailable)
    assert [w.wait_s for w in waits] == pytest.approx([STANDARD.cooldown_s], abs=1e-3)
    assert "spot" not in waits[0].reason


def test_an_escalated_job_stays_in_a_reclaimed_spot_pool_rather_than_wait(tmp_path: Path) -> None:
    pools = [spot("cheap", 1.0), on_demand("od", 4.0)]
    plan = {
        "cheap": [reclaimed(100, gain=10)] * 3 + [succeeds(100, to=999)],
        "od": [no_capacity(10)],
    }
    r = supervise(tmp_path, pools, plan, deadline_in=1000, total_steps=1000)
    assert len(r.sink.of(ev.Escalated)) == 1  # after the first reclaim the deadline is at risk
    assert r.launcher.pools[:6] == ["cheap", "od", "od", "cheap", "cheap", "cheap"]
    assert not r.sink.of(ev.NoPoolAvailable)  # a deadline at risk, and the job sits idle for ~27 min


def test_choose_escalated_with_every_pool_excluded_pure() -> None:
    """The pure form of the bug above, pinned as it behaves today where it is not in question: the
    wait is until the first cool-down ends (any market)."""
    health = Health(STANDARD)
    for t in (0.0, 10.0, 20.0):
        health.add(Outcome(t, "s", "m", ExitClass.PREEMPTED))
    health.add(Outcome(30.0, "od", None, ExitClass.NO_CAPACITY))
    health.add(Outcome(40.0, "od", None, ExitClass.NO_CAPACITY))
    pools = [spot("s", 1.0), on_demand("od", 4.0)]
    d = choose(pools, health, now=50.0, policy=STANDARD, projection=None, escalated=False)
    # not escalated: the reclaimed spot pool keeps the job
    assert d.pool is not None and d.pool.name == "s" and "staying in s" in d.reason
    assert sorted(e.pool for e in d.excluded) == ["od", "s"]
