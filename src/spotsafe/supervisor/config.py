"""What one supervised job is: its command, where it checkpoints, its pools, budgets and deadline.

:class:`RunConfig` is frozen and validated when it is made (from ``spotsafe run``'s options, a
:mod:`job file <spotsafe.supervisor.jobfile>`, the drill or the demo); the
:class:`~spotsafe.supervisor.run.Supervisor` runs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from spotsafe.errors import ConfigError
from spotsafe.storage.registry import protocol_of
from spotsafe.supervisor.health import FailoverPolicy
from spotsafe.supervisor.pools import LOCAL_POOL, Pool
from spotsafe.supervisor.retry import RelaunchPolicy
from spotsafe.telemetry.log import EVENTS_FILE


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One supervised job. ``grace_s``: from a forwarded SIGTERM to SIGKILL. ``stall_timeout_s``: stop
    an attempt that reported no progress for that long (``None``: never)."""

    name: str
    command: tuple[str, ...]
    url: str
    store: Path
    retry: RelaunchPolicy = field(default_factory=RelaunchPolicy)
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
    events_file: Path | None = None
    """The local event log for a run on object storage, which its attempts mirror their events to (``None``: a
    spool beside the store). A local run's event log is its own ``events.jsonl``."""

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
        if self.events_file is not None and protocol_of(self.url) == "file":
            raise ConfigError(f"a local run's event log is its own {EVENTS_FILE}; events_file is for object storage")


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
    if config.events_file is not None:
        return config.events_file
    return config.store.with_name(f"{config.store.name}.{config.name}.events.jsonl")
