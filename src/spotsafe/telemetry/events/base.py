"""The base of every event, and the bases that carry fields many events share.

A base's fields come first in its events, in the order declared here: an event's
fields are serialised in dataclass field order (base first), so a base may only
hold a prefix that all its events already had. That keeps every line of the
event log byte-identical when events are regrouped.
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
        """The event's fields by name, in serialisation order (``time`` first)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True, kw_only=True)
class StepEvent(Event):
    """Something that happened at training step ``step``."""

    step: int


@dataclass(frozen=True, kw_only=True)
class SaveEvent(StepEvent):
    """A stage of the save of ``step`` before it has a checkpoint: started, skipped, failed.

    ``reason``: interval, notice, warning, final or manual (a :class:`~spotsafe.reasons.SaveReason`,
    or the word a caller gave ``Checkpointer.save``). The stages that name the checkpoint
    are :class:`SaveWithCheckpoint`; together they are every ``save_*`` event.
    """

    reason: str


@dataclass(frozen=True, kw_only=True)
class SaveWithCheckpoint(StepEvent):
    """A stage of the save of ``step`` into checkpoint folder ``checkpoint``: staged, committed."""

    checkpoint: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class CheckpointEvent(Event):
    """Something that happened to the committed checkpoint ``checkpoint`` (of step ``step``)."""

    checkpoint: str
    step: int | None


@dataclass(frozen=True, kw_only=True)
class SupervisorEvent(Event):
    """Written by the supervisor (``spotsafe run``, ``spotsafe drill``), not the job: in no attempt's timeline."""


@dataclass(frozen=True, kw_only=True)
class JobEvent(SupervisorEvent):
    """A decision about supervised job ``job``."""

    job: str


@dataclass(frozen=True, kw_only=True)
class AttemptEvent(JobEvent):
    """Attempt ``number`` of job ``job``, in pool ``pool``."""

    number: int
    pool: str
