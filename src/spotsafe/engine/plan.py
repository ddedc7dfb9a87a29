"""Laying out an incremental save: which bytes go into which new blob, and what is shared.

Input: a :class:`~spotsafe.state.snapshot.Snapshot` (what the state looks like)
and, per tensor, its :class:`~spotsafe.engine.staging.StagedTensor` (the staged
bytes, and which chunks changed). Output: per component, the runs of staged
bytes that make up its new blob ``<component>.bin``; every tensor's segments
(new blob for changed chunks, older blobs for unchanged ones); the older blobs
the checkpoint shares; and ``state.json``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from spotsafe.engine.staging import CHUNK, Location, StagedTensor, TensorKey
from spotsafe.state.snapshot import Snapshot
from spotsafe.state.tensors import ALIGN, Segment, TensorEntry, dtype_name
from spotsafe.storage.base import Chunk
from spotsafe.storage.direct import ALIGN as DIRECT_ALIGN
from spotsafe.storage.direct import DIRECT_MIN
from spotsafe.storage.manifest import BlobEntry


@dataclass
class BlobRun:
    """Bytes ``[start, end)`` of a staged tensor, stored at ``blob_offset`` of the component's new blob."""

    tensor: StagedTensor
    start: int
    end: int
    blob_offset: int


@dataclass
class BlobPlan:
    """One new blob ``<component>.bin``: the runs of staged bytes it holds, in order, and its size."""

    name: str
    runs: list[BlobRun] = field(default_factory=list)
    size: int = 0

    def chunks(self) -> Iterator[Chunk]:
        """The blob's bytes: each run from its slot, zero padding in between."""
        position = 0
        for run in self.runs:
            if run.blob_offset > position:
                yield bytes(run.blob_offset - position)
            view = memoryview(run.tensor.slot.buffer.numpy())  # type: ignore[arg-type]
            yield view[run.start : run.end]
            position = run.blob_offset + run.end - run.start


@dataclass
class SavePlan:
    """The layout of one save: its new blobs, every tensor's entry, and the older blobs it shares."""

    snapshot: Snapshot
    staged: dict[TensorKey, StagedTensor]
    blobs: list[BlobPlan]
    entries: dict[str, list[TensorEntry]]
    shared: list[BlobEntry]

    @property
    def new_bytes(self) -> int:
        return sum(b.size for b in self.blobs)

    def placed(self, checkpoint: str) -> dict[TensorKey, list[Location]]:
        """Where each dirty chunk is committed once checkpoint ``checkpoint`` commits."""
        out: dict[TensorKey, list[Location]] = {}
        for blob in self.blobs:
            for run in blob.runs:
                locations = out.setdefault(run.tensor.key, [])
                for start in range(run.start, run.end, CHUNK):
                    locations.append((f"{checkpoint}/{blob.name}", run.blob_offset + start - run.start))
        return out


def make_plan(snapshot: Snapshot, staged: Mapping[TensorKey, StagedTensor], known: Mapping[str, BlobEntry]) -> SavePlan:
    """Lay out the save. A chunk is written if it changed, or if its bytes are committed nowhere in ``known``."""
    blobs: list[BlobPlan] = []
    entries: dict[str, list[TensorEntry]] = {}
    shared: dict[str, BlobEntry] = {}
    for part in snapshot.components:
        blob = BlobPlan(name=part.blob_name)
        entries[part.name] = []
        for index, tensor in enumerate(part.tensors):
            item = staged[(part.name, index)]
            dirty = set(item.dirty)
            for c, location in enumerate(item.slot.locations):
                if location is None or location[0] not in known:
                    item.slot.locations[c] = None
                    dirty.add(c)  # the slot holds the right bytes; they are committed nowhere known
            item.dirty = sorted(dirty)
            mine: list[BlobRun] = []
            for start, end in item.runs():
                # Large runs start on a page, so the disk can take them straight from the slot (O_DIRECT).
                blob.size += -blob.size % (DIRECT_ALIGN if end - start >= DIRECT_MIN else ALIGN)
                mine.append(BlobRun(item, start, end, blob.size))
                blob.size += end - start
            blob.runs.extend(mine)
            segments = _segments(item, blob.name, mine)
            for seg in segments:
                if seg.blob != blob.name:
                    shared[seg.blob] = known[seg.blob]
            nbytes = tensor.numel() * tensor.element_size()
            entries[part.name].append(
                TensorEntry(nbytes=nbytes, dtype=dtype_name(tensor.dtype), shape=tuple(tensor.shape), segments=segments)
            )
        if blob.runs:
            blobs.append(blob)
    return SavePlan(snapshot, dict(staged), blobs, entries, list(shared.values()))


def _segments(item: StagedTensor, blob_name: str, runs: list[BlobRun]) -> tuple[Segment, ...]:
    """The tensor's chunks, in order, as coalesced (blob, offset, length) segments."""
    new_at = {}
    for run in runs:
        for start in range(run.start, run.end, CHUNK):
            new_at[start // CHUNK] = run.blob_offset + start - run.start
    segments: list[Segment] = []
    n = item.slot.nbytes
    for c in range(item.slot.chunks()):
        length = min(CHUNK, n - c * CHUNK)
        if c in new_at:
            where: Location = (blob_name, new_at[c])
        else:
            location = item.slot.locations[c]
            assert location is not None, "a clean chunk always has a location"
            where = location
        last = segments[-1] if segments else None
        if last is not None and last.blob == where[0] and last.offset + last.length == where[1]:
            segments[-1] = Segment(last.blob, last.offset, last.length + length)
        else:
            segments.append(Segment(where[0], where[1], length))
    return tuple(segments)


def locations_of(entry: TensorEntry, own: str) -> list[Location | None]:
    """Per chunk, where a restored tensor's bytes are committed (``own``: the restored checkpoint's name).

    A chunk that spans two segments gets ``None`` (it is written again by the next save).
    """
    out: list[Location | None] = []
    starts: list[tuple[int, Segment]] = []
    position = 0
    for seg in entry.segments:
        starts.append((position, seg))
        position += seg.length
    for c in range((entry.nbytes + CHUNK - 1) // CHUNK):
        lo, hi = c * CHUNK, min((c + 1) * CHUNK, entry.nbytes)
        found: Location | None = None
        for begin, seg in starts:
            if begin <= lo and hi <= begin + seg.length:
                name = seg.blob if "/" in seg.blob else f"{own}/{seg.blob}"
                found = (name, seg.offset + lo - begin)
                break
        out.append(found)
    return out
