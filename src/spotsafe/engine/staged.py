"""Local-then-upload: commit on fast local disk, copy to durable storage in the background.

The training loop waits only for the local commit, so the stall (and the
emergency save on a notice) is bounded by local disk speed. One upload runs at a
time, on a background thread, from the local copy (which nothing modifies), and
commits on the durable store with the same protocol as a direct save (blobs,
then the manifest, fenced). The local copy alone never counts as durable:
restore reads only the durable store, and the staging folder is wiped at start.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from spotsafe.errors import CorruptCheckpointError
from spotsafe.storage.base import ChunkSource
from spotsafe.storage.local import LocalStorage
from spotsafe.storage.manifest import BlobEntry, Manifest
from spotsafe.storage.repository import CHECKPOINTS, CheckpointRef, CheckpointRepository

READ_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class Upload:
    """One staged checkpoint on its way to durable storage."""

    ref: CheckpointRef
    reason: str
    started: float
    stall_s: float


@dataclass(frozen=True)
class UploadDone:
    upload: Upload
    manifest: Manifest | None
    error: BaseException | None
    finished: float


class Uploader:
    """Copies staged checkpoints to ``durable``, one at a time, on a daemon thread.

    ``on_done(result)`` runs on the upload thread after each upload (committed or failed).
    Contract: :meth:`submit`, :meth:`wait` and :meth:`take_failure` are called from one thread.
    """

    def __init__(
        self,
        stage: CheckpointRepository,
        stage_storage: LocalStorage,
        durable: CheckpointRepository,
        on_done: Callable[[UploadDone], None],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stage = stage
        self.stage_storage = stage_storage
        self.durable = durable
        self.on_done = on_done
        self._clock = clock
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, upload: Upload) -> None:
        """Start uploading ``upload`` (waits for the previous upload first: at most one in flight)."""
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(upload,), name="spotsafe-upload", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until no upload is running."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def take_failure(self) -> BaseException | None:
        """The error of a failed upload not yet reported, and forget it."""
        failure, self._failure = self._failure, None
        return failure

    def _source(self, ref: CheckpointRef, entry: BlobEntry) -> ChunkSource:
        path = self.stage_storage.path_of(f"{ref.key}/{entry.path}")

        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as handle:
                while chunk := handle.read(READ_CHUNK):
                    yield chunk

        return chunks

    def _run(self, upload: Upload) -> None:
        ref = upload.ref
        manifest: Manifest | None = None
        error: BaseException | None = None
        try:
            local = self.stage.read_manifest(ref)
            pending = self.durable.begin_copy(ref)
            try:
                for entry in local.blobs:
                    copied = pending.write_blob(entry.path, self._source(ref, entry))
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
            self.durable.write_latest(ref)
            for old in self.stage.committed():
                if old != ref:
                    self.stage_storage.delete_prefix(old.key)
        except BaseException as err:  # noqa: BLE001 - reported to the training thread at its next call
            error = err
            self._failure = err
        self.on_done(UploadDone(upload=upload, manifest=manifest, error=error, finished=self._clock()))


def wipe_stage(storage: LocalStorage) -> None:
    """Remove every staged checkpoint: none of them counts for anything after a restart."""
    storage.delete_prefix(CHECKPOINTS)
