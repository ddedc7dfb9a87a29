"""The commit protocol: how a set of blobs becomes a checkpoint, and how it is found again.

Layout under the run's location::

    checkpoints/
      step-000000000120-1763869512345-9f2c/   one folder per save attempt
        model.bin  optimizer.bin  state.json  ...   blobs, written and made durable first
        manifest.json                               written last, atomically: the commit

A save is (1) :meth:`CheckpointRepository.begin`, (2) any number of
:meth:`PendingCheckpoint.write_blob`, (3) :meth:`PendingCheckpoint.commit`.
Until (3) returns, readers do not see the checkpoint at all. Every save gets a
folder of its own, so a save never writes into a committed checkpoint, even
when it repeats a step that an earlier attempt also saved.

Folder names sort by step, then by creation time, so "newest" needs no manifest
reads. The manifest is still the authority: readers verify it before trusting
the name.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from spotsafe.errors import CorruptCheckpointError
from spotsafe.storage.base import BlobNotFoundError, Chunk, Storage
from spotsafe.storage.local import TMP_MARKER
from spotsafe.storage.manifest import MANIFEST_NAME, BlobEntry, Manifest, check_blob_name, new_hasher

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d{12})-(\d{13})-([0-9a-f]{4})$")


@dataclass(frozen=True, order=True)
class CheckpointRef:
    """A checkpoint folder, identified by name. Orders oldest to newest."""

    step: int
    created_ms: int
    name: str

    @property
    def key(self) -> str:
        return f"{CHECKPOINTS}/{self.name}"

    @classmethod
    def parse(cls, name: str) -> CheckpointRef | None:
        match = _NAME.match(name)
        if match is None:
            return None
        return cls(step=int(match.group(1)), created_ms=int(match.group(2)), name=name)


ProgressFn = Callable[[int], None]


class PendingCheckpoint:
    """A save in progress. Not visible to readers until :meth:`commit` returns."""

    def __init__(self, storage: Storage, ref: CheckpointRef, clock: Callable[[], float]) -> None:
        self._storage = storage
        self._clock = clock
        self.ref = ref
        self.blobs: list[BlobEntry] = []
        self.committed = False

    def write_blob(self, name: str, chunks: Iterable[Chunk]) -> BlobEntry:
        """Stream one blob to storage, computing its size and checksum on the way."""
        check_blob_name(name)
        if any(b.path == name for b in self.blobs):
            raise ValueError(f"blob {name!r} written twice in one checkpoint")
        hasher = new_hasher()

        def hashed() -> Iterator[Chunk]:
            for chunk in chunks:
                hasher.update(chunk)
                yield chunk

        size = self._storage.write_stream(f"{self.ref.key}/{name}", hashed())
        entry = BlobEntry(path=name, size=size, checksum=hasher.hexdigest())
        self.blobs.append(entry)
        return entry

    def commit(self, *, metadata: dict[str, object], writer: dict[str, object]) -> Manifest:
        """Make the checkpoint exist. Every blob is durable before the manifest is written."""
        if self.blobs:
            self._storage.sync_prefix(self.ref.key)
        manifest = Manifest(
            step=self.ref.step,
            created_at=self._clock(),
            blobs=tuple(self.blobs),
            metadata=dict(metadata),
            writer=dict(writer),
        )
        self._storage.write_atomic(f"{self.ref.key}/{MANIFEST_NAME}", manifest.to_bytes())
        self._storage.sync_prefix(CHECKPOINTS)
        self.committed = True
        return manifest

    def abort(self) -> None:
        """Remove what was written. Never called after :meth:`commit`."""
        if self.committed:
            raise RuntimeError("refusing to abort a committed checkpoint")
        self._storage.delete_prefix(self.ref.key)


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint whose every blob was read and verified."""

    ref: CheckpointRef
    manifest: Manifest
    blobs: dict[str, bytearray]


class CheckpointRepository:
    """Checkpoints of one run in one :class:`Storage`."""

    def __init__(self, storage: Storage, *, clock: Callable[[], float] = time.time) -> None:
        self.storage = storage
        self._clock = clock

    # -- listing -------------------------------------------------------------
    def folders(self) -> list[CheckpointRef]:
        """Every checkpoint folder, committed or not, newest first."""
        refs = (CheckpointRef.parse(n) for n in self.storage.list_dirs(CHECKPOINTS))
        return sorted((r for r in refs if r is not None), reverse=True)

    def is_committed(self, ref: CheckpointRef) -> bool:
        return self.storage.exists(f"{ref.key}/{MANIFEST_NAME}")

    def committed(self) -> list[CheckpointRef]:
        """Checkpoints with a committed manifest, newest first (not yet verified)."""
        return [r for r in self.folders() if self.is_committed(r)]

    # -- writing -------------------------------------------------------------
    def begin(self, step: int) -> PendingCheckpoint:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        name = f"step-{step:012d}-{int(self._clock() * 1000):013d}-{secrets.token_hex(2)}"
        ref = CheckpointRef.parse(name)
        assert ref is not None
        return PendingCheckpoint(self.storage, ref, self._clock)

    # -- reading and verifying ----------------------------------------------
    def read_manifest(self, ref: CheckpointRef) -> Manifest:
        try:
            data = self.storage.read(f"{ref.key}/{MANIFEST_NAME}")
        except BlobNotFoundError as err:
            raise CorruptCheckpointError("no committed manifest", checkpoint=ref.name) from err
        manifest = Manifest.from_bytes(data, where=f"{ref.name}/{MANIFEST_NAME}")
        if manifest.step != ref.step:
            raise CorruptCheckpointError(
                f"manifest says step {manifest.step} but the folder says step {ref.step}", checkpoint=ref.name
            )
        return manifest

    def check_sizes(self, ref: CheckpointRef) -> Manifest:
        """Cheap structural check: the manifest parses and every blob has its recorded size."""
        manifest = self.read_manifest(ref)
        for entry in manifest.blobs:
            try:
                size = self.storage.size(f"{ref.key}/{entry.path}")
            except BlobNotFoundError as err:
                raise CorruptCheckpointError(f"blob {entry.path} is missing", checkpoint=ref.name) from err
            if size != entry.size:
                raise CorruptCheckpointError(
                    f"blob {entry.path} has {size} bytes, the manifest says {entry.size}", checkpoint=ref.name
                )
        return manifest

    def read_blob(self, ref: CheckpointRef, entry: BlobEntry) -> bytearray:
        """Read one blob, verifying its size and checksum."""
        key = f"{ref.key}/{entry.path}"
        try:
            size = self.storage.size(key)
        except BlobNotFoundError as err:
            raise CorruptCheckpointError(f"blob {entry.path} is missing", checkpoint=ref.name) from err
        if size != entry.size:
            raise CorruptCheckpointError(
                f"blob {entry.path} has {size} bytes, the manifest says {entry.size}", checkpoint=ref.name
            )
        buffer = bytearray(entry.size)
        got = self.storage.read_into(key, buffer)
        if got != entry.size:
            raise CorruptCheckpointError(
                f"blob {entry.path} ended after {got} of {entry.size} bytes", checkpoint=ref.name
            )
        hasher = new_hasher()
        hasher.update(buffer)
        if hasher.hexdigest() != entry.checksum:
            raise CorruptCheckpointError(f"blob {entry.path} fails its checksum", checkpoint=ref.name)
        return buffer

    def load(self, ref: CheckpointRef, progress: ProgressFn | None = None) -> LoadedCheckpoint:
        """Read and verify every blob of ``ref``. Raises :class:`CorruptCheckpointError`."""
        manifest = self.read_manifest(ref)
        blobs: dict[str, bytearray] = {}
        for entry in manifest.blobs:
            blobs[entry.path] = self.read_blob(ref, entry)
            if progress is not None:
                progress(entry.size)
        return LoadedCheckpoint(ref=ref, manifest=manifest, blobs=blobs)

    def verify(self, ref: CheckpointRef, progress: ProgressFn | None = None) -> Manifest:
        """Full check of every size and checksum, one blob in memory at a time."""
        manifest = self.read_manifest(ref)
        for entry in manifest.blobs:
            self.read_blob(ref, entry)
            if progress is not None:
                progress(entry.size)
        return manifest

    # -- deleting ------------------------------------------------------------
    def delete(self, ref: CheckpointRef) -> None:
        """Delete a checkpoint: the manifest first, so it stops existing before its blobs go."""
        self.storage.delete(f"{ref.key}/{MANIFEST_NAME}")
        self.storage.delete_prefix(ref.key)

    def remove_leftovers(self) -> list[str]:
        """Delete folders of saves that never committed and stray temporary files.

        Only the run's single writer may call this, at start, before it saves:
        a folder without a manifest is otherwise indistinguishable from a save
        in progress.
        """
        removed: list[str] = []
        for ref in self.folders():
            if not self.is_committed(ref):
                self.storage.delete_prefix(ref.key)
                removed.append(ref.key)
                continue
            for name in self.storage.list_files(ref.key):
                if TMP_MARKER in name and name.startswith("."):
                    self.storage.delete(f"{ref.key}/{name}")
                    removed.append(f"{ref.key}/{name}")
        return removed
