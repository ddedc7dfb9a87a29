"""Finding and reading the newest valid checkpoint, without applying it anywhere."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from spotsafe.engine.agreement import Agreement
from spotsafe.errors import CorruptCheckpointError
from spotsafe.state.snapshot import DecodedState, decode_state
from spotsafe.storage.repository import CheckpointRef, CheckpointRepository, LoadedCheckpoint

SkipFn = Callable[[CheckpointRef, CorruptCheckpointError], None]


@dataclass(frozen=True)
class RestoredState:
    """A verified checkpoint and its decoded components (tensors view the loaded blobs)."""

    checkpoint: LoadedCheckpoint
    decoded: DecodedState

    @property
    def components(self) -> dict[str, Any]:
        return self.decoded.components

    @property
    def step(self) -> int:
        return self.checkpoint.ref.step


def load_state(repo: CheckpointRepository, ref: CheckpointRef) -> RestoredState:
    """Read, verify and decode one checkpoint. Raises :class:`CorruptCheckpointError`."""
    loaded = repo.load(ref)
    return RestoredState(checkpoint=loaded, decoded=decode_state(loaded.blobs, ref.name))


def load_newest_valid(repo: CheckpointRepository, on_skip: SkipFn | None = None) -> RestoredState | None:
    """The newest committed checkpoint that verifies and decodes, or ``None``.

    Walks newest to oldest over the listing plus the ``latest`` hint; each damaged checkpoint is reported to ``on_skip``
    and passed over. Storage errors that are not damage propagate.
    """
    for ref in repo.candidates():
        try:
            return load_state(repo, ref)
        except CorruptCheckpointError as err:
            if on_skip is not None:
                on_skip(ref, err)
    return None


def load_agreed(
    repo: CheckpointRepository, agreement: Agreement, on_skip: SkipFn | None = None
) -> RestoredState | None:
    """Like :func:`load_newest_valid`, for all ranks at once: the newest step that every rank has
    committed and verified. Collective: every rank of ``agreement`` must call it."""
    by_step: dict[int, list[CheckpointRef]] = {}
    for ref in repo.candidates():
        by_step.setdefault(ref.step, []).append(ref)
    remaining = set(by_step)
    while True:
        common = agreement.common_steps(sorted(remaining))
        if not common:
            return None
        step = common[0]
        restored = None
        for ref in by_step[step]:
            try:
                restored = load_state(repo, ref)
                break
            except CorruptCheckpointError as err:
                if on_skip is not None:
                    on_skip(ref, err)
        if agreement.all_true(restored is not None):
            return restored
        remaining.discard(step)
