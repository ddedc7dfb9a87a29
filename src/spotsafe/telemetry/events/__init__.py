"""Typed telemetry events.

Every event is a frozen dataclass with a ``type`` name. On disk an event is one
JSON object per line: ``{"type": ..., "run_id": ..., "attempt": ..., "pid": ...,
"time": ..., <fields>}``. Reports are computed from these lines alone, so field
names are part of the format: add fields, never rename them.

The job's events are in :mod:`~spotsafe.telemetry.events.engine`, the supervisor's in
:mod:`~spotsafe.telemetry.events.supervisor`, their bases in
:mod:`~spotsafe.telemetry.events.base`; every name is importable from here.
"""

from __future__ import annotations

from spotsafe.telemetry.events.base import (
    AttemptEvent,
    CheckpointEvent,
    Event,
    JobEvent,
    SaveEvent,
    SaveWithCheckpoint,
    StepEvent,
    SupervisorEvent,
)
from spotsafe.telemetry.events.engine import (
    ENGINE_EVENTS,
    CheckpointDeleted,
    CheckpointSkipped,
    EmergencyFinished,
    EmergencyPlanned,
    IntervalChosen,
    NoticeReceived,
    NoticeSourceStatus,
    PartialRemoved,
    Progress,
    RestoreCompleted,
    RestoreFailed,
    RestoreFresh,
    RunExited,
    RunStarted,
    RunWarning,
    SaveCommitted,
    SaveFailed,
    SaveSkipped,
    SaveStaged,
    SaveStarted,
    StageRecovered,
    StorageRetry,
    WriterClaimed,
)
from spotsafe.telemetry.events.supervisor import (
    SUPERVISOR_EVENTS,
    AttemptEnded,
    AttemptStarted,
    Escalated,
    Excluded,
    JobFinished,
    MarketInterruption,
    NoPoolAvailable,
    PoolChosen,
    RetryDecided,
)

SUPERVISOR_TYPES = frozenset(cls.type for cls in SUPERVISOR_EVENTS)
"""Events the supervisor (or the drill's market) writes, not the job: they belong to no attempt's timeline."""

EVENT_TYPES: dict[str, type[Event]] = {cls.type: cls for cls in (*ENGINE_EVENTS, *SUPERVISOR_EVENTS)}
"""Every event type by its ``type`` name: what a reader of the log can parse."""

__all__ = [
    "ENGINE_EVENTS",
    "EVENT_TYPES",
    "SUPERVISOR_EVENTS",
    "SUPERVISOR_TYPES",
    "AttemptEnded",
    "AttemptEvent",
    "AttemptStarted",
    "CheckpointDeleted",
    "CheckpointEvent",
    "CheckpointSkipped",
    "EmergencyFinished",
    "EmergencyPlanned",
    "Escalated",
    "Event",
    "Excluded",
    "IntervalChosen",
    "JobEvent",
    "JobFinished",
    "MarketInterruption",
    "NoPoolAvailable",
    "NoticeReceived",
    "NoticeSourceStatus",
    "PartialRemoved",
    "PoolChosen",
    "Progress",
    "RestoreCompleted",
    "RestoreFailed",
    "RestoreFresh",
    "RetryDecided",
    "RunExited",
    "RunStarted",
    "RunWarning",
    "SaveCommitted",
    "SaveEvent",
    "SaveFailed",
    "SaveSkipped",
    "SaveStaged",
    "SaveStarted",
    "SaveWithCheckpoint",
    "StageRecovered",
    "StepEvent",
    "StorageRetry",
    "SupervisorEvent",
    "WriterClaimed",
]
