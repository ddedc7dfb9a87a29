"""A run's progress as the supervisor reads it: the newest step its checkpoints have committed."""

from __future__ import annotations

from spotsafe.batch.job import done_items, open_existing
from spotsafe.storage.layout import rank_folders
from spotsafe.storage.registry import open_storage
from spotsafe.storage.repository import CheckpointRepository


def newest_step(url: str) -> int | None:
    """The newest committed checkpoint's step at ``url`` (``None``: none yet); for a job of several ranks (each
    saving under ``rank-<r>``), the newest step that every rank has committed. A batch job's step
    (:mod:`spotsafe.batch`): the items it has committed."""
    storage = open_storage(url)
    batch = open_existing(storage)
    if batch is not None:
        return done_items(batch.done()) or None
    refs = CheckpointRepository(storage).committed()
    if refs:
        return max(refs).step
    common: set[int] | None = None
    for name in rank_folders(storage):
        steps = {ref.step for ref in CheckpointRepository(open_storage(f"{url.rstrip('/')}/{name}")).committed()}
        common = steps if common is None else common & steps
    return max(common) if common else None
