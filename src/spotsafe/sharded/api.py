"""Save and load one checkpoint for all ranks, through torch.distributed.checkpoint (DCP).

A sharded checkpoint is an ordinary spotsafe checkpoint folder (``<url>/checkpoints/<name>/``, one
manifest, committed last) that every rank of the job wrote into::

    r00000.distcp  r00001.distcp     each rank's DCP chunks (replicated tensors: one rank writes them)
    r00000.state.json  .state.bin    each rank's own state (RNG streams, ...), when given
    dcp.json                         DCP's metadata, as JSON (spotsafe.sharded.metadata)
    state.json                       the global state's non-tensor values (spotsafe.state.codec)
    manifest.json                    written last by rank 0: every rank's blobs, sizes, checksums

Its manifest's metadata says ``"layout": "sharded"`` and ``"world_size": N``. Because DCP reshards at
load time, a checkpoint saved by ``N`` ranks loads at any ``M``: each rank gets its part of every
``DTensor`` and the whole of every replicated tensor. The *global* state (``state``) must have the same
structure and the same non-tensor values on every rank (model and optimizer state from
``torch.distributed.checkpoint.state_dict.get_state_dict``, a scheduler's state); what differs between
ranks goes in ``rank_state``, which only a rank of the same number gets back (the rule for ranks that
did not exist, and for ranks that no longer exist, is the caller's: see :class:`Restored`).

Both functions are collective: every rank of ``process_group`` calls them with the same arguments
(their own ``state``). Without torch.distributed they work for one process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
import xxhash
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import async_save as dcp_async_save
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from spotsafe.engine.commits import AfterSave
from spotsafe.engine.reader import no_usable_checkpoint
from spotsafe.errors import CheckpointMismatchError, CorruptCheckpointError, StateError, UnsafeCheckpointError
from spotsafe.policy.retention import KeepLast
from spotsafe.sharded import metadata as dcp_json
from spotsafe.sharded.group import Group
from spotsafe.sharded.inflight import SaveInFlight
from spotsafe.sharded.layout import (
    GLOBAL_BLOB,
    LAYOUT,
    blob_reader,
    is_sharded,
    read_global_doc,
    read_rank_state,
    to_json,
    world_size_of,
    write_rank_state,
)
from spotsafe.sharded.storage import Previous, SpotsafeReader, SpotsafeWriter
from spotsafe.sharded.tree import join, split
from spotsafe.storage.base import Storage
from spotsafe.storage.manifest import BlobEntry, Manifest
from spotsafe.storage.pending import PendingCheckpoint
from spotsafe.storage.registry import open_storage
from spotsafe.storage.repository import CheckpointRef, CheckpointRepository

log = logging.getLogger("spotsafe")


@dataclass(frozen=True)
class Restored:
    """What :func:`load` restored.

    ``state``: the saved global state, its tensors loaded into the template's (resharded to this job's
    ranks). ``rank_state``: this rank's own saved state, or ``None`` when the checkpoint has none for this
    rank (saved by fewer ranks, or saved without). ``world_size``: how many ranks saved it."""

    ref: CheckpointRef
    step: int
    state: Any
    rank_state: Any
    world_size: int
    metadata: dict[str, Any]


def repository(target: str | os.PathLike[str] | Storage | CheckpointRepository, **options: Any) -> CheckpointRepository:
    if isinstance(target, CheckpointRepository):
        return target
    if isinstance(target, (str, os.PathLike)):
        return CheckpointRepository(open_storage(target, options or None))
    return CheckpointRepository(target)


# -- saving ------------------------------------------------------------------------------------------


def save(
    state: Mapping[str, Any],
    target: str | os.PathLike[str] | Storage | CheckpointRepository,
    *,
    step: int,
    rank_state: Any = None,
    process_group: Any = None,
    keep: int | None = 3,
    incremental: bool = True,
    generation: int = 0,
    metadata: Mapping[str, Any] | None = None,
    writer: Mapping[str, Any] | None = None,
    blocking: bool = True,
) -> CheckpointRef | SaveInFlight:
    """Save ``state`` (every rank's view of the global state) and each rank's ``rank_state`` as one
    checkpoint; return it once it is committed (collective; see the module docstring).

    ``keep``: rank 0 then deletes all but the newest ``keep`` checkpoints (``None``: none). ``incremental``:
    chunks whose bytes did not change since the newest checkpoint are shared with it, not written again.
    Raises on every rank when any rank fails; nothing is committed then.

    ``blocking=False``: return a :class:`SaveInFlight` as soon as the tensors are copied to host memory
    (DCP's ``async_save``; training may then change them) and write in a background thread, on a gloo
    group of its own. One save is in flight at a time: the next ``save`` waits for it first (and raises
    its error if nobody called :meth:`SaveInFlight.wait`)."""
    global _in_flight
    if _in_flight is not None:
        previous_save, _in_flight = _in_flight, None
        previous_save.settle()
    repo = repository(target)
    group = Group(process_group)
    doc, tensors = split(state)
    _check_same_everywhere(group, doc)
    begun: tuple[CheckpointRef, str | None] = group.broadcast(
        _begin(repo, step, generation) if group.rank == 0 else None
    )
    ref, previous_name = begun
    pending = repo.begin_copy(ref)
    previous = _previous(repo, previous_name) if incremental else None
    failed: BaseException | None = None
    own: list[BlobEntry] = []
    try:
        if rank_state is not None:
            own = write_rank_state(pending, group.rank, rank_state)
        if group.rank == 0:
            own.append(pending.write_blob(GLOBAL_BLOB, lambda: [to_json({"state": doc})]))
    except Exception as err:  # noqa: BLE001 - every rank must learn of it before DCP's collectives start
        failed = err
    if not group.all_true(failed is None):
        _abort_if_coordinator(group, pending)
        if failed is not None:
            raise failed
        raise StateError("another rank failed to write its part of the checkpoint; nothing was committed")

    def finish(md: Metadata, stored: dict[MetadataIndex, dcp_json.StoredChunk], blobs: list[BlobEntry]) -> None:
        pending.write_blob(dcp_json.BLOB, lambda: [dcp_json.encode(md, stored)])
        for entry in [*blobs, *others]:
            if entry.checkpoint is not None:
                pending.add_shared(entry)
            elif not any(b.ref == entry.ref for b in pending.blobs):
                pending.add_written(entry, writer="a rank")
        pending.commit(
            metadata={**dict(metadata or {}), "layout": LAYOUT, "world_size": group.world_size},
            writer={**dict(writer or {}), "rank": 0, "world_size": group.world_size},
        )

    others = [e for entries in group.gather(own) for e in entries]
    storage_writer = SpotsafeWriter(pending, rank=group.rank, previous=previous, finish=finish)
    planner = DefaultSavePlanner()
    try:
        with _quiet(group):
            if not blocking:
                future = dcp_async_save(
                    tensors, storage_writer=storage_writer, planner=planner, process_group=group.background_group()
                )
                assert isinstance(future, Future)
                _in_flight = SaveInFlight(ref, future, lambda ok: _after(group, repo, pending, keep, ok))
                return _in_flight
            dcp_save(tensors, storage_writer=storage_writer, planner=planner, process_group=group.dcp_group)
    except BaseException:
        _abort_if_coordinator(group, pending)
        raise
    _after(group, repo, pending, keep, True)
    return ref


_in_flight: SaveInFlight | None = None


def _after(group: Group, repo: CheckpointRepository, pending: PendingCheckpoint, keep: int | None, ok: bool) -> None:
    """After a save ended: rank 0 removes a failed one's folder, or applies retention to a committed one."""
    if not ok:
        _abort_if_coordinator(group, pending)
    elif group.rank == 0 and keep is not None:
        _retain(repo, pending.ref, keep)


@contextlib.contextmanager
def _quiet(group: Group) -> Iterator[None]:
    """DCP warns that one process without torch.distributed saves alone: that is what it is for here."""
    with warnings.catch_warnings():
        if not group.active:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _begin(repo: CheckpointRepository, step: int, generation: int) -> tuple[CheckpointRef, str | None]:
    newest = next((r for r in repo.committed() if _sharded_manifest(repo, r) is not None), None)
    return repo.begin(step, generation).ref, None if newest is None else newest.name


def _sharded_manifest(repo: CheckpointRepository, ref: CheckpointRef) -> Manifest | None:
    try:
        manifest = repo.read_manifest(ref)
    except CorruptCheckpointError:
        return None
    return manifest if is_sharded(manifest) else None


def _previous(repo: CheckpointRepository, name: str | None) -> Previous | None:
    """The newest sharded checkpoint's chunks, for an incremental save; ``None`` when it cannot be read."""
    ref = None if name is None else CheckpointRef.parse(name)
    if ref is None:
        return None
    try:
        manifest = repo.read_manifest(ref)
        _, stored = dcp_json.decode(repo.read_blob(ref, manifest.blob(dcp_json.BLOB)), f"{ref.name}/{dcp_json.BLOB}")
    except (CorruptCheckpointError, UnsafeCheckpointError) as err:
        log.warning("spotsafe: not sharing chunks with %s: %s", ref.name, err)
        return None
    return Previous(ref, manifest, dcp_json.by_key(stored))


def _check_same_everywhere(group: Group, doc: Any) -> None:
    if group.world_size == 1:
        return
    digests = group.gather(xxhash.xxh3_128(to_json(doc)).hexdigest())
    differing = [r for r, d in enumerate(digests) if d != digests[0]]
    if differing:
        raise StateError(
            f"the global state's non-tensor values differ between rank 0 and rank(s) {differing}: a sharded "
            "checkpoint keeps one copy of them. Pass what differs between ranks as rank_state."
        )


def _abort_if_coordinator(group: Group, pending: PendingCheckpoint) -> None:
    if group.rank == 0 and not pending.committed:
        with contextlib.suppress(Exception):
            pending.abort()


def _retain(repo: CheckpointRepository, ref: CheckpointRef, keep: int) -> None:
    try:
        repo.write_latest(ref)
        AfterSave(repo, KeepLast(keep), emit=lambda *a, **k: None).apply_retention(ref)
    except Exception as err:  # noqa: BLE001 - the checkpoint is committed; failing to tidy up must not undo that
        log.warning("spotsafe: after committing %s: %s", ref.name, err)


# -- loading -----------------------------------------------------------------------------------------


@dataclass
class _Candidate:
    ref: CheckpointRef
    manifest: Manifest
    metadata: Metadata
    stored: dict[MetadataIndex, dcp_json.StoredChunk]
    doc: Any
    rank_state: Any


def load(
    state: Mapping[str, Any],
    target: str | os.PathLike[str] | Storage | CheckpointRepository,
    *,
    process_group: Any = None,
) -> Restored | None:
    """Load the newest sharded checkpoint that every rank can read into ``state`` (a template: this job's
    state, whose tensors, ``DTensor`` shards included, are filled in place); ``None`` when there is none.

    A damaged checkpoint (a missing or altered blob on any rank) is skipped by all ranks together; when all
    are damaged, :class:`~spotsafe.errors.NoUsableCheckpointError` names each. A checkpoint whose tensors
    do not fit the template raises :class:`~spotsafe.errors.CheckpointMismatchError`. Collective."""
    repo = repository(target)
    group = Group(process_group)
    template_doc, template = split(state)
    names: list[str] = group.broadcast([r.name for r in repo.committed()] if group.rank == 0 else None)
    damaged: list[tuple[str, str]] = []
    for name in names:
        ref = CheckpointRef.parse(name)
        assert ref is not None
        candidate, problem = _read_candidate(repo, ref, group.rank)
        problems = group.gather(problem)
        if any(p is not None for p in problems):
            reason = next(p for p in problems if p is not None)
            if reason != "not sharded":
                damaged.append((name, reason))
                log.warning("spotsafe: skipping checkpoint %s: %s", name, reason)
            continue
        assert candidate is not None
        _check_fits(candidate, template, group)
        reader = SpotsafeReader(repo, ref, candidate.manifest, candidate.metadata, candidate.stored)
        try:
            with _quiet(group):
                dcp_load(template, storage_reader=reader, planner=DefaultLoadPlanner(), process_group=group.dcp_group)
        except CheckpointException as err:
            reason = _damage(err)
            if reason is None:
                raise
            damaged.append((name, reason))
            log.warning("spotsafe: skipping checkpoint %s: %s", name, reason)
            continue
        return Restored(
            ref=ref,
            step=ref.step,
            state=join(candidate.doc, template, f"{name}/{GLOBAL_BLOB}"),
            rank_state=candidate.rank_state,
            world_size=world_size_of(candidate.manifest),
            metadata=dict(candidate.manifest.metadata),
        )
    del template_doc
    if damaged:
        raise no_usable_checkpoint(repo.storage.url, damaged)
    return None


def _read_candidate(repo: CheckpointRepository, ref: CheckpointRef, rank: int) -> tuple[_Candidate | None, str | None]:
    """This rank's reading of ``ref`` (manifest, metadata, global and own state), or what is wrong with it."""
    try:
        manifest = repo.read_manifest(ref)
        if not is_sharded(manifest):
            return None, "not sharded"
        saved_world = world_size_of(manifest)
        blob, where = blob_reader(repo, ref, manifest), ref.name
        md, stored = dcp_json.decode(blob(dcp_json.BLOB), f"{where}/{dcp_json.BLOB}")
        doc = read_global_doc(blob, list(md.state_dict_metadata), where)
        rank_state = read_rank_state(blob, manifest, rank, where) if rank < saved_world else None
    except (CorruptCheckpointError, UnsafeCheckpointError) as err:
        return None, str(err)
    return _Candidate(ref, manifest, md, stored, doc, rank_state), None


def _check_fits(candidate: _Candidate, template: dict[str, torch.Tensor], group: Group) -> None:
    saved = set(candidate.metadata.state_dict_metadata)
    wanted = set(template)
    if saved != wanted:
        raise CheckpointMismatchError(
            f"checkpoint {candidate.ref.name} does not fit this job's state: saved but not wanted "
            f"{sorted(saved - wanted)[:5]}, wanted but not saved {sorted(wanted - saved)[:5]}"
        )
    for key, tensor in template.items():
        md = candidate.metadata.state_dict_metadata[key]
        shape = getattr(md, "size", None)
        if shape is not None and tuple(shape) != tuple(tensor.shape):
            raise CheckpointMismatchError(
                f"checkpoint {candidate.ref.name}: {key} has shape {list(shape)} there, {list(tensor.shape)} here"
            )


def _damage(err: CheckpointException) -> str | None:
    """What is wrong with the checkpoint when DCP's failure on some rank was damage, else ``None``."""
    failures = getattr(err, "failures", {}) or {}
    reasons = []
    for failure in failures.values():
        cause = failure[0] if isinstance(failure, tuple) else failure
        if not isinstance(cause, (CorruptCheckpointError, UnsafeCheckpointError)):
            return None
        reasons.append(str(cause))
    return reasons[0] if reasons else None


__all__ = ["LAYOUT", "Restored", "SaveInFlight", "is_sharded", "load", "save", "world_size_of"]
