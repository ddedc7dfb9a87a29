"""Tensors as raw bytes: packing many tensors into one blob, and reading them back.

A blob is the tensors' bytes back to back, each starting at a multiple of
:data:`ALIGN` bytes; an index (kept in ``state.json``) records, per tensor, its
offset, byte count, dtype and shape. Reading never unpickles: it reinterprets
verified bytes as a tensor of a dtype from a fixed allow-list.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from spotsafe.errors import UnsafeCheckpointError

ALIGN = 64
MAX_DIMS = 64
"""More dimensions than any tensor has; an entry with more is refused."""
_INT64_MAX = 2**63 - 1

_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float64",
        "float32",
        "float16",
        "bfloat16",
        "complex64",
        "complex128",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "bool",
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
    )
    if isinstance(getattr(torch, name, None), torch.dtype)
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise UnsafeCheckpointError(f"dtype {dtype} is not supported in checkpoints") from None


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise UnsafeCheckpointError(f"unknown dtype {name!r} in checkpoint; refusing it") from None


@dataclass(frozen=True)
class Segment:
    """``length`` bytes of a tensor, stored at ``offset`` in blob ``blob``."""

    blob: str
    offset: int
    length: int

    def to_json(self) -> list[Any]:
        return [self.blob, self.offset, self.length]


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes live: one or more segments, in order.

    A fully written tensor has one segment in its component's blob; a tensor of
    an incremental checkpoint may have segments in blobs of older checkpoints
    (blob names such as ``g000001-step-.../model.bin``) for its unchanged chunks.
    """

    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    segments: tuple[Segment, ...]

    @property
    def offset(self) -> int:
        """Offset of the first segment (entries of one blob written at once have one segment)."""
        return self.segments[0].offset if self.segments else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "nbytes": self.nbytes,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "segments": [s.to_json() for s in self.segments],
        }

    @classmethod
    def from_json(cls, doc: Any, default_blob: str | None = None) -> TensorEntry:
        """Parse an entry; version-1 entries (``offset`` into ``default_blob``) become one segment."""
        if not isinstance(doc, dict):
            raise UnsafeCheckpointError("malformed tensor entry")
        nbytes, dtype, shape = doc.get("nbytes"), doc.get("dtype"), doc.get("shape")
        if not _count(nbytes):
            raise UnsafeCheckpointError("tensor entry has a bad size")
        if not isinstance(dtype, str) or not isinstance(shape, list):
            raise UnsafeCheckpointError("tensor entry has a bad dtype or shape")
        if len(shape) > MAX_DIMS or not all(_count(d) for d in shape):
            raise UnsafeCheckpointError("tensor entry has a bad shape")
        raw = doc.get("segments")
        if raw is None:  # format 1
            offset = doc.get("offset")
            if not _count(offset) or (nbytes and default_blob is None):
                raise UnsafeCheckpointError("tensor entry has a bad offset or no blob")
            raw = [[default_blob, offset, nbytes]] if nbytes else []
        if not isinstance(raw, list):
            raise UnsafeCheckpointError("tensor entry has malformed segments")
        segments: list[Segment] = []
        for seg in raw:
            if not (isinstance(seg, list) and len(seg) == 3 and isinstance(seg[0], str)):
                raise UnsafeCheckpointError("tensor entry has a malformed segment")
            if not (_count(seg[1]) and _count(seg[2]) and seg[2] > 0):
                raise UnsafeCheckpointError("tensor segment has a bad offset or length")
            segments.append(Segment(seg[0], seg[1], seg[2]))
        if sum(s.length for s in segments) != nbytes:
            raise UnsafeCheckpointError(f"tensor segments hold {sum(s.length for s in segments)} bytes, not {nbytes}")
        return cls(nbytes=nbytes, dtype=dtype, shape=tuple(shape), segments=tuple(segments))


def _count(value: Any) -> bool:
    """A size, offset or dimension: an int in ``[0, 2**63)`` (what torch can index)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _INT64_MAX


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in row-major order, as a memoryview (copies only if it must)."""
    flat = tensor.detach()
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.resolve_conj().resolve_neg().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]


def entry_for(tensor: torch.Tensor, segments: Sequence[Segment]) -> TensorEntry:
    return TensorEntry(
        nbytes=tensor.numel() * tensor.element_size(),
        dtype=dtype_name(tensor.dtype),
        shape=tuple(tensor.shape),
        segments=tuple(segments),
    )


def plan(tensors: Sequence[torch.Tensor], blob: str = "") -> tuple[list[TensorEntry], int]:
    """Entries for packing ``tensors`` whole into blob ``blob``, and the blob's size."""
    entries: list[TensorEntry] = []
    offset = end = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        entries.append(entry_for(t, [Segment(blob, offset, nbytes)] if nbytes else []))
        if nbytes:
            end = offset + nbytes
            offset = end + (-end % ALIGN)
    return entries, end


def pack(tensors: Sequence[torch.Tensor], entries: Sequence[TensorEntry]) -> Iterator[memoryview | bytes]:
    """Yield the blob's chunks: each tensor's bytes, then padding to the next offset."""
    position = 0
    for tensor, entry in zip(tensors, entries, strict=True):
        if not entry.nbytes:
            continue
        if entry.offset > position:
            yield bytes(entry.offset - position)
        data = tensor_bytes(tensor)
        yield data
        position = entry.offset + data.nbytes


def unpack(blobs: Mapping[str, bytearray | memoryview], entry: TensorEntry) -> torch.Tensor:
    """The tensor ``entry`` describes, from verified ``blobs`` (keyed by blob name).

    A tensor in one aligned segment views its blob's memory (no copy; the blob
    must stay alive); one in several segments is assembled into new memory.
    """
    dtype = dtype_from_name(entry.dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = 1
    for d in entry.shape:
        count *= d
    if count * itemsize != entry.nbytes:
        raise UnsafeCheckpointError(
            f"tensor entry ({entry.dtype}, shape {list(entry.shape)}) does not match its {entry.nbytes} bytes"
        )
    if sum(seg.length for seg in entry.segments) != entry.nbytes:
        raise UnsafeCheckpointError(f"tensor segments do not add up to its {entry.nbytes} bytes")
    for seg in entry.segments:
        blob = blobs.get(seg.blob)
        if blob is None:
            raise UnsafeCheckpointError(f"tensor segment refers to blob {seg.blob!r}, which the manifest does not list")
        if seg.offset + seg.length > len(blob):
            raise UnsafeCheckpointError(
                f"tensor segment of {seg.length} bytes at offset {seg.offset} overruns its {len(blob)}-byte blob"
            )
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=dtype)
    if len(entry.segments) == 1:
        seg = entry.segments[0]
        if seg.offset % itemsize:
            raise UnsafeCheckpointError("tensor entry is misaligned")
        raw = torch.frombuffer(blobs[seg.blob], dtype=torch.uint8, count=seg.length, offset=seg.offset)
    else:
        raw = torch.empty(entry.nbytes, dtype=torch.uint8)
        position = 0
        for seg in entry.segments:
            part = torch.frombuffer(blobs[seg.blob], dtype=torch.uint8, count=seg.length, offset=seg.offset)
            raw[position : position + seg.length].copy_(part)
            position += seg.length
    return raw.view(dtype).reshape(entry.shape)
