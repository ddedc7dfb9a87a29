"""How many processes wrote a run's checkpoints, and the refusal to resume them at another world size.

One process saves under ``<url>``; the ranks of a distributed job each save under ``<url>/rank-<r>``
(:func:`~spotsafe.engine.agreement.rank_url`). A checkpoint cannot yet be resumed at another number of
ranks: each rank's state (its data shard's position, its random streams) belongs to that rank. Without a
check, a job restarted with fewer or more ranks would look in folders that do not hold its state and start
over from step 0, or resume some ranks and drop the others' data positions, without a word. So ``restore()``
looks first at what the run's location holds (:func:`saved_layout`) and raises
:class:`~spotsafe.errors.WorldSizeMismatchError` (exit 2: the command must change) naming both numbers.

The rule, for a job of ``M`` processes (1: not distributed):

* ``M == 1``: its own checkpoints (under ``<url>``) are used when there are any; otherwise rank folders with
  committed checkpoints mean the run was written by ``N = highest rank + 1`` processes: refused.
* ``M > 1``: rank folders with committed checkpoints: ``N = highest rank + 1`` must equal ``M``. None, but
  checkpoints under ``<url>`` itself: written by one process: refused. A rank folder missing below ``N``
  (its checkpoints lost) is the restore's own business: every rank refuses to start over (exit 65).

Every rank decides on what all ranks saw (a node's local disk holds only its own ranks' folders): the
layouts are combined with one ``all_gather_object`` before any rank decides.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from spotsafe.engine.agreement import Agreement
from spotsafe.engine.config import StorageConfig
from spotsafe.errors import CorruptCheckpointError, WorldSizeMismatchError
from spotsafe.exit_codes import EXIT_USAGE
from spotsafe.reasons import ExitReason
from spotsafe.storage.base import Storage
from spotsafe.storage.layout import CHECKPOINTS, CheckpointRef, rank_folder, rank_folders, rank_of
from spotsafe.storage.manifest import MANIFEST_NAME
from spotsafe.storage.registry import open_storage
from spotsafe.storage.repository import CheckpointRepository
from spotsafe.telemetry import events as ev

log = logging.getLogger("spotsafe")


@dataclass(frozen=True)
class SavedLayout:
    """What a run's location holds: committed checkpoints of one process (``single``), and the ranks whose
    folders hold committed checkpoints."""

    single: bool = False
    ranks: frozenset[int] = frozenset()

    @property
    def world_size(self) -> int | None:
        """How many processes wrote it (``None``: nothing committed)."""
        if self.ranks:
            return max(self.ranks) + 1
        return 1 if self.single else None

    @staticmethod
    def union(layouts: Iterable[SavedLayout]) -> SavedLayout:
        listed = list(layouts)
        return SavedLayout(single=any(x.single for x in listed), ranks=frozenset(r for x in listed for r in x.ranks))


def _committed(storage: Storage, folder: str) -> bool:
    """Whether ``folder`` (``""``: the location itself) holds a committed checkpoint (one listing)."""
    prefix = f"{folder}/{CHECKPOINTS}" if folder else CHECKPOINTS
    depth = prefix.count("/") + 3
    for key in storage.find(prefix):
        parts = key.split("/")
        if len(parts) == depth and parts[-1] == MANIFEST_NAME and CheckpointRef.parse(parts[-2]) is not None:
            return True
    return False


def saved_layout(base: Storage) -> SavedLayout:
    """What ``base`` (a run's location, not a rank's folder) holds; one listing per rank folder."""
    ranks = frozenset(
        rank for name in rank_folders(base) if (rank := rank_of(name)) is not None and _committed(base, name)
    )
    return SavedLayout(single=_committed(base, ""), ranks=ranks)


def mismatch(layout: SavedLayout, world_size: int) -> int | None:
    """The world size that wrote ``layout`` when a job of ``world_size`` processes must not resume it, else
    ``None`` (see the module docstring)."""
    if world_size == 1:
        return None if layout.single or not layout.ranks else layout.world_size
    saved = layout.world_size
    return saved if saved is not None and saved != world_size else None


def mismatch_error(url: str, saved: int, world_size: int) -> WorldSizeMismatchError:
    def processes(n: int) -> str:
        return "one process" if n == 1 else f"{n} ranks"

    where = f"{url}/{rank_folder(0)} .. {rank_folder(saved - 1)}" if saved > 1 else url
    launch = "run it as one process" if saved == 1 else f"run it with {saved} ranks (torchrun --nproc-per-node {saved})"
    return WorldSizeMismatchError(
        f"{url} holds checkpoints written by {processes(saved)} ({where}); this job runs {processes(world_size)}. "
        f"spotsafe cannot resume a checkpoint at another world size yet: each rank's data position and random "
        f"streams belong to that rank. To go on from the checkpoint, {launch}; to start over, give the job "
        "another checkpoint location. Nothing was deleted.",
        saved=saved,
        world_size=world_size,
    )


def check_world(
    config: StorageConfig, own: Storage, agreement: Agreement | None, *, injected: bool, emit: Callable[..., None]
) -> None:
    """Before a restore: raise :class:`~spotsafe.errors.WorldSizeMismatchError` (after ``restore_failed`` and
    ``run_exited``) when this job (one process, or ``agreement``'s ranks) must not resume what its location
    holds. ``config`` is the run's location (not a rank's folder) and ``own`` this process's storage.
    Collective with ``agreement``: every rank must call it. An ``injected`` storage of a distributed job has
    no known run location: nothing is checked."""
    location = own if agreement is None or injected or config.url is None else None
    if location is None:
        location = open_storage(str(config.url), config.storage_options, retry=config.retry)
    sharded = sharded_world_size(location)
    if agreement is not None:  # every rank decides on what all saw
        sharded = max((n for n in agreement.gather(sharded) if n is not None), default=None)
    if sharded is not None:
        raise _sharded_error(location.url, sharded, 1 if agreement is None else agreement.world_size, emit)
    if agreement is None:
        if _committed(own, ""):
            return  # one process's own checkpoints: its own to resume, whatever else is there
        layout, world_size, url = saved_layout(own), 1, own.url
    elif injected or config.url is None:
        return
    else:
        url, base = str(config.url), location
        layout, world_size = SavedLayout.union(agreement.gather(saved_layout(base))), agreement.world_size
    saved = mismatch(layout, world_size)
    if saved is None:
        return
    raise refusal(mismatch_error(url, saved, world_size), emit)


def sharded_world_size(storage: Storage) -> int | None:
    """How many ranks wrote the newest committed checkpoint at ``storage`` when ``spotsafe.sharded`` wrote
    it (one checkpoint for all ranks), else ``None``. One listing and one manifest read."""
    repo = CheckpointRepository(storage)
    for ref in repo.committed():
        try:
            manifest = repo.read_manifest(ref)
        except CorruptCheckpointError:
            continue  # the restore's fallback decides about damaged ones
        # spotsafe.sharded.layout's LAYOUT and world_size_of, read here without importing DCP at start-up
        world = manifest.metadata.get("world_size")
        if manifest.metadata.get("layout") != "sharded":
            return None
        return world if isinstance(world, int) and not isinstance(world, bool) and world >= 1 else 1
    return None


def _sharded_error(url: str, saved: int, world_size: int, emit: Callable[..., None]) -> WorldSizeMismatchError:
    error = WorldSizeMismatchError(
        f"{url} holds checkpoints that spotsafe.sharded wrote (one checkpoint for all {saved} rank(s)); the "
        "Checkpointer keeps each rank's state in its own folder and does not resume them. Load them with "
        "spotsafe.sharded.load (at any number of ranks), or give this job another checkpoint location. "
        "Nothing was deleted.",
        saved=saved,
        world_size=world_size,
    )
    return refusal(error, emit)


def refusal(error: WorldSizeMismatchError, emit: Callable[..., None]) -> WorldSizeMismatchError:
    """``error``, once the run's events (``restore_failed``, ``run_exited``) and log say why the run stops."""
    emit(ev.RestoreFailed, checkpoints=0, reason=str(error))
    emit(ev.RunExited, reason=ExitReason.WORLD_SIZE_MISMATCH, step=0, exit_code=EXIT_USAGE)
    log.error("spotsafe: %s", error)
    return error


__all__ = ["SavedLayout", "check_world", "mismatch", "refusal", "saved_layout", "sharded_world_size"]
