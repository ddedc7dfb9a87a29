"""Garbage collection of a run folder: which checkpoints and leftover folders may go, and deleting them.

The plan never deletes evidence: only committed checkpoints older than the newest one that verifies (every
checksum) may go, so a damaged checkpoint that nothing intact follows is kept; retention itself is
:class:`~spotsafe.policy.retention.KeepLast`, the rule the Checkpointer applies. An uncommitted folder goes only
when it was last written longer ago than a limit (a younger one may be a save in progress) and none of its blobs
is shared by a committed checkpoint.

Call sequence: :func:`plan_gc`, then (to delete) :func:`apply_gc` with the planned items.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from spotsafe.errors import CorruptCheckpointError, SpotsafeError
from spotsafe.policy.retention import Candidate, KeepLast
from spotsafe.storage.base import Storage, stat_of
from spotsafe.storage.inventory import all_folders, folder_bytes
from spotsafe.storage.redactor import Redactor
from spotsafe.storage.repository import CheckpointRef, CheckpointRepository


@dataclass
class GcItem:
    """One folder of the plan: whether it goes, and why."""

    ref: CheckpointRef
    committed: bool
    delete: bool
    reason: str
    size: int | None = None


@dataclass(frozen=True)
class GcPlan:
    """Every checkpoint folder newest first, and the newest checkpoint that verified (never deleted)."""

    items: list[GcItem]
    newest_intact: str | None

    @property
    def doomed(self) -> list[GcItem]:
        return [item for item in self.items if item.delete]


@dataclass
class GcResult:
    """What :func:`apply_gc` did."""

    deleted: list[GcItem] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """Uncommitted folders committed since they were planned: not removed."""
    failures: list[str] = field(default_factory=list)
    """``"<name>: <why>"`` for each folder that could not be deleted (redacted)."""


def newest_write(storage: Storage, ref: CheckpointRef) -> float | None:
    """Newest modification time of the folder's files, when the backend can say (best effort: ``None`` otherwise,
    then the time in the folder's name is what counts)."""
    stat = stat_of(storage)
    if stat is None:
        return None
    try:
        return stat.modified(ref.key)
    except SpotsafeError:
        return None


def keep_common(plans: Mapping[str, GcPlan]) -> dict[str, GcPlan]:
    """The plans of one job's ranks (each made by :func:`plan_gc`), made to agree: a committed checkpoint that
    any rank keeps is kept at the same step on every rank, since a restore needs every rank's checkpoint at one
    step (a rank whose newest are damaged keeps an older intact one; the others must keep that step too)."""
    kept = {item.ref.step for plan in plans.values() for item in plan.items if item.committed and not item.delete}
    agreed: dict[str, GcPlan] = {}
    for key, plan in plans.items():
        items = [
            dataclasses.replace(
                item,
                delete=False,
                reason=f"another rank keeps step {item.ref.step}: a restore needs every rank's checkpoint at one step",
            )
            if item.committed and item.delete and item.ref.step in kept
            else item
            for item in plan.items
        ]
        agreed[key] = GcPlan(items=items, newest_intact=plan.newest_intact)
    return agreed


def plan_gc(
    repo: CheckpointRepository, redactor: Redactor, *, keep: int, partial_older_than: float, now: float
) -> GcPlan:
    """Which folders to delete to keep the newest ``keep`` committed checkpoints (and always the newest intact
    one), and which uncommitted folders are stale (last written over ``partial_older_than`` seconds before
    ``now``, Unix time). Reads every committed checkpoint's manifest and verifies them newest first until one is
    intact. A storage error that is not damage propagates."""
    refs, committed_set = all_folders(repo)
    committed = [r for r in refs if r in committed_set]
    damage: dict[CheckpointRef, str] = {}
    sizes: dict[CheckpointRef, int | None] = {}
    for ref in committed:
        try:
            sizes[ref] = repo.check_sizes(ref).total_bytes
        except CorruptCheckpointError as error:
            damage[ref] = redactor.reason(error)
            sizes[ref] = folder_bytes(repo.storage, ref)
    newest_intact: CheckpointRef | None = None
    for ref in committed:
        if ref in damage:
            continue
        try:
            repo.verify(ref)
        except CorruptCheckpointError as error:
            damage[ref] = redactor.reason(error)
            continue
        newest_intact = ref
        break
    candidates = [Candidate(name=r.name, step=r.step, intact=r == newest_intact) for r in committed]
    doomed = {c.name for c in KeepLast(keep).to_delete(candidates)}
    if newest_intact is not None and newest_intact.name in doomed:  # the rule promises this never happens
        raise AssertionError(f"retention chose the newest intact checkpoint {newest_intact.name}")
    items: list[GcItem] = []
    for i, ref in enumerate(committed):
        state = f"damaged: {damage[ref]}" if ref in damage else "verified" if ref == newest_intact else "sizes ok"
        if ref.name in doomed:
            reason = f"beyond the newest {keep} and older than the newest verified checkpoint ({state})"
        elif ref == newest_intact:
            reason = f"the newest intact checkpoint ({state})" if i >= keep else f"one of the newest {keep} ({state})"
        elif i < keep:
            reason = f"one of the newest {keep} ({state})"
        else:
            reason = f"kept: no intact checkpoint is newer, so it is evidence ({state})"
        items.append(GcItem(ref=ref, committed=True, delete=ref.name in doomed, reason=reason, size=sizes[ref]))
    shared = repo.shared_folders() if len(refs) > len(committed) else {}
    for ref in refs:
        if ref in committed_set:
            continue
        size = folder_bytes(repo.storage, ref)
        if ref in shared:
            reason = f"holds {shared[ref]} blob(s) that committed checkpoints share"
            items.append(GcItem(ref=ref, committed=False, delete=False, reason=reason, size=size))
            continue
        written = max(ref.created_ms / 1000, newest_write(repo.storage, ref) or 0.0)
        age = now - written
        old = age > partial_older_than
        reason = (
            f"uncommitted, last written {age:.0f} s ago (limit {partial_older_than:g} s)"
            if old
            else f"uncommitted but recent ({max(age, 0):.0f} s ago): may be a save in progress"
        )
        items.append(GcItem(ref=ref, committed=False, delete=old, reason=reason, size=size))
    items.sort(key=lambda item: item.ref, reverse=True)
    return GcPlan(items=items, newest_intact=newest_intact.name if newest_intact is not None else None)


def apply_gc(
    repo: CheckpointRepository,
    doomed: Sequence[GcItem],
    redactor: Redactor,
    on_each: Callable[[], None] | None = None,
) -> GcResult:
    """Delete the ``doomed`` items of a plan; ``on_each()`` is called after each one (done or not).

    A committed checkpoint is deleted through the repository (blobs that newer checkpoints share stay); an
    uncommitted folder is swept (never a blob a committed checkpoint uses) unless it was committed since it was
    planned. A failure is recorded and the rest go on.
    """
    result = GcResult()
    for item in doomed:
        try:
            if item.committed:
                repo.delete(item.ref)
                result.deleted.append(item)
            elif repo.is_committed(item.ref):
                result.skipped.append(item.ref.name)  # committed since it was listed: not ours to remove
            else:
                repo.sweep(item.ref, repo.live_keys())
                result.deleted.append(item)
        except SpotsafeError as error:
            result.failures.append(f"{item.ref.name}: {redactor.reason(error)}")
        if on_each is not None:
            on_each()
    return result
