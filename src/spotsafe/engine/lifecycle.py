"""One save's lifecycle: where it is (:class:`SaveState`), its record (:class:`SaveJob`), how it ended.

:class:`~spotsafe.engine.saver.Saver` moves a :class:`SaveJob` through the states;
the checkpointer turns each transition into one typed event of
:mod:`spotsafe.telemetry.events` (see :class:`SaveState` for which).
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from spotsafe.engine.staging import StagedTensor, StageStats, TensorKey
from spotsafe.errors import CheckpointError
from spotsafe.reasons import SaveReason
from spotsafe.state.snapshot import Snapshot
from spotsafe.storage.manifest import Manifest
from spotsafe.storage.repository import CheckpointRef


class SaveState(enum.Enum):
    """Where one save is. Legal transitions, and the event each one emits::

        (begin)   ──▶ STAGING      save_started    (emitted by the caller, before Saver.save)
        STAGING   ──▶ STAGED       save_staged     background save: copied into staging memory
        STAGING   ──▶ COMMITTED    save_committed  direct save: streamed from the live tensors and committed
        STAGING   ──▶ FAILED       save_failed     the copy or the direct write raised
        STAGED    ──▶ COMMITTED    save_committed  the worker committed the manifest (and uploaded it)
        STAGED    ──▶ FAILED       save_failed     the worker's write or commit raised
        STAGED    ──▶ ABANDONED    save_failed     overlap: the state changed while it was copied
                                                   (its ``error`` names :class:`SnapshotTornError`)

    COMMITTED, FAILED and ABANDONED are final. The saver reports STAGED through its
    ``on_staged`` callback and every final state through ``on_done``; their owner emits
    the event. A failure from STAGING is raised at once, one from STAGED at the training
    thread's next call. Any other transition is a bug and raises :class:`RuntimeError`.
    """

    STAGING = "staging"
    STAGED = "staged"
    COMMITTED = "committed"
    FAILED = "failed"
    ABANDONED = "abandoned"

    def can_become(self, new: SaveState) -> bool:
        """Whether ``self -> new`` is a legal transition."""
        return new in _LEGAL.get(self, frozenset())


_LEGAL: dict[SaveState, frozenset[SaveState]] = {
    SaveState.STAGING: frozenset({SaveState.STAGED, SaveState.COMMITTED, SaveState.FAILED}),
    SaveState.STAGED: frozenset({SaveState.COMMITTED, SaveState.FAILED, SaveState.ABANDONED}),
}


def save_reason(value: str) -> SaveReason | str:
    """``value`` as a :class:`SaveReason` when it names one; any other string as it is (it equals it either way)."""
    try:
        return SaveReason(value)
    except ValueError:
        return value


class SnapshotTornError(CheckpointError):
    """An overlapped snapshot was modified before its copy finished; the save was abandoned."""


@dataclass
class SaveJob:
    """One save, from snapshot to commit.

    Written by the training thread until it is STAGED, then by the save worker only
    (``copied`` and ``verdict`` hand the overlapped copy over between the two).
    """

    step: int
    reason: SaveReason | str
    """A :class:`SaveReason`, or the caller's own word (``Checkpointer.save(reason=...)`` takes any string)."""
    ref: CheckpointRef
    snapshot: Snapshot
    started: float
    metadata: dict[str, Any]
    writer: dict[str, Any]
    staged: dict[TensorKey, StagedTensor] = field(default_factory=dict)
    deferred: list[tuple[TensorKey, torch.Tensor]] = field(default_factory=list)
    versions: dict[TensorKey, int | None] = field(default_factory=dict)
    stats: StageStats = field(default_factory=StageStats)
    state: SaveState = SaveState.STAGING
    stall_s: float = 0.0
    copied: threading.Event = field(default_factory=threading.Event)
    verdict: threading.Event = field(default_factory=threading.Event)
    torn: str | None = None
    staged_route: bool = False
    background: bool = False
    local_s: float | None = None
    upload_s: float | None = None

    @property
    def route(self) -> str:
        """``direct`` or ``local-then-upload``."""
        return "local-then-upload" if self.staged_route else "direct"

    def to(self, state: SaveState) -> None:
        """Move to ``state``; raises :class:`RuntimeError` on a transition :class:`SaveState` does not list."""
        if not self.state.can_become(state):
            raise RuntimeError(f"save of step {self.step}: illegal transition {self.state.value} -> {state.value}")
        self.state = state


@dataclass(frozen=True)
class SaveOutcome:
    """How one save ended, as the saver reports it (on the worker thread, or inline for a direct save).

    ``manifest`` is set when it committed, ``error`` when it did not; ``duration_s`` runs
    from the snapshot to the end.
    """

    job: SaveJob
    manifest: Manifest | None
    error: BaseException | None
    duration_s: float
