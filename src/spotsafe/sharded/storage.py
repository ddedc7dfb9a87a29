"""A DCP ``StorageWriter`` and ``StorageReader`` over spotsafe's checkpoint folders.

torch.distributed.checkpoint (DCP) plans a save across ranks (which rank writes which chunk; a replicated
tensor is written by one rank only) and reshards at load time (a rank reads the pieces of the saved chunks
that overlap its own). spotsafe keeps all of that and replaces only where bytes go:

* Every rank streams the chunks it was given into one blob of the checkpoint's folder,
  ``r<rank>.distcp`` (five digits), checksummed on the way and durable before ``write_data`` returns.
  With a previous checkpoint, a chunk whose bytes did not change (same checksum) is not written again:
  it stays in the older folder and the new checkpoint shares it, as incremental saves of one process do.
* The coordinator's ``finish`` runs only after every rank's ``write_data`` returned (DCP gathers their
  results), checks that each rank's blob is there with its size (ranks on different machines must share
  the storage), writes ``dcp.json`` (the metadata, :mod:`spotsafe.sharded.metadata`) and commits the one
  manifest that lists every rank's blobs. Until then no reader sees the checkpoint; a save that fails on
  any rank commits nothing.
* The reader reads only the chunks its rank needs (ranged reads of the blobs), checks each against its
  own checksum (recorded in ``dcp.json``, which the manifest's checksum covers) before using a byte of
  it, builds tensors from raw bytes (no pickle), and refuses non-tensor items.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import xxhash
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from spotsafe.errors import CorruptCheckpointError, StateError, UnsafeCheckpointError
from spotsafe.sharded.metadata import StoredChunk
from spotsafe.state.tensors import Segment, dtype_name, entry_for, pack, tensor_bytes, unpack
from spotsafe.state.tensors import plan as place
from spotsafe.storage.base import Buffer
from spotsafe.storage.manifest import BlobEntry, Manifest
from spotsafe.storage.pending import PendingCheckpoint
from spotsafe.storage.repository import CheckpointRef, CheckpointRepository

BLOBS_FQN = "\x00spotsafe:blobs"
"""The index of the extra write result in which a rank tells the coordinator which blobs it wrote or shares."""

Finish = Callable[[Metadata, dict[MetadataIndex, StoredChunk], list[BlobEntry]], None]


def rank_blob(rank: int) -> str:
    """The blob in which rank ``rank`` writes its chunks: ``r00001.distcp``."""
    return f"r{rank:05d}.distcp"


@dataclasses.dataclass(frozen=True)
class Previous:
    """The checkpoint an incremental save compares with: its name, manifest and chunks by (fqn, offset)."""

    ref: CheckpointRef
    manifest: Manifest
    chunks: Mapping[tuple[str, tuple[int, ...] | None], StoredChunk]

    def shared(self, chunk: StoredChunk) -> tuple[StoredChunk, list[BlobEntry]]:
        """``chunk`` of this checkpoint as seen from a newer one, and the blobs it needs there."""
        segments, entries = [], []
        for seg in chunk.tensor.segments:
            ref = seg.blob if "/" in seg.blob else f"{self.ref.name}/{seg.blob}"
            entry = self.manifest.blob(seg.blob)
            entries.append(
                entry if entry.checkpoint is not None else dataclasses.replace(entry, checkpoint=self.ref.name)
            )
            segments.append(Segment(ref, seg.offset, seg.length))
        return StoredChunk(dataclasses.replace(chunk.tensor, segments=tuple(segments)), chunk.checksum), entries


def _narrow(tensor: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
    """The part of a saved chunk that a read asks for."""
    for dim, (start, length) in enumerate(zip(offsets, lengths, strict=True)):
        if start + length > tensor.size(dim):
            raise UnsafeCheckpointError(f"a read of {length} at {start} overruns a saved chunk's {tensor.size(dim)}")
        tensor = tensor.narrow(dim, start, length)
    return tensor


def _checksum(data: memoryview) -> str:
    return xxhash.xxh3_128(data).hexdigest()


class SpotsafeWriter(StorageWriter):
    """One rank's writer into ``pending`` (a checkpoint folder all ranks agreed on).

    ``finish`` (on the coordinator only) is called with DCP's global metadata, every saved chunk's location
    and every blob the checkpoint needs, once all ranks' blobs are durable; it must commit."""

    def __init__(self, pending: PendingCheckpoint, *, rank: int, previous: Previous | None, finish: Finish) -> None:
        super().__init__()
        self.pending = pending
        self.rank = rank
        self.previous = previous
        self._finish = finish
        self.is_coordinator = False
        self.written_bytes = 0

    def reset(self, checkpoint_id: Any = None) -> None:
        return None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def storage_meta(self) -> StorageMeta | None:
        return None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        fresh: list[tuple[MetadataIndex, torch.Tensor, str]] = []
        results: list[WriteResult] = []
        entries: dict[str, BlobEntry] = {}
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                raise StateError(
                    f"{item.index.fqn!r}: a non-tensor value reached DCP; spotsafe saves those itself "
                    "(see spotsafe.sharded.tree)"
                )
            data = planner.resolve_data(item)
            assert isinstance(data, torch.Tensor)
            tensor = data.detach()
            if tensor.device.type != "cpu":
                tensor = tensor.cpu()
            tensor = tensor.contiguous()
            checksum = _checksum(tensor_bytes(tensor))
            old = self._unchanged(item.index, tensor, checksum)
            if old is None:
                fresh.append((item.index, tensor, checksum))
                continue
            chunk, needed = old
            entries.update((e.ref, e) for e in needed)
            results.append(WriteResult(index=item.index, size_in_bytes=chunk.tensor.nbytes, storage_data=chunk))
        if fresh:
            name = rank_blob(self.rank)
            tensors = [t for _, t, _ in fresh]
            placed, _ = place(tensors, name)

            def source() -> Iterator[memoryview | bytes]:
                return pack(tensors, placed)

            entry = self.pending.write_blob(name, source)
            entries[entry.ref] = entry
            self.written_bytes += entry.size
            for (index, _, checksum), tensor_entry in zip(fresh, placed, strict=True):
                chunk = StoredChunk(tensor_entry, checksum)
                results.append(WriteResult(index=index, size_in_bytes=tensor_entry.nbytes, storage_data=chunk))
        results.append(
            WriteResult(
                index=MetadataIndex(f"{BLOBS_FQN}:{self.rank}"), size_in_bytes=0, storage_data=list(entries.values())
            )
        )
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def _unchanged(
        self, index: MetadataIndex, tensor: torch.Tensor, checksum: str
    ) -> tuple[StoredChunk, list[BlobEntry]] | None:
        if self.previous is None:
            return None
        key = (index.fqn, None if index.offset is None else tuple(index.offset))
        old = self.previous.chunks.get(key)
        if old is None or old.checksum != checksum:
            return None
        if old.tensor != entry_for(tensor, old.tensor.segments):
            return None  # same bytes, another dtype or shape
        return self.previous.shared(old)

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        stored: dict[MetadataIndex, StoredChunk] = {}
        blobs: dict[str, BlobEntry] = {}
        for rank_results in results:
            for result in rank_results:
                if result.index.fqn.startswith(BLOBS_FQN):
                    blobs.update((e.ref, e) for e in result.storage_data)
                else:
                    stored[result.index] = result.storage_data
        self._finish(metadata, stored, list(blobs.values()))


class SpotsafeReader(StorageReader):
    """Reads one committed sharded checkpoint whose metadata was already read and verified."""

    def __init__(
        self,
        repo: CheckpointRepository,
        ref: CheckpointRef,
        manifest: Manifest,
        metadata: Metadata,
        stored: Mapping[MetadataIndex, StoredChunk],
    ) -> None:
        super().__init__()
        self.repo, self.ref, self.manifest = repo, ref, manifest
        self.metadata, self.stored = metadata, stored
        self.read_bytes = 0

    def reset(self, checkpoint_id: Any = None) -> None:
        return None

    def read_metadata(self, *args: Any, **options: Any) -> Metadata:
        return self.metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        return None

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        uses = Counter(req.storage_index for req in plan.items)
        pieces: dict[MetadataIndex, torch.Tensor] = {}
        for req in plan.items:
            if req.type == LoadItemType.BYTE_IO:
                raise UnsafeCheckpointError(f"{req.storage_index.fqn!r}: spotsafe never saves non-tensor items via DCP")
            target = planner.resolve_tensor(req).detach()
            if uses[req.storage_index] == 1 and self._read_into(req, target):
                planner.commit_tensor(req, target)
                continue
            if req.storage_index not in pieces:
                pieces[req.storage_index] = self._chunk(req.storage_index)
            saved = _narrow(pieces[req.storage_index], req.storage_offsets, req.lengths)
            uses[req.storage_index] -= 1
            if not uses[req.storage_index]:
                del pieces[req.storage_index]  # memory: only the chunks still to be used
            if target.size() != saved.size():
                raise CorruptCheckpointError(
                    f"{req.storage_index.fqn!r}: the saved piece has shape {list(saved.size())}, "
                    f"the plan expects {list(target.size())}",
                    checkpoint=self.ref.name,
                )
            target.copy_(saved)
            planner.commit_tensor(req, target)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _read_into(self, req: Any, target: torch.Tensor) -> bool:
        """Read a whole saved chunk straight into ``target`` when it is exactly that chunk (same dtype and
        shape, contiguous host memory): no staging buffer, no copy. Its checksum is checked in place."""
        chunk = self.stored.get(req.storage_index)
        if (
            chunk is None
            or len(chunk.tensor.segments) != 1
            or any(req.storage_offsets)
            or tuple(req.lengths) != chunk.tensor.shape
            or tuple(target.shape) != chunk.tensor.shape
            or target.device.type != "cpu"
            or not target.is_contiguous()
            or dtype_name(target.dtype) != chunk.tensor.dtype
            or target.numel() * target.element_size() != chunk.tensor.nbytes
            or not chunk.tensor.nbytes
        ):
            return False
        seg = chunk.tensor.segments[0]
        view = memoryview(target.reshape(-1).view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]
        self.repo.read_range_into(self.ref, self.manifest.blob(seg.blob), seg.offset, view)
        self.read_bytes += seg.length
        if xxhash.xxh3_128(view).hexdigest() != chunk.checksum:
            raise CorruptCheckpointError(
                f"a chunk of {req.storage_index.fqn!r} in {seg.blob} fails its checksum", checkpoint=self.ref.name
            )
        return True

    def _chunk(self, index: MetadataIndex) -> torch.Tensor:
        """One saved chunk, read alone (a ranged read of its blob) and checked against its own checksum."""
        chunk = self.stored.get(index)
        if chunk is None:
            raise CorruptCheckpointError(
                f"no stored chunk for {index.fqn!r} at {index.offset}", checkpoint=self.ref.name
            )
        blobs: dict[str, Buffer] = {}
        hasher = xxhash.xxh3_128()
        segments = []
        for seg in chunk.tensor.segments:
            data = self.repo.read_range(self.ref, self.manifest.blob(seg.blob), seg.offset, seg.length)
            hasher.update(data)
            name = f"{len(blobs)}"
            blobs[name] = data
            segments.append(Segment(name, 0, seg.length))
            self.read_bytes += seg.length
        if hasher.hexdigest() != chunk.checksum:
            raise CorruptCheckpointError(
                f"a chunk of {index.fqn!r} in {chunk.tensor.segments[0].blob if segments else '?'} fails its checksum",
                checkpoint=self.ref.name,
            )
        return unpack(blobs, dataclasses.replace(chunk.tensor, segments=tuple(segments)))


__all__ = ["Previous", "SpotsafeReader", "SpotsafeWriter", "rank_blob"]
