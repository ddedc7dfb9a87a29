"""Finding and reading the newest valid checkpoint, without applying it anywhere."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from spotsafe.engine.agreement import Agreement
from spotsafe.errors import ConfigError, CorruptCheckpointError, NoUsableCheckpointError
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


ENV_ON_DAMAGED = "SPOTSAFE_ON_DAMAGED"
FAIL, START_FRESH = "fail", "start_fresh"


def on_damaged_setting(value: str | None) -> str:
    """What ``restore()`` does when committed checkpoints exist and none can be restored.

    ``value`` (the argument) wins; ``None`` reads ``$SPOTSAFE_ON_DAMAGED``; the default is ``"fail"``.
    """
    chosen = value if value is not None else (os.environ.get(ENV_ON_DAMAGED) or FAIL)
    if not isinstance(chosen, str) or chosen not in (FAIL, START_FRESH):
        where = "on_damaged" if value is not None else f"${ENV_ON_DAMAGED}"
        raise ConfigError(f"{where} must be {FAIL!r} or {START_FRESH!r}, got {chosen!r} ({type(chosen).__name__})")
    return chosen


def no_usable_checkpoint(url: str, damaged: Sequence[tuple[str, str]]) -> NoUsableCheckpointError:
    """The error for a run whose committed checkpoints (``damaged``: name and reason each) all fail.

    With no ``damaged`` here, the damage is on other ranks, or the ranks share no common step.
    """
    if damaged:
        found = f"{url} has {len(damaged)} committed checkpoint(s) and none can be restored:\n" + "".join(
            f"  {name}: {reason}\n" for name, reason in damaged
        )
    else:
        found = f"{url}: the other ranks' committed checkpoints cannot be restored with this rank's (see their logs)\n"
    return NoUsableCheckpointError(
        found + "Not starting over from step 0 on its own, and nothing was deleted. Check the storage "
        f"(`spotsafe verify --all {url}` shows what is wrong with each checkpoint). To start from step 0 anyway, "
        f"call restore(on_damaged={START_FRESH!r}) or set {ENV_ON_DAMAGED}={START_FRESH}.",
        damaged=damaged,
    )
