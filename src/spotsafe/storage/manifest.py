"""The checkpoint manifest: the one object whose presence makes a checkpoint exist.

A manifest lists every blob of the checkpoint with its size and checksum, plus
the step, the time and user metadata. It is written last and atomically; a
folder without a committed manifest is not a checkpoint, only leftovers.

Parsing is strict. A manifest is untrusted input: it is parsed within
:data:`~spotsafe.storage.json_limits.MANIFEST_LIMITS` (size, nesting, entries),
anything malformed raises :class:`~spotsafe.errors.CorruptCheckpointError`, and a
blob path that could leave the checkpoint folder raises
:class:`~spotsafe.errors.UnsafeCheckpointError`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import xxhash

from spotsafe.errors import CorruptCheckpointError, StateError, UnsafeCheckpointError
from spotsafe.storage import json_limits

FORMAT = "spotsafe-checkpoint"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
"""Version 2 added blobs shared with older checkpoints (``BlobEntry.checkpoint``)."""
MANIFEST_NAME = "manifest.json"
CHECKSUM_ALGORITHM = "xxh3-128"

_BLOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HEX128 = re.compile(r"^[0-9a-f]{32}$")
_CHECKPOINT_NAME = re.compile(r"^g\d{6}-step-\d{12}-\d{13}-[0-9a-f]{4}$")
_MAX_SIZE = 2**63 - 1
_LATEST_TIME = 253402300799.0
"""The end of year 9999, the last time a calendar date can show: later ``created_at`` values are garbage."""


def new_hasher() -> Any:
    """A streaming hasher for :data:`CHECKSUM_ALGORITHM`.

    xxh3-128 detects accidental damage (truncation, bit flips, torn writes) and
    hashes faster than a disk can write. It is not a signature: safety against
    tampering comes from never executing anything a checkpoint contains.
    """
    return xxhash.xxh3_128()


def check_blob_name(name: str) -> str:
    """Return ``name`` if it is a safe blob file name inside a checkpoint folder."""
    if not isinstance(name, str) or not _BLOB_NAME.fullmatch(name) or name == MANIFEST_NAME or ".." in name:
        raise UnsafeCheckpointError(
            f"blob path {name!r:.80} is not a plain file name inside the checkpoint; refusing to follow it"
        )
    return name


def check_checkpoint_name(name: str) -> str:
    """Return ``name`` if it is a checkpoint folder name (the only place a shared blob may live)."""
    if not isinstance(name, str) or not _CHECKPOINT_NAME.fullmatch(name):
        raise UnsafeCheckpointError(f"shared blob folder {name!r:.80} is not a checkpoint name; refusing to follow it")
    return name


@dataclass(frozen=True)
class BlobEntry:
    """One file a checkpoint needs.

    ``checkpoint`` is ``None`` for a file in the checkpoint's own folder, or the
    name of an older checkpoint folder whose file this checkpoint shares
    (an incremental checkpoint references what did not change instead of
    writing it again).
    """

    path: str
    size: int
    checksum: str
    checkpoint: str | None = None

    @property
    def ref(self) -> str:
        """How ``state.json`` names this blob: ``path``, or ``checkpoint/path`` for a shared one."""
        return self.path if self.checkpoint is None else f"{self.checkpoint}/{self.path}"

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"path": self.path, "size": self.size, "checksum": self.checksum}
        if self.checkpoint is not None:
            doc["checkpoint"] = self.checkpoint
        return doc


@dataclass(frozen=True)
class Manifest:
    step: int
    created_at: float
    blobs: tuple[BlobEntry, ...]
    metadata: dict[str, Any] = field(default_factory=dict)
    writer: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    checksum_algorithm: str = CHECKSUM_ALGORITHM

    @property
    def total_bytes(self) -> int:
        """Bytes a restore reads: own and shared blobs."""
        return sum(b.size for b in self.blobs)

    @property
    def own_bytes(self) -> int:
        """Bytes stored in this checkpoint's own folder (what its save wrote)."""
        return sum(b.size for b in self.blobs if b.checkpoint is None)

    @property
    def shared(self) -> tuple[BlobEntry, ...]:
        return tuple(b for b in self.blobs if b.checkpoint is not None)

    def blob(self, ref: str) -> BlobEntry:
        for entry in self.blobs:
            if entry.ref == ref:
                return entry
        raise CorruptCheckpointError(f"the manifest lists no blob named {ref!r}")

    def to_bytes(self) -> bytes:
        doc = {
            "format": FORMAT,
            "format_version": self.format_version,
            "step": self.step,
            "created_at": self.created_at,
            "checksum_algorithm": self.checksum_algorithm,
            "blobs": [b.to_json() for b in self.blobs],
            "metadata": self.metadata,
            "writer": self.writer,
        }
        try:
            data = json.dumps(doc, indent=1, allow_nan=False).encode()
            json_limits.check_shape(data, json_limits.MANIFEST_LIMITS, MANIFEST_NAME)
        except (ValueError, RecursionError, CorruptCheckpointError) as err:
            raise StateError(f"cannot write a manifest that spotsafe could not read back: {err}") from err
        return data

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str = "manifest") -> Manifest:
        doc = json_limits.load(data, json_limits.MANIFEST_LIMITS, where)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise CorruptCheckpointError(f"{where}: not a spotsafe manifest")
        version = doc.get("format_version")
        if isinstance(version, bool) or version not in READABLE_VERSIONS:
            raise CorruptCheckpointError(
                f"{where}: format version {version!r:.40} is not supported by this spotsafe "
                f"(it reads versions {READABLE_VERSIONS[0]} to {READABLE_VERSIONS[-1]}); upgrade spotsafe to read it"
            )
        if doc.get("checksum_algorithm") != CHECKSUM_ALGORITHM:
            raise CorruptCheckpointError(f"{where}: unknown checksum algorithm {doc.get('checksum_algorithm')!r:.40}")
        step = doc.get("step")
        created = doc.get("created_at")
        raw_blobs = doc.get("blobs")
        metadata = doc.get("metadata", {})
        writer = doc.get("writer", {})
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise CorruptCheckpointError(f"{where}: bad step {step!r:.40}")
        if not isinstance(created, (int, float)) or isinstance(created, bool) or not 0 <= created <= _LATEST_TIME:
            raise CorruptCheckpointError(f"{where}: bad created_at {created!r:.40}")
        if not isinstance(raw_blobs, list) or not isinstance(metadata, dict) or not isinstance(writer, dict):
            raise CorruptCheckpointError(f"{where}: malformed blobs, metadata or writer")
        blobs: list[BlobEntry] = []
        seen: set[str] = set()
        for raw in raw_blobs:
            if not isinstance(raw, dict):
                raise CorruptCheckpointError(f"{where}: malformed blob entry {raw!r:.80}")
            path = check_blob_name(raw.get("path"))  # type: ignore[arg-type]
            owner = raw.get("checkpoint")
            if owner is not None:
                check_checkpoint_name(owner)
            size, checksum = raw.get("size"), raw.get("checksum")
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= _MAX_SIZE:
                raise CorruptCheckpointError(f"{where}: blob {path!r} has a bad size {size!r:.40}")
            if not isinstance(checksum, str) or not _HEX128.fullmatch(checksum):
                raise CorruptCheckpointError(f"{where}: blob {path!r} has a bad checksum {checksum!r:.80}")
            entry = BlobEntry(path=path, size=size, checksum=checksum, checkpoint=owner)
            if entry.ref in seen:
                raise CorruptCheckpointError(f"{where}: blob {entry.ref!r} is listed twice")
            seen.add(entry.ref)
            blobs.append(entry)
        return cls(
            step=step,
            created_at=float(created),
            blobs=tuple(blobs),
            metadata=metadata,
            writer=writer,
            format_version=version,
        )
