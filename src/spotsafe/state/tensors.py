"""Tensors as raw bytes: packing many tensors into one blob, and reading them back.

A blob is the tensors' bytes back to back, each starting at a multiple of
:data:`ALIGN` bytes; an index (kept in ``state.json``) records, per tensor, its
offset, byte count, dtype and shape. Reading never unpickles: it reinterprets
verified bytes as a tensor of a dtype from a fixed allow-list.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from spotsafe.errors import UnsafeCheckpointError

ALIGN = 64

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
class TensorEntry:
    """Where one tensor lives inside a blob."""

    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"offset": self.offset, "nbytes": self.nbytes, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, doc: Any) -> TensorEntry:
        if not isinstance(doc, dict):
            raise UnsafeCheckpointError("malformed tensor entry")
        offset, nbytes, dtype, shape = doc.get("offset"), doc.get("nbytes"), doc.get("dtype"), doc.get("shape")
        ints = (offset, nbytes)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints):
            raise UnsafeCheckpointError("tensor entry has a bad offset or size")
        if not isinstance(dtype, str) or not isinstance(shape, list):
            raise UnsafeCheckpointError("tensor entry has a bad dtype or shape")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise UnsafeCheckpointError("tensor entry has a bad shape")
        return cls(offset=offset, nbytes=nbytes, dtype=dtype, shape=tuple(shape))  # type: ignore[arg-type]


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in row-major order, as a memoryview (copies only if it must)."""
    flat = tensor.detach()
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.resolve_conj().resolve_neg().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]


def plan(tensors: Sequence[torch.Tensor]) -> tuple[list[TensorEntry], int]:
    """Offsets for packing ``tensors`` into one blob, and the blob's size."""
    entries: list[TensorEntry] = []
    offset = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        entries.append(TensorEntry(offset=offset, nbytes=nbytes, dtype=dtype_name(t.dtype), shape=tuple(t.shape)))
        offset += nbytes
        offset += -offset % ALIGN
    return entries, entries[-1].offset + entries[-1].nbytes if entries else 0


def pack(tensors: Sequence[torch.Tensor], entries: Sequence[TensorEntry]) -> Iterator[memoryview | bytes]:
    """Yield the blob's chunks: each tensor's bytes, then padding to the next offset."""
    position = 0
    for tensor, entry in zip(tensors, entries, strict=True):
        if entry.offset > position:
            yield bytes(entry.offset - position)
        data = tensor_bytes(tensor)
        yield data
        position = entry.offset + data.nbytes


def unpack(blob: bytearray, entry: TensorEntry) -> torch.Tensor:
    """A tensor viewing ``blob``'s bytes for ``entry`` (no copy; ``blob`` must stay alive)."""
    dtype = dtype_from_name(entry.dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = 1
    for d in entry.shape:
        count *= d
    if count * itemsize != entry.nbytes or entry.offset + entry.nbytes > len(blob):
        raise UnsafeCheckpointError(
            f"tensor entry ({entry.dtype}, shape {list(entry.shape)}) does not match its {entry.nbytes} bytes "
            f"at offset {entry.offset} of a {len(blob)}-byte blob"
        )
    if entry.offset % itemsize:
        raise UnsafeCheckpointError("tensor entry is misaligned")
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=dtype)
    raw = torch.frombuffer(blob, dtype=torch.uint8, count=entry.nbytes, offset=entry.offset)
    return raw.view(dtype).reshape(entry.shape)
