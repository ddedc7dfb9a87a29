"""The blobs of a sharded checkpoint besides DCP's chunks, and reading a whole one back in one process.

See :mod:`spotsafe.sharded.api` for the folder's layout. Everything here reads through a *blob reader*
(a name in, the blob's verified bytes out), so the same code serves a restore (which reads blob by blob)
and ``spotsafe inspect`` (which has verified every blob already).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch

from spotsafe.errors import CorruptCheckpointError, UnsafeCheckpointError
from spotsafe.sharded import metadata as dcp_json
from spotsafe.sharded.tree import join, tensor_keys
from spotsafe.state import codec
from spotsafe.state.tensors import TensorEntry, pack, plan, unpack
from spotsafe.storage import json_limits
from spotsafe.storage.base import Buffer
from spotsafe.storage.manifest import BlobEntry, Manifest
from spotsafe.storage.pending import PendingCheckpoint
from spotsafe.storage.repository import CheckpointRef, CheckpointRepository

LAYOUT = "sharded"
"""``manifest.metadata["layout"]`` of a checkpoint that all ranks of a job wrote together."""
GLOBAL_BLOB = "state.json"

BlobReader = Callable[[str], Buffer]
"""A blob of the checkpoint by its name in the manifest, verified (size and checksum)."""


def to_json(doc: Any) -> bytes:
    data = json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()
    json_limits.check_shape(data, json_limits.STATE_LIMITS, "state")
    return data


def rank_state_blobs(rank: int) -> tuple[str, str]:
    """The blobs of rank ``rank``'s own state: its JSON document and its tensors."""
    return f"r{rank:05d}.state.json", f"r{rank:05d}.state.bin"


def is_sharded(manifest: Manifest) -> bool:
    return manifest.metadata.get("layout") == LAYOUT


def world_size_of(manifest: Manifest) -> int:
    value = manifest.metadata.get("world_size")
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CorruptCheckpointError("a sharded checkpoint's manifest has no valid world_size")
    return value


def blob_reader(repo: CheckpointRepository, ref: CheckpointRef, manifest: Manifest) -> BlobReader:
    return lambda name: repo.read_blob(ref, manifest.blob(name))


def write_rank_state(pending: PendingCheckpoint, rank: int, value: Any) -> list[BlobEntry]:
    """Write rank ``rank``'s own state into ``pending``; the blobs written."""
    tensors: list[torch.Tensor] = []
    doc = codec.encode(value, tensors)
    doc_name, bin_name = rank_state_blobs(rank)
    entries, _ = plan(tensors, bin_name)
    written = []
    if tensors:
        written.append(pending.write_blob(bin_name, lambda: pack(tensors, entries)))
    index = {"state": doc, "tensors": [e.to_json() for e in entries]}
    written.append(pending.write_blob(doc_name, lambda: [to_json(index)]))
    return written


def read_doc(blob: BlobReader, name: str, where: str) -> dict[str, Any]:
    doc = json_limits.load(blob(name), json_limits.STATE_LIMITS, f"{where}/{name}")
    if not isinstance(doc, dict) or "state" not in doc:
        raise CorruptCheckpointError(f"{name} holds no state", checkpoint=where)
    return doc


def read_global_doc(blob: BlobReader, metadata_keys: set[str] | list[str], where: str) -> Any:
    """The global state's document, checked: known tags only, and the tensors that ``dcp.json`` has."""
    doc = read_doc(blob, GLOBAL_BLOB, where)["state"]
    codec.decode(doc, lambda i: torch.empty(0), f"{where}/{GLOBAL_BLOB}")  # every tag known
    if sorted(tensor_keys(doc)) != sorted(metadata_keys):
        raise CorruptCheckpointError(f"{GLOBAL_BLOB} and {dcp_json.BLOB} name different tensors", checkpoint=where)
    return doc


def has_rank_state(manifest: Manifest, rank: int) -> bool:
    return any(b.ref == rank_state_blobs(rank)[0] for b in manifest.blobs)


def read_rank_state(blob: BlobReader, manifest: Manifest, rank: int, where: str) -> Any:
    """Rank ``rank``'s own saved state (``None``: the checkpoint has none for it)."""
    doc_name, bin_name = rank_state_blobs(rank)
    if not has_rank_state(manifest, rank):
        return None
    doc = read_doc(blob, doc_name, where)
    raw = doc.get("tensors")
    if not isinstance(raw, list):
        raise CorruptCheckpointError(f"{doc_name} lists no tensors", checkpoint=where)
    entries = [TensorEntry.from_json(e) for e in raw]
    for entry in entries:
        if any(seg.blob != bin_name for seg in entry.segments):
            raise UnsafeCheckpointError(f"{doc_name}: a tensor lives outside {bin_name}")
    blobs = {bin_name: blob(bin_name)} if entries else {}
    return codec.decode(doc["state"], lambda i: unpack(blobs, entries[i]).clone(), f"{where}/{doc_name}")


def consolidate(blob: BlobReader, manifest: Manifest, where: str) -> dict[str, Any]:
    """The whole checkpoint in one process: the global state with every tensor assembled from its saved
    chunks (whatever the number of ranks that saved it), and each rank's own state under ``rank-<r>``."""
    metadata, stored = dcp_json.decode(blob(dcp_json.BLOB), f"{where}/{dcp_json.BLOB}")
    doc = read_global_doc(blob, list(metadata.state_dict_metadata), where)
    tensors: dict[str, torch.Tensor] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        size = getattr(md, "size", None)
        dtype = getattr(getattr(md, "properties", None), "dtype", None)
        assert size is not None and dtype is not None
        tensors[fqn] = torch.zeros(tuple(size), dtype=dtype)
    chunk_blobs = {seg.blob for chunk in stored.values() for seg in chunk.tensor.segments}
    blobs = {name: blob(name) for name in chunk_blobs}
    for index, chunk in stored.items():
        piece = unpack(blobs, chunk.tensor)
        target = tensors[index.fqn]
        for dim, start in enumerate(index.offset or ()):
            if start + piece.size(dim) > target.size(dim):
                raise UnsafeCheckpointError(f"{where}: a chunk of {index.fqn!r} lies outside the tensor")
            target = target.narrow(dim, start, piece.size(dim))
        if target.shape != piece.shape:
            raise UnsafeCheckpointError(f"{where}: a chunk of {index.fqn!r} does not fit where it is placed")
        target.copy_(piece)
    state = join(doc, tensors, f"{where}/{GLOBAL_BLOB}")
    components = dict(state) if isinstance(state, dict) else {"state": state}
    for rank in range(world_size_of(manifest)):
        own = read_rank_state(blob, manifest, rank, where)
        if own is not None:
            components[f"rank-{rank:05d}"] = own
    return components


__all__ = [
    "GLOBAL_BLOB",
    "LAYOUT",
    "BlobReader",
    "consolidate",
    "is_sharded",
    "read_rank_state",
    "world_size_of",
]
