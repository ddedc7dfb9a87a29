"""Events the job process writes: its checkpointer's run, saves, restores and notices, and its storage.

Field names are part of the log format: add fields, never rename them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from spotsafe.telemetry.events.base import CheckpointEvent, Event, SaveEvent, SaveWithCheckpoint, StepEvent


@dataclass(frozen=True, kw_only=True)
class RunStarted(Event):
    """A process attached a checkpointer to the run."""

    type: ClassVar[str] = "run_started"
    url: str
    host: str | None = None
    """The machine the process runs on (its hostname): the supervisor's health scores key on it."""
    unit: str = "step"
    """What the steps count: ``step`` (training steps) or ``item`` (a batch job's items, :mod:`spotsafe.batch`)."""


@dataclass(frozen=True, kw_only=True)
class RunExited(Event):
    """The process is about to exit on purpose (``reason``: an :class:`~spotsafe.reasons.ExitReason`)."""

    type: ClassVar[str] = "run_exited"
    reason: str
    step: int
    exit_code: int


@dataclass(frozen=True, kw_only=True)
class Progress(StepEvent):
    """The training loop completed ``step`` (throttled; see ``progress_interval``)."""

    type: ClassVar[str] = "progress"
    epoch: int


@dataclass(frozen=True, kw_only=True)
class SaveStarted(SaveEvent):
    """A checkpoint save began."""

    type: ClassVar[str] = "save_started"


@dataclass(frozen=True, kw_only=True)
class SaveCommitted(SaveWithCheckpoint):
    """A checkpoint is durable and visible: its manifest was committed."""

    type: ClassVar[str] = "save_committed"
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
class SaveStaged(SaveWithCheckpoint):
    """The state was copied into staging memory; training goes on while it is written.

    ``stall_s`` is how long the training loop waited (for an overlapped save, the part
    copied before returning). ``bytes`` is the state's tensor bytes, ``copied_bytes``
    what changed since the slot was last filled, ``staging_bytes`` the staging memory
    held. The save ends with ``save_committed`` or ``save_failed``.
    """

    type: ClassVar[str] = "save_staged"
    bytes: int
    stall_s: float
    copied_bytes: int | None = None
    staging_bytes: int | None = None
    overlapped: bool = False


@dataclass(frozen=True, kw_only=True)
class SaveSkipped(SaveEvent):
    """A save the policy asked for was deferred (``why``: the previous save is still being written)."""

    type: ClassVar[str] = "save_skipped"
    why: str


@dataclass(frozen=True, kw_only=True)
class SaveFailed(SaveEvent):
    """A save did not commit; nothing of it is visible to readers."""

    type: ClassVar[str] = "save_failed"
    error: str


@dataclass(frozen=True, kw_only=True)
class RestoreCompleted(StepEvent):
    """State was restored from ``checkpoint``.

    ``replayed_steps`` is the number of steps the previous attempt had completed
    beyond the restored one, as far as the event log knows (``None`` when it does
    not know). It is exact when progress is recorded every step, and a lower
    bound otherwise. ``in_place_bytes`` of ``bytes`` were read straight into the
    live tensors (see :mod:`spotsafe.engine.in_place`).
    """

    type: ClassVar[str] = "restore_completed"
    epoch: int
    checkpoint: str
    bytes: int
    duration_s: float
    last_known_step: int | None
    replayed_steps: int | None
    in_place_bytes: int = 0


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
class CheckpointSkipped(CheckpointEvent):
    """Restore fell back past a checkpoint; ``reason`` says what is wrong with it (``step`` None: unknown)."""

    type: ClassVar[str] = "checkpoint_skipped"
    reason: str


@dataclass(frozen=True, kw_only=True)
class CheckpointDeleted(CheckpointEvent):
    """Retention deleted a committed checkpoint (``reason`` says which rule)."""

    type: ClassVar[str] = "checkpoint_deleted"
    step: int
    reason: str


@dataclass(frozen=True, kw_only=True)
class StageRecovered(CheckpointEvent):
    """At start, a checkpoint committed only on ``stage_dir`` (an emergency save that ran out of
    time to upload) was newer than the durable ones and was uploaded."""

    type: ClassVar[str] = "stage_recovered"
    step: int


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
class EmergencyPlanned(StepEvent):
    """The emergency save chosen for a stop notice, from measured save costs.

    ``choice``: ``incremental``, ``full`` or ``local-then-upload``, or ``none`` when nothing
    fits (the last verified checkpoint stays the resume point). ``options`` maps each
    option to its estimated seconds until durable (``None``: not measured yet).
    ``time_left_s`` is the time to the deadline minus the margin (``None``: no deadline).
    """

    type: ClassVar[str] = "emergency_planned"
    source: str
    deadline: float | None
    time_left_s: float | None
    choice: str
    estimate_s: float | None
    options: dict[str, float | None]
    reason: str


@dataclass(frozen=True, kw_only=True)
class EmergencyFinished(StepEvent):
    """How the emergency save ended: ``committed`` durable or not, and whether before the deadline.

    ``still_writing``: not committed when the deadline (minus the margin) came; the process
    records its stop and keeps writing until the machine is taken (a ``save_committed`` follows
    if it makes it). ``local_committed`` (``local-then-upload`` only): the local copy is committed,
    so the next start on the same disk uploads it.
    """

    type: ClassVar[str] = "emergency_finished"
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


ENGINE_EVENTS: tuple[type[Event], ...] = (
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
)
"""Every event type of this module, in the order of the log format's reference."""
