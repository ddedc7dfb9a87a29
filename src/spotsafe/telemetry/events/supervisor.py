"""Events the supervisor writes (``spotsafe run`` and ``spotsafe drill``): its decisions about a job.

They belong to no attempt's timeline. Field names are part of the log format: add
fields, never rename them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from spotsafe.telemetry.events.base import AttemptEvent, Event, JobEvent, SupervisorEvent


@dataclass(frozen=True, kw_only=True)
class PoolChosen(JobEvent):
    """Where the next attempt runs, and why. ``spot_finish``/``on_demand_finish``: projected finish
    times (Unix) from the measured progress, when a deadline is set and enough is measured.
    ``on_demand_per_hour``: what the job would pay an hour in its cheapest on-demand pool (price x nodes),
    when it has one (the report's comparison)."""

    type: ClassVar[str] = "pool_chosen"
    pool: str
    market: str
    price_per_hour: float
    reason: str
    escalated: bool = False
    excluded: list[str] = dataclasses.field(default_factory=list)
    deadline: float | None = None
    spot_finish: float | None = None
    on_demand_finish: float | None = None
    on_demand_per_hour: float | None = None


@dataclass(frozen=True, kw_only=True)
class NoPoolAvailable(JobEvent):
    """Every pool that may be used is cooling down: the supervisor waits ``wait_s``."""

    type: ClassVar[str] = "no_pool_available"
    wait_s: float
    reason: str


@dataclass(frozen=True, kw_only=True)
class Excluded(JobEvent):
    """A pool (``machine`` None) or one machine of it is left out until ``until`` (Unix), with the reason."""

    type: ClassVar[str] = "excluded"
    pool: str
    machine: str | None
    until: float
    score: float
    reason: str


@dataclass(frozen=True, kw_only=True)
class Escalated(JobEvent):
    """The job moved to on-demand capacity because the projected finish passed the deadline."""

    type: ClassVar[str] = "escalated"
    reason: str
    deadline: float
    spot_finish: float | None
    on_demand_finish: float | None


@dataclass(frozen=True, kw_only=True)
class AttemptStarted(AttemptEvent):
    """An attempt was launched (``step_before``: the newest committed step then, ``None``: none)."""

    type: ClassVar[str] = "attempt_started"
    market: str
    price_per_hour: float
    step_before: int | None
    exclude: list[str] = dataclasses.field(default_factory=list)
    nodes: int = 1


@dataclass(frozen=True, kw_only=True)
class AttemptEnded(AttemptEvent):
    """One attempt's end: how it exited, the checkpoint step before and after, what it cost."""

    type: ClassVar[str] = "attempt_ended"
    machine: str | None
    exit_code: int | None
    exit_class: str
    step_before: int | None
    step_after: int | None
    duration_s: float
    cost: float


@dataclass(frozen=True, kw_only=True)
class RetryDecided(JobEvent):
    """After an attempt: relaunch after ``delay_s``, or end the job (``relaunch`` false)."""

    type: ClassVar[str] = "retry_decided"
    relaunch: bool
    delay_s: float
    reason: str


@dataclass(frozen=True, kw_only=True)
class JobFinished(JobEvent):
    """The job ended in ``state`` (why: ``reason``)."""

    type: ClassVar[str] = "job_finished"
    state: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class MarketInterruption(SupervisorEvent):
    """``spotsafe drill``: the emulated market took capacity away (``interrupted`` None: no attempt was
    running; else that attempt's number). ``killed``: the attempt outlived the notice window and got SIGKILL.
    A market of several nodes took ``nodes_taken`` of the attempt's nodes and offers ``nodes_left`` until the
    capacity is back (both 0 for a market of one machine)."""

    type: ClassVar[str] = "market_interruption"
    number: int
    mode: str
    interrupted: int | None
    window_s: float
    capacity_back_in_s: float
    killed: bool
    nodes_taken: int = 0
    nodes_left: int = 0


SUPERVISOR_EVENTS: tuple[type[Event], ...] = (
    PoolChosen,
    NoPoolAvailable,
    Excluded,
    Escalated,
    AttemptStarted,
    AttemptEnded,
    RetryDecided,
    JobFinished,
    MarketInterruption,
)
"""Every event type of this module, in the order of the log format's reference."""
