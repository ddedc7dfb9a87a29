"""Local-then-upload (``stage_dir``): commit on fast local disk first, then copy to durable storage.

(Not to be confused with :mod:`spotsafe.engine.staging`, the reused host memory a snapshot is copied into.)

The save worker commits the checkpoint in a local stage folder, then uploads it
from that copy (which nothing modifies) and commits it on the durable store with
the same protocol as a direct save (blobs, then the manifest, fenced). The local
copy alone never counts as durable: restore reads only the durable store.

At start, :func:`open_stage` claims the stage folder for the run and
:func:`recover_stage` looks at what it still holds: a
committed local checkpoint newer than every durable one is an emergency save
whose upload was cut off by the stop (the disk survived: an AWS ``stop`` or
``hibernate``, a persistent volume, a requeue on the same node). It is uploaded,
verified on the way, before anything else; then the folder is wiped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator

from spotsafe.errors import ConfigError, CorruptCheckpointError, SpotsafeError
from spotsafe.storage.base import ChunkSource, local_paths
from spotsafe.storage.local import LocalStorage
from spotsafe.storage.manifest import BlobEntry, Manifest
from spotsafe.storage.repository import CHECKPOINTS, CheckpointRef, CheckpointRepository

READ_CHUNK = 8 * 1024 * 1024
STAGE_MARKER = "stage-of.json"
"""Names the run a stage folder belongs to: only that run's local copies may be uploaded into it."""
log = logging.getLogger("spotsafe")


def _source(stage_storage: LocalStorage, ref: CheckpointRef, entry: BlobEntry) -> ChunkSource:
    key = f"{ref.key}/{entry.path}"

    def chunks() -> Iterator[bytes]:
        with stage_storage.open_read(key) as handle:
            while chunk := handle.read(READ_CHUNK):
                yield chunk

    return chunks


def upload_staged(
    stage: CheckpointRepository, stage_storage: LocalStorage, durable: CheckpointRepository, ref: CheckpointRef
) -> Manifest:
    """Copy the staged checkpoint ``ref`` to ``durable`` under the same name, commit it there, point
    ``latest`` at it and drop older staged copies. Shared blobs are not copied: they are checked
    to exist on ``durable`` (where the checkpoints they belong to were uploaded before).
    """
    local = stage.read_manifest(ref)
    pending = durable.begin_copy(ref)
    try:
        for entry in local.blobs:
            if entry.checkpoint is not None:
                pending.add_shared(entry)
                continue
            copied = pending.write_blob(entry.path, _source(stage_storage, ref, entry))
            if (copied.size, copied.checksum) != (entry.size, entry.checksum):
                raise CorruptCheckpointError(
                    f"the staged copy of {entry.path} changed on local disk; not uploading it",
                    checkpoint=ref.name,
                )
        manifest = pending.commit(metadata=local.metadata, writer=local.writer)
    except BaseException:
        if not pending.committed:
            with contextlib.suppress(Exception):  # leftovers are removed at the next start
                pending.abort()
        raise
    for old in stage.committed():
        if old != ref:
            stage_storage.delete_prefix(old.key)
    return manifest


def recover_stage(
    stage: CheckpointRepository, stage_storage: LocalStorage, durable: CheckpointRepository
) -> list[CheckpointRef]:
    """Upload the newest staged checkpoint if it is newer than every durable one; wipe the stage.

    Returns what was uploaded. A staged copy that is damaged, or shares a blob the durable
    store no longer has, is left out (with a warning): the durable checkpoints are the resume
    point then, as always.
    """
    uploaded: list[CheckpointRef] = []
    staged = stage.committed()
    if staged:
        durable_refs = durable.committed()
        newest = max(durable_refs) if durable_refs else None
        candidate = staged[0]
        if (newest is None or candidate > newest) and candidate not in durable_refs:
            try:
                upload_staged(stage, stage_storage, durable, candidate)
                uploaded.append(candidate)
            except SpotsafeError as err:
                log.warning("spotsafe: not uploading the staged checkpoint %s: %s", candidate.name, err)
    wipe_stage(stage_storage)
    return uploaded


def wipe_stage(storage: LocalStorage) -> None:
    """Remove every staged checkpoint: none of them counts for anything after a restart."""
    storage.delete_prefix(CHECKPOINTS)


def open_stage(
    stage_dir: str | os.PathLike[str],
    durable: CheckpointRepository,
    *,
    clock: Callable[[], float],
) -> tuple[CheckpointRepository, LocalStorage, list[CheckpointRef]]:
    """Claim ``stage_dir`` for the run of ``durable``: the stage's repository and storage, and what was recovered.

    A stage that belongs to this run has its newest local checkpoint uploaded (:func:`recover_stage`);
    one that belongs to another run (or to none) is wiped. Then it is marked as this run's.
    """
    stage = LocalStorage(stage_dir, direct_io=False)  # read back soon by the upload: through the page cache
    local = local_paths(durable.storage)
    if local is not None and str(stage.root_path) == str(local.root_path):
        raise ConfigError("stage_dir must differ from the run's location")
    repo = CheckpointRepository(stage, clock=clock)
    owner = str(durable.storage.url)
    try:
        marker = json.loads(stage.read(STAGE_MARKER)).get("run")
    except (SpotsafeError, ValueError, AttributeError):
        marker = None
    recovered: list[CheckpointRef] = []
    if marker == owner:  # only this run's local copies may be uploaded into it
        recovered = recover_stage(repo, stage, durable)
    else:
        wipe_stage(stage)
    stage.write_atomic(STAGE_MARKER, json.dumps({"run": owner}).encode())
    return repo, stage, recovered
