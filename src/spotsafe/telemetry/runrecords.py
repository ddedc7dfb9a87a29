"""The records of a run model (:mod:`.runmodel`): attempts, events stamped with their attempt, waits, interval choices.

See :mod:`spotsafe.telemetry.runmodel` for what each figure means; these are plain values the fold fills in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

from spotsafe.reasons import NOT_STOPPED
from spotsafe.telemetry import events as ev

E = TypeVar("E", bound=ev.Event)

# The supervisor's exit classes the fold tells apart (``spotsafe.supervisor.classify.ExitClass`` values).
SUCCEEDED, NO_CAPACITY = "succeeded", "no_capacity"
CAPACITY_TAKEN = frozenset({"preempted", "killed"})
"""Exit classes that are interruptions (the capacity was taken), not errors."""
UNANNOUNCED = "unannounced"


@dataclass(frozen=True)
class At(Generic[E]):
    """A job event and the number of the attempt it belongs to (``None``: before any attempt started)."""

    event: E
    attempt: int | None


@dataclass
class Gap:
    """Time outside attempts: launching the first, a restart, a backoff, a wait for capacity."""

    start: float
    end: float
    label: str


@dataclass(frozen=True)
class Breakdown:
    """Where a run's wall time went, in seconds (see :meth:`~spotsafe.telemetry.runmodel.RunModel.breakdown`).

    ``useful`` training, and the losses: ``replayed`` work, checkpoint ``stalls`` and ``restore`` (what spotsafe
    controls), process ``startup`` (launch, interpreter, imports, model build, the supervisor's relaunch),
    ``backoff`` (the relaunch budget's delays) and waiting for ``capacity``; ``other`` is the rest (the time
    from a notice to the exit, what the job did outside its steps)."""

    wall: float
    useful: float
    replayed: float
    stalls: float
    restore: float
    startup: float
    backoff: float
    capacity: float

    @property
    def other(self) -> float:
        known = self.useful + self.replayed + self.stalls + self.restore + self.startup + self.backoff + self.capacity
        return max(0.0, self.wall - known)

    @property
    def controlled(self) -> float:
        """The losses spotsafe controls: stalls, restore and replayed work."""
        return self.stalls + self.restore + self.replayed

    @property
    def goodput(self) -> float | None:
        return self.useful / self.wall if self.wall > 0 else None

    @property
    def goodput_controlled(self) -> float | None:
        """Goodput leaving out what spotsafe does not control: process start-up and waiting for capacity."""
        base = self.wall - self.startup - self.capacity
        return self.useful / base if base > 0 else None

    def parts(self) -> list[tuple[str, float]]:
        return [
            ("useful", self.useful),
            ("replayed", self.replayed),
            ("checkpoint stalls", self.stalls),
            ("restore", self.restore),
            ("start-up", self.startup),
            ("backoff", self.backoff),
            ("waiting for capacity", self.capacity),
            ("other", self.other),
        ]


@dataclass
class IntervalChoice:
    """A save policy's interval, kept when it changed (every attempt announces its policies again)."""

    time: float
    policy: str
    interval_s: float | None
    interval_steps: int | None
    reason: str


@dataclass
class Attempt:
    """One attempt (see the module's definitions). ``start``/``end`` are Unix times of its first and last event."""

    number: int
    pid: int
    start: float
    end: float
    silent: bool = False
    launched_at: float | None = None
    """When the supervisor launched it (its ``attempt_started``), when supervised."""
    pool: str | None = None
    market: str | None = None
    rate: float | None = None
    """Dollars per second while it runs (its pool's price per hour times nodes), when the supervisor said."""
    outcome: str | None = None
    exited: str | None = None
    """The job's own ``run_exited`` reason (``outcome`` falls back to the supervisor's exit class)."""
    exit_step: int | None = None
    notice: ev.NoticeReceived | None = None
    """The first stop notice it received: the interruption's source."""
    restored_step: int | None = None
    restored_at: float | None = None
    first_restored_at: float | None = None
    first_progress_at: float | None = None
    """The first ``progress`` after its restore."""
    last_step: int | None = None
    furthest_step: int | None = None
    replayed_steps: int | None = None
    """Steps the next attempt redid after this one."""
    failed_resume: bool = False
    committed_steps: set[int] = field(default_factory=set)
    """Steps it could stop at without losing work (committed, restored, or 0 after a fresh start)."""
    series: list[tuple[float, int]] = field(default_factory=list)
    """``(time, step)`` of every step it reported (progress, restore, commit, exit), in order."""
    progress_span: tuple[tuple[float, int], tuple[float, int]] | None = None
    """Its first and last ``progress`` event's ``(time, step)``."""

    @property
    def source(self) -> str | None:
        return self.notice.source if self.notice is not None else None

    @property
    def stopped(self) -> bool:
        """It did not finish (nor fail on its own). Only meaningful once it ended."""
        return self.outcome not in NOT_STOPPED

    @property
    def step_time_s(self) -> float | None:
        if self.progress_span is None:
            return None
        (t0, s0), (t1, s1) = self.progress_span
        return (t1 - t0) / (s1 - s0) if s1 > s0 else None
