"""``spotsafe drill``: run a job under an emulated spot market, and prove the result is what it would have been.

1. The reference: the job once, uninterrupted (reused when ``reference/`` holds
   a finished run of the same command; :mod:`spotsafe.supervisor.reference`).
2. The drill: the same job under ``spotsafe run``'s supervisor, in a spot pool
   whose capacity follows a :mod:`market <spotsafe.supervisor.market>` schedule
   (a real trace, time-scaled, or a rate). Each interruption is a notice on the
   emulated provider endpoint and/or SIGTERM, then SIGKILL when the window ends
   (``kill``: SIGKILL at once, no notice); an outage that finds no attempt running
   (between attempts, or one already being stopped) only takes capacity. While
   capacity is gone, attempts find none (``no_capacity``) and the supervisor
   backs off and tries again, as it would against a real zone.
3. The report, from the job store and the event log: whether the final state is
   bit-identical to the reference, interruptions (attempts the market stopped: the
   count ``spotsafe report`` and the dashboard give for the run), goodput (useful time over the
   drill's wall time, from its event log as ``spotsafe report`` computes it), steps
   replayed, and the cost on spot against on-demand.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from spotsafe.errors import ConfigError
from spotsafe.exit_codes import EXIT_SUCCESS
from spotsafe.storage.registry import open_storage
from spotsafe.supervisor.classify import ExitClass
from spotsafe.supervisor.drill_launch import DrillLauncher, drill_market, quiet_capacity
from spotsafe.supervisor.health import FailoverPolicy
from spotsafe.supervisor.market import (
    CITATION,
    MODES,
    Market,
    Outage,
    Trace,
    load_trace,
    outages_at_rate,
    outages_from_trace,
)
from spotsafe.supervisor.nodemarket import Level, NodeMarket, levels_at_rate, levels_from_trace
from spotsafe.supervisor.nodes import check_multinode, node_range
from spotsafe.supervisor.pools import Pool
from spotsafe.supervisor.reference import bit_identical, compare_final, ensure_reference
from spotsafe.supervisor.retry import RelaunchPolicy
from spotsafe.supervisor.run import RunConfig, Supervisor
from spotsafe.supervisor.store import JobStore
from spotsafe.telemetry.log import EVENTS_FILE, EventLog, RunIdentity
from spotsafe.telemetry.runmodel import RunModel
from spotsafe.telemetry.runrecords import Breakdown
from spotsafe.telemetry.store import read_run_events

JOB_NAME = "drill"
# Example prices, dollars per hour: an AWS p3.2xlarge (1x V100), on-demand list price and a typical spot price.
SPOT_PRICE, ON_DEMAND_PRICE = 0.918, 3.06
# The default market: us-west-2c from hour 16.8, where five preemptions come within 93 trace minutes
# (then the instance runs four hours), at 2 trace minutes per second (2.7 to 46 s into the drill).
DEFAULT_TRACE, DEFAULT_TRACE_START_H, DEFAULT_TIME_SCALE = "aws-us-west-2c", 16.8, 120.0


@dataclass(frozen=True, kw_only=True)
class DrillConfig:
    """One drill. ``trace`` (a shipped name or a path) or ``rate_per_hour`` sets the schedule;
    ``time_scale`` is trace seconds per drill second; ``trace_start_s`` where in the trace to begin."""

    command: tuple[str, ...]
    workdir: Path
    reference: Path | None = None
    trace: str | None = DEFAULT_TRACE
    trace_start_s: float = DEFAULT_TRACE_START_H * 3600.0
    trace_reading: str = "available"
    rate_per_hour: float | None = None
    time_scale: float = DEFAULT_TIME_SCALE
    mode: str = "aws"
    window_s: float = 10.0
    max_interruptions: int = 20
    spot_price: float = SPOT_PRICE
    on_demand_price: float = ON_DEMAND_PRICE
    seed: int = 0
    nodes: int | None = None
    """How many nodes the job runs on (``None``: a trace's node count, within the command's torchrun
    ``--nnodes``; 1 for a job that is not torchrun). Several: see :mod:`spotsafe.supervisor.nodemarket`."""

    def __post_init__(self) -> None:
        if not self.command:
            raise ConfigError("spotsafe drill needs the job's command after --")
        if (self.trace is None) == (self.rate_per_hour is None):
            raise ConfigError("give either a trace (--trace) or an interruption rate (--rate), not both or neither")
        for name in ("spot_price", "on_demand_price"):
            value = getattr(self, name)
            if not 0 <= value < float("inf"):
                raise ConfigError(f"{name} must be a number >= 0 (dollars per hour), got {value!r}")
        if self.max_interruptions < 0:
            raise ConfigError(f"max_interruptions must be >= 0, got {self.max_interruptions!r}")
        if self.mode not in MODES:
            raise ConfigError(f"the interruption mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 0 < self.window_s < float("inf"):
            raise ConfigError(f"the notice window must be > 0 seconds, got {self.window_s!r}")

    def node_count(self) -> int:
        """How many nodes the drill starts the job on (checked: several need torchrun with a rendezvous)."""
        found = node_range(self.command)
        count = self.nodes
        if count is None:
            count = load_trace(self.trace, self.trace_reading).nodes if self.trace is not None else 1
            count = 1 if found is None else max(found.min, min(count, found.max))
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"the drill's node count must be a whole number >= 1, got {count!r}")
        if count > 1:
            check_multinode(self.command, count)
        return count

    @property
    def reference_dir(self) -> Path:
        return self.reference if self.reference is not None else self.workdir / "reference"

    def schedule(self) -> tuple[list[Outage], str]:
        """The outages, and a description of where they come from."""
        if self.trace is not None:
            trace = load_trace(self.trace, self.trace_reading)
            outages = outages_from_trace(trace, start_s=self.trace_start_s, time_scale=self.time_scale)
            what = (
                f"trace {trace.name} ({_events_in(trace)} in {trace.duration_s / 86400:.1f} days; "
                f"read as '{trace.reading}') from {self.trace_start_s / 3600:g} h, {self.time_scale:g}x faster; "
                f"source: {CITATION}"
            )
            return outages, what
        assert self.rate_per_hour is not None
        outages = outages_at_rate(
            self.rate_per_hour, time_scale=self.time_scale, seed=self.seed, count=self.max_interruptions
        )
        return outages, f"{self.rate_per_hour:g} interruptions per hour, {self.time_scale:g}x faster (seed {self.seed})"

    def node_schedule(self, nodes: int) -> list[Level]:
        """The capacity levels for a job of ``nodes`` nodes (several; :mod:`~spotsafe.supervisor.nodemarket`)."""
        if self.trace is not None:
            trace = load_trace(self.trace, self.trace_reading)
            return levels_from_trace(trace, start_s=self.trace_start_s, time_scale=self.time_scale, nodes=nodes)
        assert self.rate_per_hour is not None
        return levels_at_rate(
            self.rate_per_hour, time_scale=self.time_scale, seed=self.seed, count=self.max_interruptions, nodes=nodes
        )


def _events_in(trace: Trace) -> str:
    if trace.nodes == 1:
        return f"{trace.preemptions} preemptions"
    falls = sum(1 for a, b in zip(trace.levels, trace.levels[1:], strict=False) if b < a)
    return f"{falls} falls in how many of its {trace.nodes} nodes run"


@dataclass
class DrillReport:
    schedule: str
    mode: str
    window_s: float
    exit_code: int
    job_state: str
    reference_seconds: float
    reference_reused: bool
    drill_seconds: float
    attempts: int
    no_capacity_attempts: int
    interruptions: int
    """Attempts the market stopped (each counted once): what ``spotsafe report`` and the dashboard count."""
    interruptions_idle: int
    """Outages that found no attempt running (between attempts, or one already being stopped)."""
    killed_at_window_end: int
    """Interrupted attempts that got SIGKILL: those that outlived the window (``kill``: all of them, at once)."""
    exit_classes: dict[str, int]
    emergency_saves: int
    checkpoints_committed: int
    steps_replayed: int
    machine_seconds: float
    spot_cost: float
    on_demand_cost: float
    spot_price: float
    on_demand_price: float
    final_step_reference: int | None
    final_step_drill: int | None
    component_diffs: dict[str, list[str]] = field(default_factory=dict)
    nodes: int = 1
    """The nodes the job runs on (the reference's, and each drill attempt's when the market offers them)."""
    node_counts: list[int] = field(default_factory=list)
    """The nodes each attempt that ran started on (a market of several nodes; empty for one)."""
    goodput: float = 0.0
    """Useful time over wall time, from the drill run's event log (as ``spotsafe report`` and the dashboard
    compute it: each attempt's time from its restore to its end, less the work the next one replayed and its
    checkpoint stalls)."""
    breakdown: Breakdown | None = None
    """Where the drill run's wall time went (as ``spotsafe report`` splits it)."""

    @property
    def identical(self) -> bool:
        return bit_identical(self.final_step_reference, self.final_step_drill, self.component_diffs)

    @property
    def resized(self) -> bool:
        """Some attempt ran on fewer nodes than the reference (another world size: the run cannot be bit-identical
        to a fixed-size one, whose sums run in another order over other splits of each batch)."""
        return any(n != self.nodes for n in self.node_counts)

    @property
    def ok(self) -> bool:
        """Finished, and bit-identical to the reference; a resized run: finished at the reference's final step."""
        if self.exit_code != EXIT_SUCCESS:
            return False
        same_end = self.final_step_reference is not None and self.final_step_reference == self.final_step_drill
        return self.identical or (self.resized and same_end)

    @property
    def saving(self) -> float:
        return 1.0 - self.spot_cost / self.on_demand_cost if self.on_demand_cost > 0 else 0.0

    def to_json(self) -> dict[str, object]:
        doc = {k: v for k, v in self.__dict__.items()}
        doc.update(identical=self.identical, ok=self.ok, saving=self.saving, resized=self.resized)
        b = self.breakdown
        doc["breakdown"] = None if b is None else {**dict(b.parts()), "wall": b.wall, "controlled": b.controlled}
        return doc


class DrillWatch(Protocol):
    """Told of the drill's phases as they begin and end (``spotsafe drill`` shows them live)."""

    def reference_started(self, folder: Path) -> None:
        """The reference run is about to start in ``folder`` (not called when a reference is reused)."""

    def reference_finished(self, folder: Path, seconds: float, reused: bool) -> None: ...

    def drill_started(self, run: Path, market: Market | NodeMarket) -> None:
        """The job is about to run under the supervisor in ``run``, against ``market``."""

    def drill_finished(self, code: int) -> None:
        """The supervisor returned ``code``."""


def run_drill(
    config: DrillConfig,
    *,
    log: Callable[[str], None] = print,
    watch: DrillWatch | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> DrillReport:
    """Run the whole drill in ``config.workdir`` (its drill folders are emptied first; the reference is kept).
    ``watch`` is told of each phase (for a live display); ``clock`` is the market's (its schedule's seconds)."""
    outages, what = config.schedule()
    nodes = config.node_count()
    levels = config.node_schedule(nodes) if nodes > 1 else []
    workdir = config.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    folder = config.reference_dir
    ref_s, reused = ensure_reference(
        config.command, folder, log, None if watch is None else lambda: watch.reference_started(folder), nodes=nodes
    )
    if watch is not None:
        watch.reference_finished(folder, ref_s, reused)
    run = workdir / "run"
    store_path = workdir / "jobs.sqlite"
    if run.exists():
        shutil.rmtree(run)
    for stale in workdir.glob("jobs.sqlite*"):
        stale.unlink()
    if nodes > 1:
        what += f"; the job on {nodes} nodes, capacity {len(levels) - 1} changes of node count"
    log(f"drill: {what}; interruptions by {config.mode}, window {config.window_s:g} s")
    pool = Pool(
        name="drill-spot", market="spot", price_per_hour=config.spot_price, zone=config.trace or "", nodes=nodes
    )
    run_config = RunConfig(
        name=JOB_NAME,
        command=config.command,
        url=str(run),
        store=store_path,
        # Every interruption is a preemption; the market decides when capacity comes back, so the supervisor
        # polls for it every second or two and never leaves its only pool.
        retry=RelaunchPolicy(max_preemptions=max(100, 2 * config.max_interruptions), initial_s=0.25, max_delay_s=2.0),
        failover=FailoverPolicy(cooldown_s=0.0),
        grace_s=config.window_s,
        pools=(pool,),
        on_demand_per_hour=config.on_demand_price,  # the report and the dashboard compare with it
    )
    identity = RunIdentity(run_id=JOB_NAME, attempt=0, pid=os.getpid())
    started = time.monotonic()
    with (
        open(workdir / "attempts.log", "ab") as output,
        EventLog(run / EVENTS_FILE, identity) as events,
        drill_market(config, outages, levels, nodes, log, events, clock) as market,
    ):
        supervisor = Supervisor(
            run_config,
            launcher=DrillLauncher(market, output.fileno()),
            events=events,
            output=output.fileno(),
            say=quiet_capacity(lambda line: log(f"supervisor: {line}")),
        )
        if watch is not None:
            watch.drill_started(run, market)
        code = supervisor.run()
        if watch is not None:
            watch.drill_finished(code)
    drill_s = time.monotonic() - started
    return _report(config, what, code, ref_s, reused, drill_s, run, store_path, market)


def _report(
    config: DrillConfig,
    what: str,
    code: int,
    ref_s: float,
    reused: bool,
    drill_s: float,
    run: Path,
    store_path: Path,
    market: Market | NodeMarket,
) -> DrillReport:
    with JobStore(store_path) as store:
        attempts = store.attempts(JOB_NAME)
        state = store.job(JOB_NAME).state
    classes: dict[str, int] = {}
    for a in attempts:
        if a.exit_class:
            classes[a.exit_class] = classes.get(a.exit_class, 0) + 1
    model = RunModel.fold(read_run_events(open_storage(str(run))), series=False)  # the figures the report gives
    nodes = market.nodes if isinstance(market, NodeMarket) else 1
    started = market.started if isinstance(market, NodeMarket) else {}
    held = sum(  # machine seconds: each attempt's time, times its nodes
        (a.ended - a.started) * started.get(a.number, 1)
        for a in attempts
        if a.ended is not None and a.exit_class != ExitClass.NO_CAPACITY.value
    )
    ref_step, drill_step, diffs = compare_final(config.reference_dir, run)
    return DrillReport(
        schedule=what,
        mode=config.mode,
        window_s=config.window_s,
        exit_code=code,
        job_state=state,
        reference_seconds=ref_s,
        reference_reused=reused,
        drill_seconds=drill_s,
        attempts=len(attempts),
        no_capacity_attempts=classes.get(ExitClass.NO_CAPACITY.value, 0),
        interruptions=market.delivered,
        interruptions_idle=len(market.interruptions) - market.delivered,
        killed_at_window_end=sum(1 for i in market.interruptions if i.killed),
        exit_classes=classes,
        emergency_saves=model.emergency_checkpoints,
        checkpoints_committed=len(model.checkpoints),
        steps_replayed=model.replayed_total,
        machine_seconds=held,
        spot_cost=sum(a.cost or 0.0 for a in attempts),
        on_demand_cost=config.on_demand_price * nodes * ref_s / 3600.0,
        spot_price=config.spot_price,
        on_demand_price=config.on_demand_price,
        final_step_reference=ref_step,
        final_step_drill=drill_step,
        component_diffs=diffs,
        nodes=nodes,
        node_counts=[market.started[n] for n in sorted(market.started)] if isinstance(market, NodeMarket) else [],
        goodput=model.goodput or 0.0,
        breakdown=model.breakdown(),
    )
