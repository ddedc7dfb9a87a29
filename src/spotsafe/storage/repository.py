"""The commit protocol: how a set of blobs becomes a checkpoint, and how it is found, verified and deleted.

Where things live is :mod:`spotsafe.storage.layout`; writing one checkpoint is
:class:`~spotsafe.storage.pending.PendingCheckpoint`: (1) :meth:`CheckpointRepository.begin`,
(2) any number of ``write_blob``, (3) ``commit``. Until (3) returns, readers do not
see the checkpoint at all.

An incremental checkpoint also lists, in its manifest, blobs of older
checkpoints that it shares (``BlobEntry.checkpoint``). Deleting a checkpoint
removes its manifest first, then only the files of its folder that no other
committed manifest references; a folder whose manifest is gone but whose
files are still referenced stays until nothing references them.

Readers order folders by name (generation, step, creation time) and verify each
manifest before trusting it; ``latest.json`` only adds a candidate, it never
overrides what verification says.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from spotsafe.errors import CorruptCheckpointError
from spotsafe.storage.base import TMP_MARKER, BlobNotFoundError, Buffer, Storage, new_buffer
from spotsafe.storage.json_limits import MANIFEST_LIMITS
from spotsafe.storage.layout import CHECKPOINTS, LATEST, CheckpointRef, blob_key
from spotsafe.storage.manifest import MANIFEST_NAME, BlobEntry, Manifest
from spotsafe.storage.parallel_read import read_blobs
from spotsafe.storage.pending import FenceCheck, PendingCheckpoint

__all__ = [
    "CHECKPOINTS",
    "LATEST",
    "CheckpointRef",
    "CheckpointRepository",
    "FenceCheck",
    "LoadedCheckpoint",
    "PendingCheckpoint",
]  # the layout and the pending checkpoint live in their own modules; importers of them from here still work

ProgressFn = Callable[[int], None]


def _no_fence() -> None:
    return None


Placement = Mapping[str, Sequence[tuple[int, memoryview]]]
"""Where parts of blobs are read instead of into their own buffers: ``{blob ref: [(offset in the blob,
destination), ...]}`` (a restore reads tensors straight into the live ones)."""

PlaceFn = Callable[[Manifest, Buffer], Placement]
"""Given the manifest and the verified first blob, where to read parts of the others (:meth:`load`)."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint whose every blob was read and verified (with :meth:`CheckpointRepository.load`'s ``place``,
    the ranges read into the caller's destinations hold nothing in ``blobs``)."""

    ref: CheckpointRef
    manifest: Manifest
    blobs: dict[str, Buffer]


class CheckpointRepository:
    """Checkpoints of one run in one :class:`Storage`.

    ``fence`` is called right before every step that publishes or deletes
    (manifest commit, ``latest`` hint, delete); it raises to stop a stale writer.
    """

    def __init__(
        self, storage: Storage, *, clock: Callable[[], float] = time.time, fence: FenceCheck = _no_fence
    ) -> None:
        self.storage = storage
        self._clock = clock
        self.fence = fence

    # -- listing -------------------------------------------------------------
    def folders(self) -> list[CheckpointRef]:
        """Every checkpoint folder, committed or not, newest first."""
        refs = (CheckpointRef.parse(n) for n in self.storage.list_dirs(CHECKPOINTS))
        return sorted((r for r in refs if r is not None), reverse=True)

    def is_committed(self, ref: CheckpointRef) -> bool:
        return self.storage.exists(f"{ref.key}/{MANIFEST_NAME}")

    def committed(self) -> list[CheckpointRef]:
        """Checkpoints with a committed manifest, newest first (not yet verified). One listing."""
        return self._listed()[0]

    def _listed(self) -> tuple[list[CheckpointRef], list[CheckpointRef]]:
        """One listing: the committed checkpoints, and entries named like a checkpoint folder that are not one.

        The second are what a link (never entered) or a stray object where a folder should be looks like.
        """
        refs: set[CheckpointRef] = set()
        strays: set[CheckpointRef] = set()
        suffix = "/" + MANIFEST_NAME
        for key in self.storage.find(CHECKPOINTS):
            parts = key.split("/")
            if len(parts) == 3 and key.endswith(suffix):
                ref = CheckpointRef.parse(parts[1])
                if ref is not None:
                    refs.add(ref)
            elif len(parts) == 2:
                ref = CheckpointRef.parse(parts[1])
                if ref is not None:
                    strays.add(ref)
        return sorted(refs, reverse=True), sorted(strays - refs, reverse=True)

    def candidates(self) -> list[CheckpointRef]:
        """What a restore should try, newest first: committed checkpoints plus the ``latest`` hint.

        The hint only adds a candidate (in case a listing lags behind a write); it is
        verified like any other and ignored when missing, stale or garbage.
        """
        committed, strays = self._listed()
        refs = {*committed, *strays}  # a stray fails to load, with its reason, like a damaged checkpoint
        hint = self.read_latest()
        if hint is not None and hint not in refs and self.is_committed(hint):
            refs.add(hint)
        return sorted(refs, reverse=True)

    # -- the latest hint -----------------------------------------------------
    def write_latest(self, ref: CheckpointRef) -> None:
        self.fence()
        doc = {"checkpoint": ref.name, "step": ref.step, "generation": ref.generation, "written_at": self._clock()}
        self.storage.write_atomic(LATEST, json.dumps(doc).encode())

    def read_latest(self) -> CheckpointRef | None:
        try:
            doc = json.loads(self.storage.read(LATEST))
            return CheckpointRef.parse(doc["checkpoint"]) if isinstance(doc, dict) else None
        except (BlobNotFoundError, ValueError, KeyError, TypeError):
            return None

    # -- writing -------------------------------------------------------------
    def begin(self, step: int, generation: int = 0) -> PendingCheckpoint:
        if step < 0 or generation < 0:
            raise ValueError(f"step and generation must be >= 0, got {step}, {generation}")
        name = f"g{generation:06d}-step-{step:012d}-{int(self._clock() * 1000):013d}-{secrets.token_hex(2)}"
        ref = CheckpointRef.parse(name)
        assert ref is not None
        return PendingCheckpoint(self.storage, ref, self._clock, self.fence)

    def begin_copy(self, ref: CheckpointRef) -> PendingCheckpoint:
        """Start writing a checkpoint under ``ref``'s name (copying a checkpoint from another store)."""
        return PendingCheckpoint(self.storage, ref, self._clock, self.fence)

    # -- reading and verifying ----------------------------------------------
    def read_manifest(self, ref: CheckpointRef) -> Manifest:
        key = f"{ref.key}/{MANIFEST_NAME}"
        try:
            size = self.storage.size(key)
            if size > MANIFEST_LIMITS.max_bytes:  # refused before it is read into memory
                raise CorruptCheckpointError(
                    f"the manifest has {size} bytes, more than the {MANIFEST_LIMITS.max_bytes} a manifest may have",
                    checkpoint=ref.name,
                )
            data = self.storage.read(key)
        except BlobNotFoundError as err:
            raise CorruptCheckpointError("no committed manifest", checkpoint=ref.name) from err
        manifest = Manifest.from_bytes(data, where=f"{ref.name}/{MANIFEST_NAME}")
        if manifest.step != ref.step:
            raise CorruptCheckpointError(
                f"manifest says step {manifest.step} but the folder says step {ref.step}", checkpoint=ref.name
            )
        if any(b.checkpoint == ref.name for b in manifest.blobs):
            raise CorruptCheckpointError("the manifest lists its own folder as a shared blob", checkpoint=ref.name)
        return manifest

    def check_sizes(self, ref: CheckpointRef) -> Manifest:
        """Cheap structural check: the manifest parses and every blob has its recorded size."""
        manifest = self.read_manifest(ref)
        for entry in manifest.blobs:
            self._checked_size(ref, entry)
        return manifest

    def _checked_size(self, ref: CheckpointRef, entry: BlobEntry) -> None:
        try:
            size = self.storage.size(blob_key(ref, entry))
        except BlobNotFoundError as err:
            raise CorruptCheckpointError(f"blob {entry.ref} is missing", checkpoint=ref.name) from err
        if size != entry.size:
            raise CorruptCheckpointError(
                f"blob {entry.ref} has {size} bytes, the manifest says {entry.size}", checkpoint=ref.name
            )

    def read_blob(self, ref: CheckpointRef, entry: BlobEntry) -> Buffer:
        """Read one blob, verifying its size and checksum. Returns writable memory of exactly its size."""
        [(_, buffer)] = self._read_verified(ref, [entry])
        return buffer

    def _read_verified(
        self, ref: CheckpointRef, entries: Sequence[BlobEntry], placement: Placement | None = None
    ) -> Iterator[tuple[BlobEntry, Buffer]]:
        """Read ``entries`` in parallel parts (:func:`~spotsafe.storage.parallel_read.read_blobs`); yield each,
        in order, once its size and checksum are verified. Raises :class:`CorruptCheckpointError`.

        Ranges that ``placement`` names are read into its destinations, the rest into the blob's buffer.
        """
        for entry in entries:
            self._checked_size(ref, entry)
        buffers = [new_buffer(entry.size) for entry in entries]
        pieces = [_pieces(b, (placement or {}).get(e.ref, ())) for e, b in zip(entries, buffers, strict=True)]
        reads = read_blobs(self.storage, [(blob_key(ref, e), p) for e, p in zip(entries, pieces, strict=True)])
        with contextlib.closing(reads):
            for entry, buffer in zip(entries, buffers, strict=True):
                try:
                    got, digest = next(reads)
                except BlobNotFoundError as err:
                    raise CorruptCheckpointError(f"blob {entry.ref} is missing", checkpoint=ref.name) from err
                if got != entry.size:
                    raise CorruptCheckpointError(
                        f"blob {entry.ref} ended after {got} of {entry.size} bytes", checkpoint=ref.name
                    )
                if digest != entry.checksum:
                    raise CorruptCheckpointError(f"blob {entry.ref} fails its checksum", checkpoint=ref.name)
                yield entry, buffer

    def read_range(self, ref: CheckpointRef, entry: BlobEntry, offset: int, length: int) -> Buffer:
        """``length`` bytes of a blob from ``offset`` on, *not* verified: the caller checks them against a
        checksum of their own (a sharded checkpoint's chunks have one each). Bounds are the manifest's."""
        buffer = new_buffer(length)
        self.read_range_into(ref, entry, offset, buffer)
        return buffer

    def read_range_into(self, ref: CheckpointRef, entry: BlobEntry, offset: int, buffer: Buffer) -> None:
        """Fill ``buffer`` from byte ``offset`` of a blob (see :meth:`read_range`)."""
        length = memoryview(buffer).nbytes
        if offset < 0 or offset + length > entry.size:
            raise CorruptCheckpointError(
                f"a range of {length} bytes at {offset} lies outside blob {entry.ref} ({entry.size} bytes)",
                checkpoint=ref.name,
            )
        try:
            got = self.storage.read_into(blob_key(ref, entry), buffer, offset=offset) if length else 0
        except BlobNotFoundError as err:
            raise CorruptCheckpointError(f"blob {entry.ref} is missing", checkpoint=ref.name) from err
        if got != length:
            raise CorruptCheckpointError(f"blob {entry.ref} ended before {offset + length} bytes", checkpoint=ref.name)

    def load(
        self,
        ref: CheckpointRef,
        progress: ProgressFn | None = None,
        *,
        first: str | None = None,
        place: PlaceFn | None = None,
    ) -> LoadedCheckpoint:
        """Read and verify every blob of ``ref``. Raises :class:`CorruptCheckpointError`.

        With ``first`` and ``place``: the blob ``first`` is read and verified before the others, then
        ``place(manifest, its bytes)`` says where to read ranges of the others instead of their buffers
        (straight into live memory). Such destinations hold unverified bytes until this returns, and damaged
        ones when it raises.
        """
        manifest = self.read_manifest(ref)
        blobs: dict[str, Buffer] = {}
        placement: Placement = {}
        entries = list(manifest.blobs)
        if place is not None and first is not None and any(e.ref == first for e in entries):
            head = [e for e in entries if e.ref == first]
            entries = [e for e in entries if e.ref != first]
            for entry, buffer in self._read_verified(ref, head):
                blobs[entry.ref] = buffer
                if progress is not None:
                    progress(entry.size)
            placement = place(manifest, blobs[first])
        for entry, buffer in self._read_verified(ref, entries, placement):  # all at once: parts of each in flight
            blobs[entry.ref] = buffer
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
    def live_keys(self) -> set[str]:
        """Keys of every blob that a committed manifest needs (its own files and the ones it shares).

        A manifest that does not parse protects nothing (such a checkpoint cannot be restored);
        storage errors propagate, so nothing is deleted on a guess.
        """
        live: set[str] = set()
        for ref in self.committed():
            live.add(f"{ref.key}/{MANIFEST_NAME}")
            try:
                manifest = self.read_manifest(ref)
            except CorruptCheckpointError:
                continue
            live.update(blob_key(ref, entry) for entry in manifest.blobs)
        return live

    def delete(self, ref: CheckpointRef) -> list[str]:
        """Delete a checkpoint: its manifest first, so it stops existing, then its unshared files.

        Files of its folder that another committed checkpoint shares stay (see
        :meth:`sweep`). Returns the keys kept for that reason.
        """
        self.fence()
        self.storage.delete(f"{ref.key}/{MANIFEST_NAME}")
        return self.sweep(ref, self.live_keys())

    def sweep(self, ref: CheckpointRef, live: set[str]) -> list[str]:
        """Delete the files of an uncommitted folder that no key in ``live`` names; return the kept keys."""
        keys = [k for k in self.storage.find(ref.key) if k.startswith(ref.key + "/")]
        kept = [k for k in keys if k in live]
        if not kept:
            self.fence()
            self.storage.delete_prefix(ref.key)
            return []
        for key in keys:
            if key not in live:
                self.fence()
                self.storage.delete(key)
        return kept

    def shared_folders(self, live: set[str] | None = None) -> dict[CheckpointRef, int]:
        """Uncommitted folders that hold blobs of committed checkpoints, with how many such blobs."""
        live = self.live_keys() if live is None else live
        committed = set(self.committed())
        out: dict[CheckpointRef, int] = {}
        for ref in self.folders():
            if ref not in committed:
                count = sum(1 for key in live if key.startswith(ref.key + "/"))
                if count:
                    out[ref] = count
        return out

    def remove_leftovers(self) -> list[str]:
        """Delete what saves that never committed left behind, and stray temporary files.

        Only the run's current writer may call this, at start, before it saves:
        a folder without a manifest is otherwise indistinguishable from a save
        in progress. A stale writer's save in progress may be removed: its
        checkpoint would rank below the current writer's anyway. Files that a
        committed checkpoint shares are kept (their own checkpoint was deleted
        by retention).
        """
        removed: list[str] = []
        committed = set(self.committed())
        live: set[str] | None = None
        for ref in self.folders():
            if ref not in committed:
                live = self.live_keys() if live is None else live
                before = [k for k in self.storage.find(ref.key) if k.startswith(ref.key + "/")]
                kept = self.sweep(ref, live)
                if not kept:
                    removed.append(ref.key)
                else:
                    removed.extend(k for k in before if k not in kept)
                continue
            for name in self.storage.list_files(ref.key):
                if TMP_MARKER in name and name.startswith("."):
                    self.fence()
                    self.storage.delete(f"{ref.key}/{name}")
                    removed.append(f"{ref.key}/{name}")
        return removed


def _pieces(buffer: Buffer, targets: Sequence[tuple[int, memoryview]]) -> list[memoryview]:
    """The views a blob is read into: ``targets`` (``(offset, destination)``) where they are, ``buffer`` (as
    long as the blob) around them. Targets must lie inside the blob and not overlap."""
    view = memoryview(buffer)
    out: list[memoryview] = []
    at = 0
    for offset, target in sorted(targets, key=lambda t: t[0]):
        if offset < at or offset + target.nbytes > view.nbytes:
            raise ValueError(f"a destination at byte {offset} overlaps another or lies outside the blob")
        if offset > at:
            out.append(view[at:offset])
        out.append(target)
        at = offset + target.nbytes
    if at < view.nbytes or not out:
        out.append(view[at:])
    return out
