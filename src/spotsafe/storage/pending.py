"""Writing one checkpoint: blobs streamed and checksummed, then the manifest, committed last.

A save is (1) :meth:`~spotsafe.storage.repository.CheckpointRepository.begin`, (2) any
number of :meth:`PendingCheckpoint.write_blob` (and :meth:`PendingCheckpoint.add_shared`
for an incremental save's blobs of older checkpoints), (3) :meth:`PendingCheckpoint.commit`.
Until (3) returns, readers do not see the checkpoint at all: on a disk the manifest
appears by rename, on an object store by a single PUT. Every save gets a folder of its
own, so a save never writes into a committed checkpoint.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from spotsafe.errors import CorruptCheckpointError
from spotsafe.priority import HASH_NICE, lower_priority
from spotsafe.storage.base import BlobNotFoundError, Chunk, ChunkSource, Storage
from spotsafe.storage.layout import CHECKPOINTS, CheckpointRef, blob_key
from spotsafe.storage.manifest import MANIFEST_NAME, BlobEntry, Manifest, check_blob_name, new_hasher

HASH_INLINE = 256 * 1024
"""Chunks smaller than this are checksummed on the writing thread (a hand-off would cost more)."""

_POOL: list[ThreadPoolExecutor] = []
_POOL_LOCK = threading.Lock()


def _hash_pool() -> ThreadPoolExecutor:
    """The one thread that checksums chunks alongside their writes (started on first use, at low priority)."""
    with _POOL_LOCK:
        if not _POOL:
            _POOL.append(ThreadPoolExecutor(1, "spotsafe-hash", initializer=lower_priority, initargs=(HASH_NICE,)))
        return _POOL[0]


def _hash_alongside(hasher: Any, chunk: Chunk) -> Future[None] | None:
    """Checksum ``chunk`` on the helper thread while storage writes it (both only read it; xxhash and the write
    release the GIL); the caller waits for it before asking its source for the next chunk, which may reuse the
    memory. ``None`` once the interpreter is shutting down (no new threads then: a save finished at exit by the
    save worker hashes inline)."""
    try:
        return _hash_pool().submit(hasher.update, chunk)
    except RuntimeError:
        return None


# A forked child has the pool but not its thread: it starts its own.
os.register_at_fork(after_in_child=_POOL.clear)


FenceCheck = Callable[[], None]
"""Called right before a step that publishes or deletes; raises to stop a stale writer (see fencing)."""


class PendingCheckpoint:
    """A save in progress. Not visible to readers until :meth:`commit` returns."""

    def __init__(self, storage: Storage, ref: CheckpointRef, clock: Callable[[], float], fence: FenceCheck) -> None:
        self._storage = storage
        self._clock = clock
        self._fence = fence
        self.ref = ref
        self.blobs: list[BlobEntry] = []
        self.committed = False

    def add_shared(self, entry: BlobEntry) -> None:
        """List a blob of an older checkpoint that this one uses without writing it again."""
        if entry.checkpoint is None or entry.checkpoint == self.ref.name:
            raise ValueError(f"a shared blob must live in another checkpoint, got {entry!r}")
        if any(b.ref == entry.ref for b in self.blobs):
            return
        self.blobs.append(entry)

    def add_written(self, entry: BlobEntry, *, writer: str) -> None:
        """List a blob that another process (``writer``, for messages) wrote into this folder.

        Checked to be there with its size: processes on several machines that write one checkpoint
        must write to storage they all see."""
        check_blob_name(entry.path)
        if entry.checkpoint is not None or any(b.ref == entry.ref for b in self.blobs):
            raise ValueError(f"{entry!r} is not a new blob of this checkpoint")
        try:
            size = self._storage.size(f"{self.ref.key}/{entry.path}")
        except BlobNotFoundError:
            size = -1
        if size != entry.size:
            raise CorruptCheckpointError(
                f"{writer} wrote {entry.path} ({entry.size} bytes), but {self._storage.url} shows "
                + ("no such blob" if size < 0 else f"{size} bytes")
                + " to the process that commits: every process must save to storage they all share "
                "(object storage, or a file system mounted on every machine)",
                checkpoint=self.ref.name,
            )
        self.blobs.append(entry)

    def write_blob(self, name: str, source: ChunkSource) -> BlobEntry:
        """Stream one blob to storage, computing its size and checksum on the way.

        ``source()`` must yield the same bytes every time it is called (a retry calls it again).
        """
        check_blob_name(name)
        if any(b.ref == name for b in self.blobs):
            raise ValueError(f"blob {name!r} written twice in one checkpoint")
        hashers: list[object] = []

        def hashed() -> Iterator[Chunk]:
            hasher = new_hasher()
            hashers.append(hasher)
            for chunk in source():
                hashing = _hash_alongside(hasher, chunk) if memoryview(chunk).nbytes >= HASH_INLINE else None
                if hashing is None:
                    hasher.update(chunk)
                    yield chunk
                    continue
                try:
                    yield chunk
                finally:
                    hashing.result()

        size = self._storage.write_stream(f"{self.ref.key}/{name}", hashed)
        entry = BlobEntry(path=name, size=size, checksum=hashers[-1].hexdigest())  # type: ignore[attr-defined]
        self.blobs.append(entry)
        return entry

    def commit(self, *, metadata: dict[str, object], writer: dict[str, object], verify_shared: bool = True) -> Manifest:
        """Make the checkpoint exist. Every blob is durable before the manifest is written.

        Shared blobs are checked to still exist with their recorded size (``verify_shared``;
        off only for a local staging copy, whose shared blobs live on the durable store).
        Raises :class:`~spotsafe.storage.fencing.FencedError` (and commits nothing)
        if a newer writer has taken over the run.
        """
        if any(b.checkpoint is None for b in self.blobs):
            self._storage.sync_prefix(self.ref.key)
        for entry in self.blobs:
            if entry.checkpoint is not None and verify_shared:
                try:
                    size = self._storage.size(blob_key(self.ref, entry))
                except BlobNotFoundError:
                    size = -1
                if size != entry.size:
                    raise CorruptCheckpointError(
                        f"shared blob {entry.ref} is gone or changed; not committing a checkpoint that needs it",
                        checkpoint=self.ref.name,
                    )
        manifest = Manifest(
            step=self.ref.step,
            created_at=self._clock(),
            blobs=tuple(self.blobs),
            metadata=dict(metadata),
            writer=dict(writer),
        )
        self._fence()
        self._storage.write_atomic(f"{self.ref.key}/{MANIFEST_NAME}", manifest.to_bytes())
        self._storage.sync_prefix(CHECKPOINTS)
        self.committed = True
        return manifest

    def abort(self) -> None:
        """Remove what was written. Never called after :meth:`commit`."""
        if self.committed:
            raise RuntimeError("refusing to abort a committed checkpoint")
        self._storage.delete_prefix(self.ref.key)
