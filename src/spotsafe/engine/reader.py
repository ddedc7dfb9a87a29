"""Finding and reading the newest valid checkpoint; :func:`restore_newest` applies it to a run's components."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from spotsafe.engine.agreement import Agreement
from spotsafe.engine.components import Components
from spotsafe.engine.in_place import InPlacePlan, writable_memory
from spotsafe.engine.saver import Saver
from spotsafe.errors import ConfigError, CorruptCheckpointError, NoUsableCheckpointError
from spotsafe.exit_codes import EXIT_NO_USABLE_CHECKPOINT
from spotsafe.jobenv import ENV_ON_DAMAGED
from spotsafe.reasons import ExitReason
from spotsafe.state.snapshot import DecodedState, Snapshot, decode_state
from spotsafe.storage.repository import CheckpointRef, CheckpointRepository, LoadedCheckpoint
from spotsafe.telemetry import events as ev

log = logging.getLogger("spotsafe")

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


PlanFn = Callable[[], InPlacePlan]
"""A fresh plan of what to read in place, for each checkpoint tried (see :mod:`spotsafe.engine.in_place`)."""


def load_state(repo: CheckpointRepository, ref: CheckpointRef, in_place: PlanFn | None = None) -> RestoredState:
    """Read, verify and decode one checkpoint, reading what ``in_place()`` plans straight into live tensors.
    Raises :class:`CorruptCheckpointError`."""
    if in_place is None:
        loaded = repo.load(ref)
        return RestoredState(checkpoint=loaded, decoded=decode_state(loaded.blobs, ref.name))
    plan = in_place()
    loaded = repo.load(ref, first=plan.first, place=plan.place)
    return RestoredState(checkpoint=loaded, decoded=decode_state(loaded.blobs, ref.name, plan.given))


def load_newest_valid(
    repo: CheckpointRepository, on_skip: SkipFn | None = None, in_place: PlanFn | None = None
) -> RestoredState | None:
    """The newest committed checkpoint that verifies and decodes, or ``None``.

    Walks newest to oldest over the listing plus the ``latest`` hint; each damaged checkpoint is reported to ``on_skip``
    and passed over. Storage errors that are not damage propagate.
    """
    for ref in repo.candidates():
        try:
            return load_state(repo, ref, in_place)
        except CorruptCheckpointError as err:
            if on_skip is not None:
                on_skip(ref, err)
    return None


def load_agreed(
    repo: CheckpointRepository, agreement: Agreement, on_skip: SkipFn | None = None, in_place: PlanFn | None = None
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
                restored = load_state(repo, ref, in_place)
                break
            except CorruptCheckpointError as err:
                if on_skip is not None:
                    on_skip(ref, err)
        if agreement.all_true(restored is not None):
            return restored
        remaining.discard(step)


FAIL, START_FRESH = "fail", "start_fresh"


def on_damaged_setting(value: str | None, from_env: str | None = None) -> str:
    """What ``restore()`` does when committed checkpoints exist and none can be restored.

    ``value`` (the argument) wins; then ``from_env`` (``JobEnv.on_damaged``: ``$SPOTSAFE_ON_DAMAGED``);
    the default is ``"fail"``.
    """
    chosen = value if value is not None else (from_env or FAIL)
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


def restore_newest(
    repo: CheckpointRepository,
    components: Components,
    *,
    agreement: Agreement | None,
    saver: Saver,
    strict: bool,
    on_damaged: str | None,
    env_on_damaged: str | None,
    last_known_step: int | None,
    restored: Callable[[int], None],
    emit: Callable[..., None],
    clock: Callable[[], float],
) -> int | None:
    """``Checkpointer.restore()``: load the newest verified checkpoint into ``components``; its step, or
    ``None`` for a fresh start. With ``agreement``, every rank loads the same step (collective).

    Each damaged checkpoint is skipped (``checkpoint_skipped``). When committed checkpoints exist and
    none can be restored, raises :class:`~spotsafe.errors.NoUsableCheckpointError` (``restore_failed``,
    ``run_exited``) unless ``on_damaged`` (or ``env_on_damaged``) is ``start_fresh``. ``restored(step)``
    is called once the state is loaded, before ``restore_completed``; ``saver`` adopts the loaded bytes.
    """
    mode = on_damaged_setting(on_damaged, env_on_damaged)
    started = clock()
    skipped: list[tuple[str, str]] = []

    def on_skip(ref: CheckpointRef, err: CorruptCheckpointError) -> None:
        skipped.append((ref.name, str(err)))
        log.warning("spotsafe: skipping checkpoint %s: %s", ref.name, err)
        emit(ev.CheckpointSkipped, checkpoint=ref.name, step=ref.step, reason=str(err))

    in_place: PlanFn | None = None
    if strict and mode == FAIL:  # damaged bytes read in place then never reach training (see engine.in_place)

        def in_place() -> InPlacePlan:
            return InPlacePlan(components.states(), writable_memory(components.objects()))

    if agreement is not None:
        state = load_agreed(repo, agreement, on_skip, in_place)
    else:
        state = load_newest_valid(repo, on_skip, in_place)
    if state is None:
        lost = bool(skipped)
        if agreement is not None:  # collective: any rank's committed progress stops every rank
            lost = not agreement.all_true(not (skipped or repo.candidates()))
        if lost and mode == FAIL:
            error = no_usable_checkpoint(str(repo.storage.url), skipped)
            emit(ev.RestoreFailed, checkpoints=len(skipped), reason=str(error))
            emit(ev.RunExited, reason=ExitReason.NO_USABLE_CHECKPOINT, step=0, exit_code=EXIT_NO_USABLE_CHECKPOINT)
            log.error("spotsafe: %s", error)
            raise error
        if lost:
            message = (
                f"starting from step 0 although {len(skipped) or 'other ranks'} committed checkpoint(s) exist "
                f"(on_damaged={START_FRESH!r}); none could be restored"
            )
            log.warning("spotsafe: %s", message)
            emit(ev.RunWarning, message=message)
        emit(ev.RestoreFresh, skipped=len(skipped))
        return None
    name = state.checkpoint.ref.name
    components.apply(state.components, strict=strict, where=name, warn=lambda m: emit(ev.RunWarning, message=m))
    step = components.counters.step
    live = Snapshot.capture(step, components.states())
    saver.adopt(state.checkpoint, state.decoded, [t for p in live.components for t in p.tensors])
    restored(step)
    emit(
        ev.RestoreCompleted,
        step=step,
        epoch=components.epoch(),
        checkpoint=name,
        bytes=state.checkpoint.manifest.total_bytes,
        in_place_bytes=sum(state.decoded.entries[c][i].nbytes for c, i in state.decoded.in_place),
        duration_s=clock() - started,
        last_known_step=last_known_step,
        replayed_steps=None if last_known_step is None else max(0, last_known_step - step),
    )
    return step
