"""Typed telemetry events.

Every event is a frozen dataclass with a ``type`` name. On disk an event is one
JSON object per line: ``{"type": ..., "time": ..., "run_id": ..., "attempt": ...,
"pid": ..., <fields>}``. Reports are computed from these lines alone, so field
names are part of the format: add fields, never rename them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True, kw_only=True)
class Event:
    """Base of all events. ``time`` is Unix time in seconds (wall clock)."""

    type: ClassVar[str] = "event"
    time: float

    def fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True, kw_only=True)
class RunStarted(Event):
    """A process attached a checkpointer to the run."""

    type: ClassVar[str] = "run_started"
    url: str
    host: str | None = None
    """The machine the process runs on (its hostname): the supervisor's health scores key on it."""


@dataclass(frozen=True, kw_only=True)
class RunExited(Event):
    """The process is about to exit on purpose (``reason``: finished or preempted)."""

    type: ClassVar[str] = "run_exited"
    reason: str
    step: int
    exit_code: int


@dataclass(frozen=True, kw_only=True)
class Progress(Event):
    """The training loop completed ``step`` (throttled; see ``progress_interval``)."""

    type: ClassVar[str] = "progress"
    step: int
    epoch: int


@dataclass(frozen=True, kw_only=True)
class SaveStarted(Event):
    """A checkpoint save began. ``reason``: interval, notice, final or manual."""

    type: ClassVar[str] = "save_started"
    step: int
    reason: str


@dataclass(frozen=True, kw_only=True)
class SaveCommitted(Event):
    """A checkpoint is durable and visible: its manifest was committed."""

    type: ClassVar[str] = "save_committed"
    step: int
    checkpoint: str
    reason: str
    bytes: int
    blobs: int
    stall_s: float
    duration_s: float
    written_bytes: int | None = None
    """Bytes this save wrote (``bytes`` counts shared blobs of older checkpoints too)."""
    route: str | None = None
    """``direct`` (written to the run's storage) or ``local-then-upload`` (committed on ``stage_dir`` first)."""
    local_s: float | None = None
    """With ``local-then-upload``: seconds to commit the local copy (``upload_s``: to upload it)."""
    upload_s: float | None = None


@dataclass(frozen=True, kw_only=True)
class SaveStaged(Event):
    """The state was copied into staging memory; training goes on while it is written.

    ``stall_s`` is how long the training loop waited (for an overlapped save, the part
    copied before returning). ``bytes`` is the state's tensor bytes, ``copied_bytes``
    what changed since the slot was last filled, ``staging_bytes`` the staging memory
    held. The save ends with ``save_committed`` or ``save_failed``.
    """

    type: ClassVar[str] = "save_staged"
    step: int
    checkpoint: str
    reason: str
    bytes: int
    stall_s: float
    copied_bytes: int | None = None
    staging_bytes: int | None = None
    overlapped: bool = False


@dataclass(frozen=True, kw_only=True)
class SaveSkipped(Event):
    """A save the policy asked for was deferred (``why``: the previous save is still being written)."""

    type: ClassVar[str] = "save_skipped"
    step: int
    reason: str
    why: str


@dataclass(frozen=True, kw_only=True)
class SaveFailed(Event):
    """A save did not commit; nothing of it is visible to readers."""

    type: ClassVar[str] = "save_failed"
    step: int
    reason: str
    error: str


@dataclass(frozen=True, kw_only=True)
class RestoreCompleted(Event):
    """State was restored from ``checkpoint``.

    ``replayed_steps`` is the number of steps the previous attempt had completed
    beyond the restored one, as far as the event log knows (``None`` when it does
    not know). It is exact when progress is recorded every step, and a lower
    bound otherwise.
    """

    type: ClassVar[str] = "restore_completed"
    step: int
    epoch: int
    checkpoint: str
    bytes: int
    duration_s: float
    last_known_step: int | None
    replayed_steps: int | None


@dataclass(frozen=True, kw_only=True)
class RestoreFresh(Event):
    """No usable checkpoint was found: the run starts from step 0."""

    type: ClassVar[str] = "restore_fresh"
    skipped: int


@dataclass(frozen=True, kw_only=True)
class RestoreFailed(Event):
    """Committed checkpoints exist but none can be restored; the run does not start over on its own.

    ``checkpoints`` is how many were tried (each has a ``checkpoint_skipped`` event with its reason).
    """

    type: ClassVar[str] = "restore_failed"
    checkpoints: int
    reason: str


@dataclass(frozen=True, kw_only=True)
class CheckpointSkipped(Event):
    """Restore fell back past a checkpoint; ``reason`` says what is wrong with it."""

    type: ClassVar[str] = "checkpoint_skipped"
    checkpoint: str
    step: int | None
    reason: str


@dataclass(frozen=True, kw_only=True)
class CheckpointDeleted(Event):
    """Retention deleted a committed checkpoint (``reason`` says which rule)."""

    type: ClassVar[str] = "checkpoint_deleted"
    checkpoint: str
    step: int
    reason: str


@dataclass(frozen=True, kw_only=True)
class PartialRemoved(Event):
    """Leftovers of a save that never committed were removed at start."""

    type: ClassVar[str] = "partial_removed"
    path: str


@dataclass(frozen=True, kw_only=True)
class NoticeReceived(Event):
    """An interruption notice arrived (a signal or a provider notice).

    ``count`` is how many notices from this source arrived so far in this
    process; ``deadline`` is Unix time or ``None`` when the source gives none;
    ``kind`` is ``stop`` or ``warning`` (a soft warning: an early checkpoint, training
    goes on); ``detail`` is what the source said (``terminate``, ``Preempt ...``, ``SIGTERM``).
    """

    type: ClassVar[str] = "notice_received"
    source: str
    count: int
    step: int
    deadline: float | None
    kind: str = "stop"
    detail: str = ""


@dataclass(frozen=True, kw_only=True)
class NoticeSourceStatus(Event):
    """A notice source changed state: ``watching``, ``unreachable``, ``recovered``,
    ``bad_response``, ``acknowledged`` or ``ack_failed`` (Azure ``StartRequests``, Slurm requeue)."""

    type: ClassVar[str] = "notice_source"
    source: str
    status: str
    message: str


@dataclass(frozen=True, kw_only=True)
class EmergencyPlanned(Event):
    """The emergency save chosen for a stop notice, from measured save costs.

    ``choice``: ``incremental``, ``full`` or ``local-then-upload``, or ``none`` when nothing
    fits (the last verified checkpoint stays the resume point). ``options`` maps each
    option to its estimated seconds until durable (``None``: not measured yet).
    ``time_left_s`` is the time to the deadline minus the margin (``None``: no deadline).
    """

    type: ClassVar[str] = "emergency_planned"
    step: int
    source: str
    deadline: float | None
    time_left_s: float | None
    choice: str
    estimate_s: float | None
    options: dict[str, float | None]
    reason: str


@dataclass(frozen=True, kw_only=True)
class EmergencyFinished(Event):
    """How the emergency save ended: ``committed`` durable or not, and whether before the deadline.

    ``still_writing``: not committed when the deadline (minus the margin) came; the process
    records its stop and keeps writing until the machine is taken (a ``save_committed`` follows
    if it makes it). ``local_committed`` (``local-then-upload`` only): the local copy is committed,
    so the next start on the same disk uploads it.
    """

    type: ClassVar[str] = "emergency_finished"
    step: int
    choice: str
    committed: bool
    deadline: float | None
    before_deadline: bool | None
    margin_s: float | None
    duration_s: float
    still_writing: bool = False
    local_committed: bool | None = None


@dataclass(frozen=True, kw_only=True)
class IntervalChosen(Event):
    """A save policy chose a (new) interval: ``interval_s`` seconds and/or ``interval_steps``, and why."""

    type: ClassVar[str] = "interval_chosen"
    policy: str
    interval_s: float | None
    interval_steps: int | None
    reason: str


@dataclass(frozen=True, kw_only=True)
class StageRecovered(Event):
    """At start, a checkpoint committed only on ``stage_dir`` (an emergency save that ran out of
    time to upload) was newer than the durable ones and was uploaded."""

    type: ClassVar[str] = "stage_recovered"
    checkpoint: str
    step: int


@dataclass(frozen=True, kw_only=True)
class WriterClaimed(Event):
    """This process claimed writer ``generation`` for the run (older writers are now fenced off)."""

    type: ClassVar[str] = "writer_claimed"
    generation: int


@dataclass(frozen=True, kw_only=True)
class StorageRetry(Event):
    """A storage call failed transiently; retry number ``retry`` follows after ``delay_s``."""

    type: ClassVar[str] = "storage_retry"
    operation: str
    retry: int
    delay_s: float
    error: str


@dataclass(frozen=True, kw_only=True)
class RunWarning(Event):
    """Something the user should know about that did not stop the run."""

    type: ClassVar[str] = "warning"
    message: str


# -- the supervisor's decisions (written by ``spotsafe run`` and ``spotsafe drill``) ----------------------------------


@dataclass(frozen=True, kw_only=True)
class PoolChosen(Event):
    """Where the next attempt runs, and why. ``spot_finish``/``on_demand_finish``: projected finish
    times (Unix) from the measured progress, when a deadline is set and enough is measured.
    ``on_demand_per_hour``: what the job would pay an hour in its cheapest on-demand pool (price x nodes),
    when it has one (the report's comparison)."""

    type: ClassVar[str] = "pool_chosen"
    job: str
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
class NoPoolAvailable(Event):
    """Every pool that may be used is cooling down: the supervisor waits ``wait_s``."""

    type: ClassVar[str] = "no_pool_available"
    job: str
    wait_s: float
    reason: str


@dataclass(frozen=True, kw_only=True)
class Excluded(Event):
    """A pool (``machine`` None) or one machine of it is left out until ``until`` (Unix), with the reason."""

    type: ClassVar[str] = "excluded"
    job: str
    pool: str
    machine: str | None
    until: float
    score: float
    reason: str


@dataclass(frozen=True, kw_only=True)
class Escalated(Event):
    """The job moved to on-demand capacity because the projected finish passed the deadline."""

    type: ClassVar[str] = "escalated"
    job: str
    reason: str
    deadline: float
    spot_finish: float | None
    on_demand_finish: float | None


@dataclass(frozen=True, kw_only=True)
class AttemptStarted(Event):
    type: ClassVar[str] = "attempt_started"
    job: str
    number: int
    pool: str
    market: str
    price_per_hour: float
    step_before: int | None
    exclude: list[str] = dataclasses.field(default_factory=list)
    nodes: int = 1


@dataclass(frozen=True, kw_only=True)
class AttemptEnded(Event):
    """One attempt's end: how it exited, the checkpoint step before and after, what it cost."""

    type: ClassVar[str] = "attempt_ended"
    job: str
    number: int
    pool: str
    machine: str | None
    exit_code: int | None
    exit_class: str
    step_before: int | None
    step_after: int | None
    duration_s: float
    cost: float


@dataclass(frozen=True, kw_only=True)
class RetryDecided(Event):
    """After an attempt: relaunch after ``delay_s``, or end the job (``relaunch`` false)."""

    type: ClassVar[str] = "retry_decided"
    job: str
    relaunch: bool
    delay_s: float
    reason: str


@dataclass(frozen=True, kw_only=True)
class JobFinished(Event):
    type: ClassVar[str] = "job_finished"
    job: str
    state: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class MarketInterruption(Event):
    """``spotsafe drill``: the emulated market took capacity away (``interrupted`` None: no attempt was
    running; else that attempt's number). ``killed``: the attempt outlived the notice window and got SIGKILL."""

    type: ClassVar[str] = "market_interruption"
    number: int
    mode: str
    interrupted: int | None
    window_s: float
    capacity_back_in_s: float
    killed: bool


SUPERVISOR_TYPES = frozenset(
    cls.type
    for cls in (
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
)
"""Events the supervisor (or the drill's market) writes, not the job: they belong to no attempt's timeline."""

EVENT_TYPES: dict[str, type[Event]] = {
    cls.type: cls
    for cls in (
        RunStarted,
        RunExited,
        Progress,
        SaveStarted,
        SaveStaged,
        SaveSkipped,
        SaveCommitted,
        SaveFailed,
        RestoreCompleted,
        RestoreFresh,
        RestoreFailed,
        CheckpointSkipped,
        CheckpointDeleted,
        PartialRemoved,
        NoticeReceived,
        NoticeSourceStatus,
        EmergencyPlanned,
        EmergencyFinished,
        IntervalChosen,
        StageRecovered,
        WriterClaimed,
        StorageRetry,
        RunWarning,
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
}
