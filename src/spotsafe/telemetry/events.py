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
    """An interruption notice arrived (a signal, or later a provider notice).

    ``count`` is how many notices from this source arrived so far in this
    process; ``deadline`` is Unix time or ``None`` when the source gives none.
    """

    type: ClassVar[str] = "notice_received"
    source: str
    count: int
    step: int
    deadline: float | None


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
        CheckpointSkipped,
        CheckpointDeleted,
        PartialRemoved,
        NoticeReceived,
        WriterClaimed,
        StorageRetry,
        RunWarning,
    )
}
