"""``Checkpointer.restore()`` with ``sharded=True``: the newest checkpoint every rank can read, at any world size.

Collective. The global state is loaded through :func:`spotsafe.sharded.load` (DCP reshards it to this job's
ranks; a checkpoint any rank finds damaged is skipped by all), then put back as
:func:`~spotsafe.engine.sharded_state.apply_restored` says (the rule for ranks that did not exist at the
save is there). Before anything, a location that holds only checkpoints written rank by rank
(``sharded=False``) is refused with a clear message: they cannot be resharded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from spotsafe.engine.agreement import Agreement
from spotsafe.engine.components import Components
from spotsafe.engine.reader import FAIL, START_FRESH, on_damaged_setting
from spotsafe.engine.sharded_saver import ShardedSaver
from spotsafe.engine.sharded_state import apply_restored, sharded_states, split_states
from spotsafe.engine.world import refusal, saved_layout, sharded_world_size
from spotsafe.errors import NoUsableCheckpointError, WorldSizeMismatchError
from spotsafe.exit_codes import EXIT_NO_USABLE_CHECKPOINT
from spotsafe.reasons import ExitReason
from spotsafe.sharded import api as sharded
from spotsafe.storage.repository import CheckpointRepository
from spotsafe.telemetry import events as ev

log = logging.getLogger("spotsafe")


def refuse_rank_folders(repo: CheckpointRepository, agreement: Agreement | None, emit: Callable[..., None]) -> None:
    """Raise (exit 2) when the run's location holds per-rank checkpoints and no sharded ones."""
    layout = saved_layout(repo.storage)
    saved = layout.world_size if layout.ranks else None
    if agreement is not None:
        saved = max((n for n in agreement.gather(saved) if n is not None), default=None)
    if saved is None or sharded_world_size(repo.storage) is not None:
        return
    world_size = 1 if agreement is None else agreement.world_size
    error = WorldSizeMismatchError(
        f"{repo.storage.url} holds checkpoints written rank by rank ({saved} rank folders, sharded=False) and no "
        "sharded ones; sharded=True reads only checkpoints written for all ranks at once. To go on from them, "
        f"run with sharded=False and {saved} ranks; sharded=True then starts a new location. Nothing was deleted.",
        saved=saved,
        world_size=world_size,
    )
    raise refusal(error, emit)


def restore_sharded(
    repo: CheckpointRepository,
    components: Components,
    *,
    saver: ShardedSaver,
    agreement: Agreement | None,
    strict: bool,
    on_damaged: str | None,
    env_on_damaged: str | None,
    last_known_step: int | None,
    restored: Callable[[int], None],
    emit: Callable[..., None],
    clock: Callable[[], float],
) -> int | None:
    """Load the newest sharded checkpoint into ``components``; its step, or ``None`` for a fresh start."""
    mode = on_damaged_setting(on_damaged, env_on_damaged)
    started = clock()
    refuse_rank_folders(repo, agreement, emit)
    shared, _ = split_states(sharded_states(components))
    try:
        result = sharded.load(shared, repo, process_group=saver.process_group)
    except NoUsableCheckpointError as error:
        for name, reason in error.damaged:
            emit(ev.CheckpointSkipped, checkpoint=name, step=_step_of(name), reason=reason)
        if mode == FAIL:
            emit(ev.RestoreFailed, checkpoints=len(error.damaged), reason=str(error))
            emit(ev.RunExited, reason=ExitReason.NO_USABLE_CHECKPOINT, step=0, exit_code=EXIT_NO_USABLE_CHECKPOINT)
            log.error("spotsafe: %s", error)
            raise
        message = f"starting from step 0 although {len(error.damaged)} committed checkpoint(s) exist ({START_FRESH})"
        log.warning("spotsafe: %s", message)
        emit(ev.RunWarning, message=message)
        emit(ev.RestoreFresh, skipped=len(error.damaged))
        return None
    if result is None:
        emit(ev.RestoreFresh, skipped=0)
        return None
    rank = 0 if agreement is None else agreement.rank
    apply_restored(
        components,
        result.state,
        result.rank_state,
        rank=rank,
        step=result.step,
        saved_world_size=result.world_size,
        strict=strict,
        where=result.ref.name,
        warn=lambda m: emit(ev.RunWarning, message=m),
    )
    step = components.counters.step
    restored(step)
    emit(
        ev.RestoreCompleted,
        step=step,
        epoch=components.epoch(),
        checkpoint=result.ref.name,
        bytes=repo.read_manifest(result.ref).total_bytes,
        duration_s=clock() - started,
        last_known_step=last_known_step,
        replayed_steps=None if last_known_step is None else max(0, last_known_step - step),
    )
    return step


def _step_of(name: str) -> int:
    from spotsafe.storage.layout import CheckpointRef

    ref = CheckpointRef.parse(name)
    return 0 if ref is None else ref.step


__all__ = ["refuse_rank_folders", "restore_sharded"]
