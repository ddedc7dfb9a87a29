"""torch.distributed.checkpoint's ``Metadata`` as JSON, read back without pickle.

DCP's own ``FileSystemReader`` unpickles its ``.metadata`` file, and its default load planner unpickles
every non-tensor value (``torch.load(weights_only=False)``): a tampered checkpoint runs code. spotsafe
keeps DCP's planning and resharding but stores the metadata as a JSON document (``dcp.json``) that is
parsed within :data:`~spotsafe.storage.json_limits.STATE_LIMITS` and constructs only the types below, and
it writes no non-tensor value through DCP at all (those go to spotsafe's own codec, see
:mod:`spotsafe.sharded.tree`)::

    {"format": "spotsafe-dcp", "version": 1, "dcp_version": "1.0.0",
     "tensors": {"<fqn>": {"dtype": "float32", "size": [16, 8], "requires_grad": false,
                            "chunks": [[[0, 0], [8, 8]], [[8, 0], [8, 8]]]}},
     "items": [{"fqn": "<fqn>", "offset": [8, 0], "index": 1,
                "tensor": {"nbytes": 256, "dtype": "float32", "shape": [8, 8],
                           "segments": [["r00001.distcp", 0, 256]]},
                "checksum": "<xxh3-128 of the chunk's bytes>"}],
     "planner": {"<fqn>": ["<fqn>"]}}

``tensors`` is DCP's ``state_dict_metadata`` (every chunk that was saved), ``items`` its ``storage_data``:
where each saved chunk's bytes are (a segment of a blob of this checkpoint, or of an older one that an
incremental save shares, named ``<checkpoint>/<blob>``), with the chunk's own checksum, which lets the
next save see that it did not change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from spotsafe.errors import CorruptCheckpointError, UnsafeCheckpointError
from spotsafe.state.tensors import MAX_DIMS, TensorEntry, dtype_from_name, dtype_name
from spotsafe.storage import json_limits

FORMAT = "spotsafe-dcp"
VERSION = 1
BLOB = "dcp.json"
"""The blob of a sharded checkpoint that holds DCP's metadata."""


@dataclass(frozen=True)
class StoredChunk:
    """Where one saved chunk's bytes are (DCP's per-item ``storage_data``), and their checksum."""

    tensor: TensorEntry
    checksum: str

    def to_json(self) -> dict[str, Any]:
        return {"tensor": self.tensor.to_json(), "checksum": self.checksum}


def _ints(value: Any, where: str) -> list[int]:
    if not (
        isinstance(value, list)
        and len(value) <= MAX_DIMS
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    ):
        raise UnsafeCheckpointError(f"{where}: expected a list of at most {MAX_DIMS} sizes or offsets")
    return value


def _index_key(index: MetadataIndex) -> tuple[str, tuple[int, ...] | None]:
    return index.fqn, None if index.offset is None else tuple(index.offset)


def encode(metadata: Metadata, stored: dict[MetadataIndex, StoredChunk]) -> bytes:
    """The JSON document of ``metadata``, whose ``storage_data`` is ``stored``."""
    tensors: dict[str, Any] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            raise TypeError(f"{fqn!r}: only tensors are saved through DCP (spotsafe saves other values itself)")
        tensors[fqn] = {
            "dtype": dtype_name(md.properties.dtype),
            "size": list(md.size),
            "requires_grad": bool(md.properties.requires_grad),
            "chunks": [[list(c.offsets), list(c.sizes)] for c in md.chunks],
        }
    items = [
        {
            "fqn": index.fqn,
            "offset": None if index.offset is None else list(index.offset),
            "index": index.index,
            **chunk.to_json(),
        }
        for index, chunk in stored.items()
    ]
    planner = metadata.planner_data if isinstance(metadata.planner_data, dict) else None
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "dcp_version": metadata.version,
        "tensors": tensors,
        "items": items,
        "planner": {k: list(v) for k, v in planner.items()} if planner is not None else None,
    }
    data = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    json_limits.check_shape(data, json_limits.STATE_LIMITS, BLOB)
    return data


def decode(data: bytes | bytearray | memoryview, where: str) -> tuple[Metadata, dict[MetadataIndex, StoredChunk]]:
    """Parse a ``dcp.json`` document (untrusted) into DCP's ``Metadata`` and the chunks' locations.

    Raises :class:`~spotsafe.errors.CorruptCheckpointError` (a malformed document) or
    :class:`~spotsafe.errors.UnsafeCheckpointError` (values out of range)."""
    doc = json_limits.load(data, json_limits.STATE_LIMITS, where)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CorruptCheckpointError(f"{where} is not a spotsafe DCP metadata document")
    if doc.get("version") != VERSION:
        raise CorruptCheckpointError(f"{where} has version {doc.get('version')!r}; this spotsafe reads {VERSION}")
    raw_tensors, raw_items, raw_planner = doc.get("tensors"), doc.get("items"), doc.get("planner")
    if not isinstance(raw_tensors, dict) or not isinstance(raw_items, list):
        raise CorruptCheckpointError(f"{where}: missing tensors or items")
    state: dict[str, Any] = {}
    for fqn, md in raw_tensors.items():
        if not isinstance(md, dict) or not isinstance(md.get("dtype"), str) or not isinstance(md.get("chunks"), list):
            raise UnsafeCheckpointError(f"{where}: malformed metadata of {fqn!r:.80}")
        chunks = []
        for chunk in md["chunks"]:
            if not (isinstance(chunk, list) and len(chunk) == 2):
                raise UnsafeCheckpointError(f"{where}: malformed chunk of {fqn!r:.80}")
            chunks.append(ChunkStorageMetadata(torch.Size(_ints(chunk[0], where)), torch.Size(_ints(chunk[1], where))))
        properties = TensorProperties(dtype=dtype_from_name(md["dtype"]), requires_grad=md.get("requires_grad") is True)
        state[fqn] = TensorStorageMetadata(properties, torch.Size(_ints(md.get("size"), where)), chunks)
    stored: dict[MetadataIndex, StoredChunk] = {}
    for item in raw_items:
        if not isinstance(item, dict) or not isinstance(item.get("fqn"), str) or item["fqn"] not in state:
            raise UnsafeCheckpointError(f"{where}: a stored chunk names no saved tensor")
        offset = item.get("offset")
        hint = item.get("index")
        if hint is not None and not (isinstance(hint, int) and not isinstance(hint, bool) and hint >= 0):
            raise UnsafeCheckpointError(f"{where}: a stored chunk has a bad index")
        checksum = item.get("checksum")
        if not isinstance(checksum, str):
            raise UnsafeCheckpointError(f"{where}: a stored chunk has no checksum")
        index = MetadataIndex(item["fqn"], None if offset is None else _ints(offset, where), hint)
        stored[index] = StoredChunk(TensorEntry.from_json(item.get("tensor")), checksum)
    planner: dict[str, tuple[str, ...]] | None = None
    if raw_planner is not None:
        if not isinstance(raw_planner, dict) or not all(
            isinstance(v, list) and all(isinstance(p, str) for p in v) for v in raw_planner.values()
        ):
            raise UnsafeCheckpointError(f"{where}: malformed planner data")
        planner = {k: tuple(v) for k, v in raw_planner.items()}
    version = doc.get("dcp_version")
    metadata = Metadata(
        state_dict_metadata=state,
        planner_data=planner,
        storage_data=stored,
        storage_meta=StorageMeta(),
        version=version if isinstance(version, str) else None,
    )
    return metadata, stored


def by_key(stored: dict[MetadataIndex, StoredChunk]) -> dict[tuple[str, tuple[int, ...] | None], StoredChunk]:
    """``stored`` keyed by (fqn, offset), the identity of a chunk from one save to the next."""
    return {_index_key(index): chunk for index, chunk in stored.items()}


__all__ = ["BLOB", "StoredChunk", "by_key", "decode", "encode"]
